"""The run store: one SQLite file shared by training processes (writers) and the workbench (readers).

Layout under a runs root:

    <runs_root>/runs.db          every run's record, per-step scalars, evals, layers, plan, samples, logs
    <runs_root>/<run_id>/        checkpoints, exports, metrics CSV, stdout/stderr of the training process

Why SQLite in WAL mode: readers see committed rows while a writer appends, a reader never blocks a writer, and
several training processes can append to the same file at once (writes are serialised by SQLite's lock; each
commit is one short transaction). The trainer buffers rows in a `RunWriter` and commits them in batches (at most
every `commit_every_s`, or every `max_buffer_rows` rows, or on flush/close/status change), so a run with
thousands of steps per minute costs a handful of transactions per second.

Readers (the workbench, notebooks, benchmarks) open one short-lived connection per call, read-only where
possible, so no connection crosses a Streamlit rerun or thread, and no reader holds a snapshot for long.
The store is the single source of truth: the app may restart while runs go on.

Times are Unix seconds (float). Tags are lists of strings. Config, args and summary are stored as JSON.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1
DB_NAME = "runs.db"
STATUSES = ("queued", "running", "finished", "failed", "stopped", "lost")
ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("finished", "failed", "stopped", "lost")
STEP_COLUMNS = ("loss", "learning_rate", "lr_multiplier", "trust_radius", "constraint_active",
                "update_magnitude", "gradient_magnitude", "quantization_error", "flip_rate", "tokens_per_s",
                "cluster_id", "skipped", "epoch")
LAYER_COLUMNS = ("layer", "module_type", "bits", "n_params", "rel_error", "frac_neg", "frac_zero", "frac_pos",
                 "flip_rate", "scale")
PLAN_COLUMNS = ("layer", "module_type", "bits", "cluster", "n_params", "features_json")
SAMPLE_COLUMNS = ("idx", "split", "cluster", "x", "y", "text", "n_tokens")
BUSY_TIMEOUT_MS = 10_000
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, preset TEXT,
    created_at REAL, started_at REAL, ended_at REAL, step INTEGER, total_steps INTEGER,
    device TEXT, pid INTEGER, host TEXT, heartbeat REAL,
    tags TEXT NOT NULL DEFAULT '[]', notes TEXT NOT NULL DEFAULT '', archived INTEGER NOT NULL DEFAULT 0,
    config TEXT, args TEXT, summary TEXT, error TEXT, stop_requested INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, wall_time REAL,
    {", ".join(f"{c} REAL" for c in STEP_COLUMNS)},
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
_RUN_TABLES = ("steps", "evals", "layers", "plan", "samples", "logs", "artifacts", "runs")
_LIST_COLUMNS = ("run_id", "name", "status", "preset", "created_at", "started_at", "ended_at", "step",
                 "total_steps", "device", "pid", "host", "heartbeat", "tags", "notes", "archived")


class StoreError(RuntimeError):
    """The run store cannot be used as asked (missing, empty, wrong schema, not SQLite, unknown run, ...)."""


class StoreMissing(StoreError):
    """A reader (create=False) found no store, or an empty one: nothing has been run with this runs root yet."""


class RunNotFound(StoreError, KeyError):
    """No run with this id in the store."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else "run not found"


