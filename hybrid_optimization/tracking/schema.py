"""The run store's tables, how a store file is opened (checked, then upgraded), and the SQLite connection settings.

Versions are counted by SQLite's `PRAGMA user_version`. Each entry of `MIGRATIONS` takes a store from version
n-1 to n inside one transaction, so a store written by any earlier version of this code opens and is upgraded,
never refused; only a store written by a *newer* version is refused (its tables may mean something we do not
know). Version 1 is the schema of the first release, which recorded its version in `meta.schema_version` and
left `user_version` at 0; such a file is recognised as version 1. A new store is version 0 run through every
migration, so new and upgraded stores are built by the same code.

Every change of the tables is a numbered migration, the per-step scalar columns included: a new `store` field of
StepMetrics (hybrid_optimization/schema.py, `STEP_COLUMNS`) needs a migration that adds its column
(`add_step_columns`); tests/test_tracking.py fails until it has one. Opening a store of the current version writes
nothing.

Version 3 adds `stages`: a run's setup stages (reading the data, building the teacher, its logits, clustering,
the student) with their progress, so the workbench shows them without reading the log.

Version 4 adds `runs.teacher_val_loss`: the teacher's own cross-entropy on exactly the validation windows the
student is evaluated on, written at set-up (before the first step), so Live and Compare draw the student's
reference from the start of a run (issue 16). NULL for runs recorded before it.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..schema import ACTIVE_STATUSES, RUN_STATUSES, STEP_COLUMNS, TERMINAL_STATUSES  # noqa: F401 (re-exported)
from ..schema import RunsRootError
from ..schema import check_runs_root as check_folder
from .errors import StoreDamaged, StoreError, StoreMissing

# The step columns and run statuses are the project's vocabulary (hybrid_optimization/schema.py: StepMetrics,
# RUN_STATUSES); they are re-exported here because the store is where they become columns and values.
STATUSES = RUN_STATUSES
DB_NAME = "runs.db"
LAYER_COLUMNS = ("layer", "module_type", "bits", "n_params", "rel_error", "frac_neg", "frac_zero", "frac_pos",
                 "flip_rate", "scale")
PLAN_COLUMNS = ("layer", "module_type", "bits", "cluster", "n_params", "features_json")
SAMPLE_COLUMNS = ("idx", "split", "cluster", "x", "y", "text", "n_tokens")
STAGE_COLUMNS = ("stage", "pos", "started_at", "updated_at", "ended_at", "done", "total", "detail")
BUSY_TIMEOUT_MS = 10_000

# The first release's tables, frozen: its step columns are spelled out here because STEP_COLUMNS may grow.
_V1_STEP_COLUMNS = ("loss", "learning_rate", "lr_multiplier", "trust_radius", "constraint_active",
                    "update_magnitude", "gradient_magnitude", "quantization_error", "flip_rate", "tokens_per_s",
                    "cluster_id", "skipped", "epoch")
_V1_TABLES = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, preset TEXT,
    created_at REAL, started_at REAL, ended_at REAL, step INTEGER, total_steps INTEGER,
    device TEXT, pid INTEGER, host TEXT, heartbeat REAL,
    tags TEXT NOT NULL DEFAULT '[]', notes TEXT NOT NULL DEFAULT '', archived INTEGER NOT NULL DEFAULT 0,
    config TEXT, args TEXT, summary TEXT, error TEXT, stop_requested INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, wall_time REAL,
    {", ".join(f"{c} REAL" for c in _V1_STEP_COLUMNS)},
    PRIMARY KEY (run_id, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, wall_time REAL, key TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, key, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layers (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, layer TEXT NOT NULL, module_type TEXT, bits REAL,
    n_params INTEGER, rel_error REAL, frac_neg REAL, frac_zero REAL, frac_pos REAL, flip_rate REAL, scale REAL,
    pos INTEGER, PRIMARY KEY (run_id, step, layer)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plan (
    run_id TEXT NOT NULL, layer TEXT NOT NULL, module_type TEXT, bits REAL, cluster INTEGER, n_params INTEGER,
    features_json TEXT, pos INTEGER, PRIMARY KEY (run_id, layer)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    run_id TEXT NOT NULL, split TEXT NOT NULL, idx INTEGER NOT NULL, cluster INTEGER, x REAL, y REAL,
    text TEXT, n_tokens INTEGER, features BLOB, PRIMARY KEY (run_id, split, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL, level TEXT, message TEXT,
    PRIMARY KEY (run_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, PRIMARY KEY (run_id, kind)) WITHOUT ROWID;
"""