def default_runs_root() -> Path:
    """`$HYBRID_RUNS_ROOT` if set, else `~/.cache/hybrid-workbench/runs`."""
    env = os.environ.get("HYBRID_RUNS_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid-workbench" / "runs"


def new_run_id() -> str:
    """Sortable by creation time, unique enough for one machine: e.g. 20261124-093012-3f2a."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def pid_alive(pid: int | None) -> bool:
    """True if a process with this pid exists on this host and is not a zombie (exited, never reaped)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may contain spaces, so split after the last ')'.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill is all we can know


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
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


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


@contextmanager
def _transaction(conn: sqlite3.Connection, retry_for_s: float = 30.0) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT. IMMEDIATE takes the write lock up front, so two writers queue on the busy
    timeout instead of failing on a read->write lock upgrade; a still-busy database is retried for a while."""
    deadline = time.monotonic() + retry_for_s
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _json_or(value: str | None, default: Any) -> Any:
    if value is None or value == "":
        return default
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return default


def _scalar(value: Any) -> Any:
    """Make a metric value storable: bools -> 0/1, numpy / torch scalars -> Python numbers, None stays None."""
    if value is None or isinstance(value, (str, int, float)):
        return int(value) if isinstance(value, bool) else value
    if hasattr(value, "item"):
        value = value.item()
        return int(value) if isinstance(value, bool) else value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric value {value!r} of type {type(value).__name__} is not a number") from None


class RunStore:
    """A runs root: `runs.db` plus one folder per run. See the module docstring.

    `create=True` (writers, the launcher) makes the folder and database when missing; `create=False` (readers)
    raises `StoreError` for a missing or empty store instead of creating one.
    """

    def __init__(self, root: str | os.PathLike | None = None, create: bool = True):
        self.root = Path(root).expanduser() if root is not None else default_runs_root()
        self.db_path = self.root / DB_NAME
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"runs root {self.root} is a file; the runs root must be a directory "
                             f"(the store lives in <runs_root>/{DB_NAME})")
        if not self.db_path.exists():
            if not create:
                raise StoreMissing(f"no run store at {self.db_path}: nothing has been run with this runs root yet. "
                                 "Launch a run (or pick another runs root).")
            self.root.mkdir(parents=True, exist_ok=True)
        self._open_and_check(create)

    # -- opening --------------------------------------------------------------------------------------------------
    def _open_and_check(self, create: bool) -> None:
        not_sqlite = (f"{self.db_path} is not a run store: it is not an SQLite database (%s). "
                      "Move it away or pick another runs root.")
        try:
            conn = _connect(self.db_path, readonly=False)
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc):
                raise StoreError(not_sqlite % exc) from None
            raise StoreError(f"cannot open run store {self.db_path}: {exc}") from None
        try:
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            except sqlite3.DatabaseError as exc:
                raise StoreError(not_sqlite % exc) from None
            if not tables:
                if not create:
                    raise StoreMissing(f"run store {self.db_path} is empty (no runs written yet). "
                                     "Launch a run (or pick another runs root).")
                self._create_schema(conn)
                return
            version = None
            if "meta" in tables:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = row[0] if row else None
            if version is None:
                raise StoreError(f"{self.db_path} is an SQLite file without a run-store schema version (tables: "
                                 f"{', '.join(sorted(tables))}); this workbench reads schema version "
                                 f"{SCHEMA_VERSION}. Start a new runs root or move the file away.")
            if str(version) != str(SCHEMA_VERSION):
                raise StoreError(f"run store at {self.db_path} was written by schema version {version}; this "
                                 f"workbench reads version {SCHEMA_VERSION}. Start a new runs root (set "
                                 "HYBRID_RUNS_ROOT or pick another folder) or use the matching version.")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # journal_mode is persistent in the file and cannot change inside a transaction.
        conn.execute("PRAGMA journal_mode=WAL")
        with _transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (str(time.time()),))

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A short-lived read-only connection (falls back to read-write where the folder forbids the -shm file)."""
        try:
            conn = _connect(self.db_path, readonly=True)
            conn.execute("SELECT 1 FROM meta LIMIT 1")
        except sqlite3.OperationalError:
            conn = _connect(self.db_path, readonly=False)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = _connect(self.db_path, readonly=False)
        try:
            with _transaction(conn):
                yield conn
        finally:
            conn.close()

    def _frame(self, sql: str, params: Iterable[Any] = (), numeric: Iterable[str] = ()) -> pd.DataFrame:
        with self._read() as conn:
            cursor = conn.execute(sql, tuple(params))
            columns = [d[0] for d in cursor.description]
            frame = pd.DataFrame.from_records(cursor.fetchall(), columns=columns)
        # NULL-only columns come back as object dtype full of None; numeric columns should be float with NaN.
        for column in numeric:
            if column in frame.columns and frame[column].dtype == object:
                frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        return frame

    # -- writer side ----------------------------------------------------------------------------------------------
    def create_run(self, config: dict, args: dict | list, preset: str, name: str | None = None,
                   tags: Iterable[str] = (), notes: str = "", status: str = "queued",
                   total_steps: int | None = None, run_id: str | None = None) -> str:
        """Create a run record (and its folder); returns its id."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is invalid: it must be one of {', '.join(STATUSES)}")
        if run_id is not None and not RUN_ID_PATTERN.match(run_id):
            raise ValueError(f"run id {run_id!r} is invalid: use letters, digits, '.', '_' or '-' (≤ 128 chars)")
        now = time.time()
        for _ in range(20):
            rid = run_id or new_run_id()
            try:
                with self._write() as conn:
                    conn.execute(
                        "INSERT INTO runs(run_id, name, status, preset, created_at, total_steps, host, heartbeat, "
                        "tags, notes, config, args) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (rid, name or rid, status, preset, now, total_steps, socket.gethostname(), now,
                         json.dumps(list(tags)), notes, json.dumps(config, default=str),
                         json.dumps(args, default=str)))
                break
            except sqlite3.IntegrityError:
                if run_id is not None:
                    raise StoreError(f"a run with id {run_id!r} already exists in {self.db_path}") from None
        else:  # pragma: no cover - 20 collisions of a 16-bit suffix in the same second
            raise StoreError("could not allocate a unique run id")
        self.run_dir(rid)
        return rid

    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID_PATTERN.match(run_id):
            raise ValueError(f"run id {run_id!r} is invalid")
        path = self.root / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def writer(self, run_id: str, commit_every_s: float = 1.0, **kwargs: Any) -> "RunWriter":
        return RunWriter(self, run_id, commit_every_s=commit_every_s, **kwargs)

    # -- reader side ----------------------------------------------------------------------------------------------
    def list_runs(self, include_archived: bool = False) -> pd.DataFrame:
        """One row per run (newest first): the run columns, `cfg.<field>` for every config field and
        `final.<key>`: the summary's values, else the latest eval value per key, else the last step's loss."""
        where = "" if include_archived else "WHERE archived = 0"
        with self._read() as conn:
            runs = conn.execute(f"SELECT {', '.join(_LIST_COLUMNS)}, config, summary FROM runs {where} "
                                "ORDER BY created_at DESC, run_id DESC").fetchall()
            ids = [r[0] for r in runs]
            latest_evals: dict[str, dict[str, float]] = {}
            last_loss: dict[str, float] = {}
            if ids:
                marks = ",".join("?" * len(ids))
                for rid, key, value in conn.execute(
                        f"SELECT e.run_id, e.key, e.value FROM evals e JOIN (SELECT run_id, key, MAX(step) AS s "
                        f"FROM evals WHERE run_id IN ({marks}) GROUP BY run_id, key) m "
                        "ON e.run_id = m.run_id AND e.key = m.key AND e.step = m.s", ids):
                    latest_evals.setdefault(rid, {})[key] = value
                for rid, loss in conn.execute(
                        f"SELECT s.run_id, s.loss FROM steps s JOIN runs r ON s.run_id = r.run_id AND s.step = r.step "
                        f"WHERE r.run_id IN ({marks})", ids):
                    last_loss[rid] = loss
        records = []
        for row in runs:
            record = dict(zip(_LIST_COLUMNS, row[:len(_LIST_COLUMNS)]))
            record["tags"] = _json_or(record["tags"], [])
            record["archived"] = bool(record["archived"])
            config = _json_or(row[-2], {})
            summary = _json_or(row[-1], {})
            for key, value in (config.items() if isinstance(config, dict) else ()):
                record[f"cfg.{key}"] = value
            finals: dict[str, Any] = {}
            if record["run_id"] in last_loss:
                finals["loss"] = last_loss[record["run_id"]]
            finals.update(latest_evals.get(record["run_id"], {}))
            for key, value in (summary.items() if isinstance(summary, dict) else ()):
                if isinstance(value, (int, float, str, bool)) or value is None:
                    finals[key] = value
            for key, value in finals.items():
                record[f"final.{key}"] = value
            records.append(record)
        return pd.DataFrame.from_records(records, columns=None if records else list(_LIST_COLUMNS))

    def get_run(self, run_id: str) -> dict[str, Any]:
        with self._read() as conn:
            cursor = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
            row = cursor.fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
            run = dict(zip([d[0] for d in cursor.description], row))
            run["artifacts"] = dict(conn.execute("SELECT kind, path FROM artifacts WHERE run_id = ?", (run_id,)))
        run["config"] = _json_or(run["config"], {})
        run["args"] = _json_or(run["args"], [])
        run["summary"] = _json_or(run["summary"], {})
        run["tags"] = _json_or(run["tags"], [])
        run["archived"] = bool(run["archived"])
        run["stop_requested"] = bool(run["stop_requested"])
        run["run_dir"] = str(self.root / run_id)
        return run

    def read_steps(self, run_id: str, after_step: int = -1, columns: Iterable[str] | None = None,
                   every: int = 1) -> pd.DataFrame:
        """Per-step scalars with step > after_step, step-ordered. `columns` picks scalars (step and wall_time are
        always included); `every` > 1 keeps only steps divisible by it (cheap thinning for very long runs)."""
        cols = list(STEP_COLUMNS) if columns is None else list(columns)
        unknown = [c for c in cols if c not in STEP_COLUMNS]
        if unknown:
            raise ValueError(f"unknown step column(s) {unknown}; allowed: {', '.join(STEP_COLUMNS)}")
        thin = f" AND step % {int(every)} = 0" if every and int(every) > 1 else ""
        names = ["step", "wall_time", *cols]
        with self._read() as conn:
            rows = conn.execute(f"SELECT {', '.join(names)} FROM steps WHERE run_id = ? AND step > ?{thin} "
                                "ORDER BY step", (run_id, int(after_step))).fetchall()
        # Every column is numeric: one float array is ~3x faster than building the frame row by row (NULL -> NaN).
        values = np.array(rows, dtype=np.float64).reshape(len(rows), len(names))
        frame = pd.DataFrame(values, columns=names)
        frame["step"] = frame["step"].astype(np.int64)
        return frame

    def read_evals(self, run_id: str, after_step: int = -1) -> pd.DataFrame:
        return self._frame("SELECT step, wall_time, key, value FROM evals WHERE run_id = ? AND step > ? "
                           "ORDER BY step, key", (run_id, int(after_step)), numeric=["wall_time", "value"])

    def read_layers(self, run_id: str, step: int | None = None, all_steps: bool = False) -> pd.DataFrame:
        """Per-layer quantization stats at `step` (None: the latest logged step; all_steps=True: every step)."""
        columns = "step, " + ", ".join(LAYER_COLUMNS)
        numeric = [c for c in LAYER_COLUMNS if c not in ("layer", "module_type")]
        if all_steps:
            return self._frame(f"SELECT {columns} FROM layers WHERE run_id = ? ORDER BY step, pos", (run_id,),
                               numeric=numeric)
        if step is None:
            return self._frame(f"SELECT {columns} FROM layers WHERE run_id = ? AND step = "
                               "(SELECT MAX(step) FROM layers WHERE run_id = ?) ORDER BY pos", (run_id, run_id),
                               numeric=numeric)
        return self._frame(f"SELECT {columns} FROM layers WHERE run_id = ? AND step = ? ORDER BY pos",
                           (run_id, int(step)), numeric=numeric)

    def read_plan(self, run_id: str) -> pd.DataFrame:
        return self._frame(f"SELECT {', '.join(PLAN_COLUMNS)} FROM plan WHERE run_id = ? ORDER BY pos", (run_id,),
                           numeric=["bits", "n_params"])

    def read_samples(self, run_id: str, features: bool = False) -> pd.DataFrame:
        """The samples' 2-D projection (x, y), cluster and text. features=True adds a `features` column of float32
        vectors (the featuriser's output, when the trainer stored it) for re-projecting, e.g. with t-SNE."""
        columns = ", ".join(SAMPLE_COLUMNS) + (", features" if features else "")
        frame = self._frame(f"SELECT {columns} FROM samples WHERE run_id = ? ORDER BY split, idx", (run_id,),
                            numeric=["x", "y"])
        if features:
            frame["features"] = [None if b is None else np.frombuffer(b, dtype=np.float32) for b in frame.features]
        return frame

    def read_cluster_batches(self, run_id: str) -> pd.DataFrame:
        """How many batches (training steps) each data cluster supplied, from the steps' cluster_id."""
        frame = self._frame("SELECT CAST(cluster_id AS INTEGER) AS cluster, COUNT(*) AS batches FROM steps "
                            "WHERE run_id = ? AND cluster_id IS NOT NULL GROUP BY cluster_id ORDER BY cluster_id",
                            (run_id,))
        return frame

    def read_logs(self, run_id: str, after_seq: int = 0, limit: int | None = None, tail: bool = False) -> pd.DataFrame:
        """Log lines with seq > after_seq in order; `limit` keeps the first N (or the last N with tail=True)."""
        if limit is None:
            return self._frame("SELECT seq, time, level, message FROM logs WHERE run_id = ? AND seq > ? ORDER BY seq",
                               (run_id, int(after_seq)))
        order = "DESC" if tail else "ASC"
        frame = self._frame(f"SELECT seq, time, level, message FROM logs WHERE run_id = ? AND seq > ? "
                            f"ORDER BY seq {order} LIMIT ?", (run_id, int(after_seq), int(limit)))
        return frame.iloc[::-1].reset_index(drop=True) if tail else frame

    def max_steps_by_run(self, run_ids: Iterable[str]) -> dict[str, int | None]:
        """The latest step per run (what the live view polls to know whether anything is new)."""
        ids = list(run_ids)
        if not ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(f"SELECT run_id, step FROM runs WHERE run_id IN ({','.join('?' * len(ids))})", ids)
            return dict(rows.fetchall())

    # -- run management (short write transactions) -------------------------------------------------------------
    def _require(self, conn: sqlite3.Connection, run_id: str) -> tuple:
        row = conn.execute("SELECT status, pid, host, heartbeat FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
        return row

    def request_stop(self, run_id: str) -> bool:
        """Ask the run's trainer to stop (it polls the flag). Returns False if the run is not queued/running."""
        with self._write() as conn:
            status = self._require(conn, run_id)[0]
            if status not in ACTIVE_STATUSES:
                return False
            conn.execute("UPDATE runs SET stop_requested = 1 WHERE run_id = ?", (run_id,))
            return True

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        """Set a run's status from outside its trainer (e.g. the launcher marks a run that never started)."""
        with self._write() as conn:
            self._require(conn, run_id)
            _apply_status(conn, run_id, status, error)

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set plain run columns (pid, host, device, name, total_steps, args, config) — used by the launcher."""
        allowed = {"pid", "host", "device", "name", "total_steps", "args", "config", "preset", "heartbeat"}
        bad = sorted(set(fields) - allowed)
        if bad:
            raise ValueError(f"cannot update run column(s) {bad}; allowed: {', '.join(sorted(allowed))}")
        values = {k: json.dumps(v, default=str) if k in ("args", "config") else v for k, v in fields.items()}
        with self._write() as conn:
            self._require(conn, run_id)
            conn.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE run_id = ?",
                         (*values.values(), run_id))

    def set_tags(self, run_id: str, tags: Iterable[str]) -> None:
        if isinstance(tags, str):
            tags = [t for t in tags.split(",")]
        clean = sorted({str(t).strip() for t in tags if str(t).strip()})
        with self._write() as conn:
            self._require(conn, run_id)
            conn.execute("UPDATE runs SET tags = ? WHERE run_id = ?", (json.dumps(clean), run_id))

    def set_notes(self, run_id: str, notes: str) -> None:
        with self._write() as conn:
            self._require(conn, run_id)
            conn.execute("UPDATE runs SET notes = ? WHERE run_id = ?", (str(notes), run_id))

    def archive(self, run_id: str, archived: bool = True) -> None:
        with self._write() as conn:
            self._require(conn, run_id)
            conn.execute("UPDATE runs SET archived = ? WHERE run_id = ?", (int(bool(archived)), run_id))

    def delete_run(self, run_id: str, force: bool = False) -> None:
        """Delete a run's rows and its folder. An active run is refused (its trainer would keep writing) unless
        force=True."""
        with self._write() as conn:
            status = self._require(conn, run_id)[0]
            if status in ACTIVE_STATUSES and not force:
                raise StoreError(f"run {run_id} is {status}; stop it before deleting it")
            for table in _RUN_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
        folder = self.root / run_id
        if RUN_ID_PATTERN.match(run_id) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    def refresh_liveness(self, stale_after_s: float = 30) -> list[str]:
        """Mark queued/running runs as `lost` when their process is gone: its pid is not alive on this host, or —
        for a run of another host or without a pid — its heartbeat is older than stale_after_s. Returns the ids
        marked lost.

        On this host a live pid wins over a stale heartbeat: a launcher's queued run whose CLI is still importing
        torch, or a trainer busy in a long step, is not lost (and a lost queued run could no longer start)."""
        now = time.time()
        host = socket.gethostname()

        def verdict(pid: int | None, run_host: str | None, heartbeat: float | None) -> str | None:
            if pid and run_host == host:
                return None if pid_alive(pid) else f"its process (pid {pid}) is gone"
            if heartbeat is None or now - heartbeat > stale_after_s:
                return f"no heartbeat for more than {stale_after_s:g} s"
            return None

        with self._read() as conn:
            candidates = conn.execute("SELECT run_id, pid, host, heartbeat FROM runs WHERE status IN (?, ?)",
                                      ACTIVE_STATUSES).fetchall()
        suspects = [run_id for run_id, pid, run_host, heartbeat in candidates if verdict(pid, run_host, heartbeat)]
        marked = []
        if suspects:
            with self._write() as conn:
                for run_id in suspects:
                    # Re-check inside the write transaction: the trainer may have just finished or beaten.
                    row = conn.execute("SELECT status, pid, host, heartbeat FROM runs WHERE run_id = ?",
                                       (run_id,)).fetchone()
                    reason = verdict(*row[1:]) if row is not None and row[0] in ACTIVE_STATUSES else None
                    if reason:
                        _apply_status(conn, run_id, "lost", f"marked lost: {reason}", keep_error=True)
                        marked.append(run_id)
        return marked


def _apply_status(conn: sqlite3.Connection, run_id: str, status: str, error: str | None,
                  keep_error: bool = False) -> None:
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


class RunWriter:
    """Appends one run's data; used only by that run's trainer process. Every method only buffers (cheap); rows
    are committed in one transaction at most every `commit_every_s` (also by a background thread, so the last
    rows before a long pause still become visible), every `max_buffer_rows` rows, and on flush/close/status.

    The background thread also refreshes the heartbeat every `heartbeat_every_s` while the process lives, so a
    long data/teacher preparation is not mistaken for a dead run; `lost` then means the process is gone.
    """

    def __init__(self, store: RunStore, run_id: str, commit_every_s: float = 1.0, max_buffer_rows: int = 2000,
                 heartbeat_every_s: float = 5.0, auto_heartbeat: bool = True):
        self.store = store
        self.run_id = run_id
        self.commit_every_s = float(commit_every_s)
        self.max_buffer_rows = int(max_buffer_rows)
        self.heartbeat_every_s = float(heartbeat_every_s)
        self._lock = threading.RLock()
        self._conn = _connect(store.db_path, readonly=False)
        row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM logs WHERE run_id = ?", (run_id,)).fetchone()
        if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            self._conn.close()
            raise RunNotFound(f"no run {run_id!r} in {store.db_path}; create it with RunStore.create_run first")
        self._next_seq = int(row[0]) + 1
        self._steps: dict[int, tuple] = {}
        self._evals: list[tuple] = []
        self._layers: list[tuple] = []
        self._logs: list[tuple] = []
        self._run_updates: dict[str, Any] = {}
        self._last_commit = time.monotonic()
        self._last_heartbeat = 0.0
        self._last_stop_poll = 0.0
        self._stop_cached = False
        self._closed = False
        self._max_step: int | None = None
        self.heartbeat()
        self.flush()
        self._wake = threading.Event()
        self._thread = None
        if auto_heartbeat or self.commit_every_s > 0:
            self._thread = threading.Thread(target=self._background, name=f"runwriter-{run_id}", daemon=True)
            self._thread.start()

    # -- buffering ----------------------------------------------------------------------------------------------
    def _pending(self) -> int:
        return len(self._steps) + len(self._evals) + len(self._layers) + len(self._logs) + len(self._run_updates)

    def _maybe_commit(self) -> None:
        if self._pending() >= self.max_buffer_rows or time.monotonic() - self._last_commit >= self.commit_every_s:
            self.flush()

    def log_step(self, step: int, wall_time: float | None = None, **scalars: Any) -> None:
        unknown = sorted(set(scalars) - set(STEP_COLUMNS))
        if unknown:
            raise ValueError(f"unknown step metric(s) {unknown}; allowed: {', '.join(STEP_COLUMNS)}")
        values = tuple(_scalar(scalars.get(c)) for c in STEP_COLUMNS)
        with self._lock:
            self._steps[int(step)] = (self.run_id, int(step), time.time() if wall_time is None else wall_time, *values)
            self._max_step = int(step) if self._max_step is None else max(self._max_step, int(step))
            self._maybe_commit()

    def log_eval(self, step: int, wall_time: float | None = None, **metrics: Any) -> None:
        now = time.time() if wall_time is None else wall_time
        with self._lock:
            for key, value in metrics.items():
                self._evals.append((self.run_id, int(step), now, str(key), _scalar(value)))
            self._maybe_commit()

    def log_layers(self, step: int, rows: list[dict]) -> None:
        with self._lock:
            for pos, row in enumerate(rows):
                unknown = sorted(set(row) - set(LAYER_COLUMNS))
                if unknown:
                    raise ValueError(f"unknown layer field(s) {unknown}; allowed: {', '.join(LAYER_COLUMNS)}")
                if "layer" not in row:
                    raise ValueError("each layer row needs a 'layer' name")
                self._layers.append((self.run_id, int(step), *(_scalar(row.get(c)) for c in LAYER_COLUMNS), pos))
            self._maybe_commit()

    def log(self, message: str, level: str = "info") -> None:
        with self._lock:
            self._logs.append((self.run_id, self._next_seq, time.time(), str(level), str(message)))
            self._next_seq += 1
            self._maybe_commit()

    def heartbeat(self) -> None:
        """Note that the run is alive (throttled to one update per second; cheap to call every step)."""
        now = time.time()
        with self._lock:
            if now - self._last_heartbeat >= 1.0:
                self._last_heartbeat = now
                self._run_updates["heartbeat"] = now

    def set_pid(self, pid: int) -> None:
        self._update_now(pid=int(pid), host=socket.gethostname())

    def set_device(self, device: str) -> None:
        self._update_now(device=str(device))

    def set_total_steps(self, n: int) -> None:
        self._update_now(total_steps=int(n))

    def set_summary(self, summary: dict) -> None:
        self._update_now(summary=json.dumps(summary, default=_json_default))

    def _update_now(self, **fields: Any) -> None:
        with self._lock:
            self._run_updates.update(fields)
            self.flush()

    # -- immediate writes ---------------------------------------------------------------------------------------
    def set_status(self, status: str, error: str | None = None) -> None:
        """Commits at once (with everything buffered before it): started_at / ended_at / error follow the status."""
        with self._lock:
            self.flush(_status=(status, error))

    def set_plan(self, rows: list[dict]) -> None:
        records = []
        for pos, row in enumerate(rows):
            unknown = sorted(set(row) - set(PLAN_COLUMNS) - {"features"})
            if unknown:
                raise ValueError(f"unknown plan field(s) {unknown}; allowed: {', '.join(PLAN_COLUMNS)}, features")
            features = row.get("features_json", row.get("features"))
            if features is not None and not isinstance(features, str):
                features = json.dumps(features, default=_json_default)
            records.append((self.run_id, str(row["layer"]), row.get("module_type"), _scalar(row.get("bits")),
                            _scalar(row.get("cluster")), _scalar(row.get("n_params")), features, pos))
        with self._lock:
            self.flush()
            self._commit_with_retry(lambda c: (c.execute("DELETE FROM plan WHERE run_id = ?", (self.run_id,)),
                                               c.executemany("INSERT INTO plan VALUES (?,?,?,?,?,?,?,?)", records)))

    def set_samples(self, rows: list[dict]) -> None:
        """Rows: idx, split, cluster, x, y (2-D projection), text, n_tokens, and optionally `features` (the sample's
        feature vector, stored as float32, so the workbench can offer other projections such as t-SNE)."""
        records = []
        for row in rows:
            unknown = sorted(set(row) - set(SAMPLE_COLUMNS) - {"features"})
            if unknown:
                raise ValueError(f"unknown sample field(s) {unknown}; allowed: {', '.join(SAMPLE_COLUMNS)}, features")
            features = row.get("features")
            if features is not None:
                if hasattr(features, "detach"):
                    features = features.detach().cpu().numpy()
                features = np.asarray(features, dtype=np.float32).ravel().tobytes()
            records.append((self.run_id, str(row.get("split", "train")), int(row["idx"]), _scalar(row.get("cluster")),
                            _scalar(row.get("x")), _scalar(row.get("y")), row.get("text"),
                            _scalar(row.get("n_tokens")), features))
        with self._lock:
            self.flush()
            self._commit_with_retry(lambda c: (c.execute("DELETE FROM samples WHERE run_id = ?", (self.run_id,)),
                                               c.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?)",
                                                             records)))

    def set_artifact(self, kind: str, path: str | os.PathLike) -> None:
        with self._lock:
            self.flush()
            self._commit_with_retry(lambda c: c.execute("INSERT OR REPLACE INTO artifacts VALUES (?,?,?)",
                                                        (self.run_id, str(kind), str(path))))

    def stop_requested(self) -> bool:
        """Whether someone asked this run to stop (queries the store at most once per second)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_stop_poll >= 1.0:
                self._last_stop_poll = now
                row = self._conn.execute("SELECT stop_requested FROM runs WHERE run_id = ?", (self.run_id,)).fetchone()
                self._stop_cached = bool(row and row[0])
            return self._stop_cached

    # -- committing ---------------------------------------------------------------------------------------------
    def flush(self, _status: tuple[str, str | None] | None = None) -> None:
        with self._lock:
            if self._closed:
                raise StoreError(f"the writer of run {self.run_id} is closed")
            if not self._pending() and _status is None:
                self._last_commit = time.monotonic()
                return
            steps = list(self._steps.values())
            evals, layers, logs = list(self._evals), list(self._layers), list(self._logs)
            updates = dict(self._run_updates)
            max_step = self._max_step

            def write(conn: sqlite3.Connection) -> None:
                if steps:
                    conn.executemany(f"INSERT OR REPLACE INTO steps VALUES ({','.join('?' * (3 + len(STEP_COLUMNS)))})",
                                     steps)
                if evals:
                    conn.executemany("INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?)", evals)
                if layers:
                    conn.executemany(f"INSERT OR REPLACE INTO layers VALUES ({','.join('?' * (3 + len(LAYER_COLUMNS)))})",
                                     layers)
                if logs:
                    conn.executemany("INSERT OR REPLACE INTO logs VALUES (?,?,?,?,?)", logs)
                if max_step is not None:
                    updates.setdefault("heartbeat", time.time())
                    conn.execute("UPDATE runs SET step = MAX(COALESCE(step, -1), ?) WHERE run_id = ?",
                                 (max_step, self.run_id))
                if updates:
                    conn.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in updates)} WHERE run_id = ?",
                                 (*updates.values(), self.run_id))
                if _status is not None:
                    _apply_status(conn, self.run_id, *_status)

            self._commit_with_retry(write)
            # Only after a successful commit: a failed commit keeps every row buffered for the next try.
            self._steps.clear(); self._evals.clear(); self._layers.clear(); self._logs.clear()
            self._run_updates.clear()
            self._max_step = None
            self._last_commit = time.monotonic()

    def _commit_with_retry(self, work, retry_for_s: float = 60.0) -> None:
        deadline = time.monotonic() + retry_for_s
        while True:
            try:
                with _transaction(self._conn, retry_for_s=retry_for_s):
                    work(self._conn)
                return
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise StoreError(f"could not write run {self.run_id} to {self.store.db_path}: {exc}") from exc
                time.sleep(0.05)

    def _background(self) -> None:
        period = max(0.05, min(self.commit_every_s if self.commit_every_s > 0 else 1.0, self.heartbeat_every_s))
        while not self._wake.wait(period):
            try:
                with self._lock:
                    if self._closed:
                        return
                    if time.time() - self._last_heartbeat >= self.heartbeat_every_s:
                        self.heartbeat()
                    if self._pending() and time.monotonic() - self._last_commit >= self.commit_every_s:
                        self.flush()
            except Exception:  # the next foreground call will surface a real problem; never kill the trainer
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            self._wake.set()
            self._conn.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