def _v1_create_tables(conn: sqlite3.Connection) -> None:
    for statement in _V1_TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (str(time.time()),))


def _v2_record_write_failures(conn: sqlite3.Connection) -> None:
    # A trainer whose store writes fail says so on the run itself (the writer never swallows a failure).
    conn.execute("ALTER TABLE runs ADD COLUMN write_failures INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE runs ADD COLUMN last_write_error TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status)")


def add_step_columns(conn: sqlite3.Connection, columns: tuple[str, ...]) -> None:
    """For a migration that adds StepMetrics store fields: their REAL columns (old rows read NULL there)."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(steps)")}
    for column in columns:
        if column not in have:
            conn.execute(f"ALTER TABLE steps ADD COLUMN {column} REAL")


def _v3_setup_stages(conn: sqlite3.Connection) -> None:
    # One row per setup stage of a run; `done` / `total` its progress (NULL: no count), `ended_at` NULL while open.
    conn.execute("CREATE TABLE IF NOT EXISTS stages (run_id TEXT NOT NULL, stage TEXT NOT NULL, pos INTEGER, "
                 "started_at REAL, updated_at REAL, ended_at REAL, done REAL, total REAL, detail TEXT, "
                 "PRIMARY KEY (run_id, stage)) WITHOUT ROWID")


def _v4_teacher_reference(conn: sqlite3.Connection) -> None:
    # The teacher's held-out loss on the student's evaluation windows (nats per token): the reference line.
    conn.execute("ALTER TABLE runs ADD COLUMN teacher_val_loss REAL")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1_create_tables, _v2_record_write_failures,
                                                                _v3_setup_stages, _v4_teacher_reference)
SCHEMA_VERSION = len(MIGRATIONS)


def apply_status(conn: sqlite3.Connection, run_id: str, status: str, error: str | None,
                 keep_error: bool = False) -> None:
    """Set a run's status with the bookkeeping that goes with it (one place for trainer, launcher, liveness)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is invalid: it must be one of {', '.join(STATUSES)}")
    now = time.time()
    if status == "running":
        # A (re)started run: clear the previous attempt's end, error and stop request.
        conn.execute("UPDATE runs SET status = ?, started_at = COALESCE(started_at, ?), ended_at = NULL, "
                     "error = NULL, heartbeat = ? WHERE run_id = ?", (status, now, now, run_id))
    elif status == "queued":
        conn.execute("UPDATE runs SET status = ?, ended_at = NULL, error = NULL, stop_requested = 0, heartbeat = ? "
                     "WHERE run_id = ?", (status, now, run_id))
    else:
        # A terminal state: the stop request (if any) has been honoured, so a resume starts clean.
        error_sql = "COALESCE(?, error)" if keep_error else "?"
        conn.execute(f"UPDATE runs SET status = ?, ended_at = ?, error = {error_sql}, stop_requested = 0 "
                     "WHERE run_id = ?", (status, now, error, run_id))


# -- connections ----------------------------------------------------------------------------------------------------
def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit) with a busy timeout, usable from any thread."""
    if readonly:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


@contextmanager
def transaction(conn: sqlite3.Connection, retry_for_s: float = 30.0) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT. IMMEDIATE takes the write lock up front, so two writers queue on the busy
    timeout instead of failing on a read->write lock upgrade; a still-busy database is retried for a while."""
    deadline = time.monotonic() + retry_for_s
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if not is_locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def damaged(path: Path, detail: str) -> StoreDamaged:
    return StoreDamaged(f"run store {path} is damaged ({detail}); it is left untouched. Restore it from a backup, "
                        "or move it away and start a new runs root")


# -- opening: check, then upgrade -----------------------------------------------------------------------------------
_checked: dict[str, tuple] = {}   # path -> file identity at its last passed integrity check (this process)


def _identity(path: Path) -> tuple | None:
    # The main file only: a live run's commits touch the WAL (whose frames SQLite checksums itself), and the main
    # file changes only at WAL checkpoints, so a page refreshing every second does not re-check the whole file.
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def integrity_check(conn: sqlite3.Connection, path: Path) -> None:
    """PRAGMA quick_check (page structure, no index cross-check: O(file size), 0.22 s for a 30 MB store on this
    loaded 2-core machine), once per process per unchanged main file. A damaged file raises StoreDamaged, so nobody reads it short or writes into it."""
    identity = _identity(path)
    if _checked.get(str(path)) == identity:
        return
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(3)").fetchall()]
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc) or "file is not" in str(exc):
            raise
        raise damaged(path, str(exc)) from None
    if problems != ["ok"]:
        raise damaged(path, "; ".join(problems)[:200])
    _checked[str(path)] = identity


def user_version_of(conn: sqlite3.Connection, tables: set[str]) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and "meta" in tables:      # the first release: version in meta, user_version unset
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row and str(row[0]).isdigit() else 0
    return version


def open_database(path: Path, create: bool) -> None:
    """Check a store file and bring it to SCHEMA_VERSION (creating it when `create`). Every problem is one
    StoreError naming the file and what to do."""
    not_sqlite = f"{path} is not a run store: it is not an SQLite database (%s). Move it away or pick another runs root."
    try:
        conn = connect(path, readonly=False)
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise StoreError(not_sqlite % exc) from None
        raise StoreError(f"cannot open run store {path}: {exc}") from None
    try:
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "file is not" in str(exc):
                raise StoreError(not_sqlite % exc) from None
            raise damaged(path, str(exc)) from None
        if not tables and not create:
            raise StoreMissing(f"run store {path} is empty (no runs written yet). Launch a run (or pick another "
                               "runs root).")
        if tables:
            try:
                integrity_check(conn, path)
            except sqlite3.DatabaseError as exc:
                raise StoreError(not_sqlite % exc) from None
        version = user_version_of(conn, tables)
        if tables and version == 0:
            raise StoreError(f"{path} is an SQLite file without a run-store schema version (tables: "
                             f"{', '.join(sorted(tables))}). Start a new runs root or move the file away.")
        if version > SCHEMA_VERSION:
            raise StoreError(f"run store at {path} was written by schema version {version}, newer than this code "
                             f"(version {SCHEMA_VERSION}). Update the workbench, or start a new runs root.")
        try:
            _upgrade(conn, version)
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot upgrade run store {path} from schema version {version} to "
                             f"{SCHEMA_VERSION}: {exc}") from None
    finally:
        conn.close()


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        # Persistent in the file; cannot change inside a transaction. Readers never block the writer in WAL mode.
        conn.execute("PRAGMA journal_mode=WAL")
    if version == SCHEMA_VERSION:
        return                                  # the common case: nothing to write, a reader stays a reader
    with transaction(conn):
        # Re-read under the write lock: another process may have upgraded the file meanwhile.
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        current = user_version_of(conn, tables)
        for number in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[number - 1](conn)
        # meta.schema_version keeps the first release's reader honest: it refuses a newer file with its own message.
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def check_runs_root(root: Path, create: bool) -> Path:
    """The store's path under `root`. The folder rule is the project's one (schema.check_runs_root: a directory,
    really writable when creating); here only what the store adds: the database file exists, or may be created."""
    db_path = root / DB_NAME
    try:
        check_folder(root, must_exist=False, writable=create)
    except RunsRootError as exc:
        raise StoreError(f"{exc} (the store lives in <runs_root>/{DB_NAME}; --runs_root or HYBRID_RUNS_ROOT)") \
            from None
    if not db_path.exists():
        if not create:
            raise StoreMissing(f"no run store at {db_path}: nothing has been run with this runs root yet. "
                               "Launch a run (or pick another runs root).")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create runs root {root}: {exc.strerror or exc}; pick a writable folder "
                             "(--runs_root or HYBRID_RUNS_ROOT)") from None
    return db_path
