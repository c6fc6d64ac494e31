"""The run store's API: create and manage runs, read them back as rows (pandas-free; the workbench's
`workbench/queries.py` turns rows into DataFrames).

Readers (the workbench, notebooks, benchmarks) open one short-lived connection per call, read-only where
possible, so no connection crosses a Streamlit rerun or thread and no reader holds a snapshot for long. A read
that hits a damaged page raises StoreDamaged (one line), never a short result.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import liveness
from .errors import RunNotFound, StoreError
from .files import describe_write_error, remove_stale_temps
from ..schema import default_runs_root, notes_problem, run_name_problem, tags_problem
from .schema import (ACTIVE_STATUSES, DB_NAME, LAYER_COLUMNS, PLAN_COLUMNS, SAMPLE_COLUMNS, STAGE_COLUMNS, STATUSES,
                     STEP_COLUMNS, apply_status, check_runs_root, connect, damaged, open_database, transaction)

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_TABLES = ("steps", "evals", "layers", "plan", "samples", "logs", "artifacts", "stages", "runs")
_LIST_COLUMNS = ("run_id", "name", "status", "preset", "created_at", "started_at", "ended_at", "step",
                 "total_steps", "device", "pid", "host", "heartbeat", "tags", "notes", "archived", "teacher_val_loss")


class Rows(Sequence):
    """A query's result in order: `columns` and one tuple per row in `values`. Indexing or iterating gives dicts;
    `column(name)` one column as a list; `columns` + `values` build a DataFrame without a Python loop."""

    __slots__ = ("columns", "values")

    def __init__(self, columns: Iterable[str], values: list[tuple]):
        self.columns = tuple(columns)
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return Rows(self.columns, self.values[index])
        return dict(zip(self.columns, self.values[index]))

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [row[i] for row in self.values]

    def __repr__(self) -> str:
        return f"Rows({len(self)} × {self.columns})"


def _check_text(name: Any = None, tags: Any = (), notes: Any = "") -> None:
    """The bounds on what people type (schema.py: one rule at every door); ValueError in one line."""
    for what, problem in (("run name", None if name is None else run_name_problem(name)),
                          ("tags", tags_problem(list(tags))), ("notes", notes_problem(notes))):
        if problem:
            raise ValueError(f"{what} {problem}")


def new_run_id() -> str:
    """Sortable by creation time, unique enough for one machine: e.g. 20261124-093012-3f2a."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def json_or(value: str | None, default: Any) -> Any:
    if value is None or value == "":
        return default
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return default


class RunStore:
    """A runs root: `runs.db` plus one folder per run (see the package docstring).

    `create=True` (writers, the launcher) makes the folder and database when missing, upgrades an older schema
    and removes temporary files that killed writers left; `create=False` (readers) raises StoreMissing for a
    missing or empty store instead of creating one. Either way a damaged file is refused (StoreDamaged).
    """

    def __init__(self, root: str | os.PathLike | None = None, create: bool = True):
        self.root = Path(root).expanduser() if root is not None else default_runs_root()
        self.db_path = check_runs_root(self.root, create)
        open_database(self.db_path, create)
        if create:
            remove_stale_temps(self.root)

    # -- connections ----------------------------------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A short-lived read-only connection (falls back to read-write where the folder forbids the -shm file)."""
        try:
            conn = connect(self.db_path, readonly=True)
            conn.execute("SELECT 1 FROM meta LIMIT 1")
        except sqlite3.OperationalError:
            conn = connect(self.db_path, readonly=False)
        try:
            with self._translated("read"):
                yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.db_path, readonly=False)
        try:
            with self._translated("write"), transaction(conn):
                yield conn
        finally:
            conn.close()

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """SQLite's exceptions -> one-line StoreErrors (a malformed page is StoreDamaged, never a short read)."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise                               # a constraint (e.g. a duplicate run id): the caller's to handle
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot {what} run store: {describe_write_error(exc, self.db_path)}") from None
        except sqlite3.DatabaseError as exc:
            if any(word in str(exc).lower() for word in ("malformed", "corrupt", "not a database")):
                raise damaged(self.db_path, str(exc)) from None
            raise StoreError(f"cannot {what} run store {self.db_path}: {exc}") from None

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> Rows:
        with self._read() as conn:
            cursor = conn.execute(sql, tuple(params))
            return Rows([d[0] for d in cursor.description], cursor.fetchall())

    # -- creating runs --------------------------------------------------------------------------------------------
    def create_run(self, config: dict, args: dict | list, preset: str, name: str | None = None,
                   tags: Iterable[str] = (), notes: str = "", status: str = "queued",
                   total_steps: int | None = None, run_id: str | None = None) -> str:
        """Create a run record (and its folder); returns its id."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is invalid: it must be one of {', '.join(STATUSES)}")
        if run_id is not None and not RUN_ID_PATTERN.match(run_id):
            raise ValueError(f"run id {run_id!r} is invalid: use letters, digits, '.', '_' or '-' (≤ 128 chars)")
        _check_text(name=name, tags=list(tags), notes=notes)
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

    def writer(self, run_id: str, commit_every_s: float = 1.0, **kwargs: Any):
        from .writer import RunWriter
        return RunWriter(self, run_id, commit_every_s=commit_every_s, **kwargs)

    # -- reading --------------------------------------------------------------------------------------------------
    def list_runs(self, include_archived: bool = False) -> list[dict[str, Any]]:
        """One dict per run (newest first): the run columns, `cfg.<field>` for every config field and
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
            record["tags"] = json_or(record["tags"], [])
            record["archived"] = bool(record["archived"])
            config = json_or(row[-2], {})
            summary = json_or(row[-1], {})
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
        return records

    def get_run(self, run_id: str) -> dict[str, Any]:
        with self._read() as conn:
            cursor = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
            row = cursor.fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
            run = dict(zip([d[0] for d in cursor.description], row))
            run["artifacts"] = dict(conn.execute("SELECT kind, path FROM artifacts WHERE run_id = ?", (run_id,)))
        run["config"] = json_or(run["config"], {})
        run["args"] = json_or(run["args"], [])
        run["summary"] = json_or(run["summary"], {})
        run["tags"] = json_or(run["tags"], [])
        run["archived"] = bool(run["archived"])
        run["stop_requested"] = bool(run["stop_requested"])
        run["run_dir"] = str(self.root / run_id)
        return run

    def read_steps(self, run_id: str, after_step: int = -1, columns: Iterable[str] | None = None,
                   every: int = 1) -> Rows:
        """Per-step scalars with step > after_step, step-ordered: columns step, wall_time and `columns` (default
        every STEP_COLUMNS); `every` > 1 keeps only steps divisible by it (cheap thinning for very long runs)."""
        cols = list(STEP_COLUMNS) if columns is None else list(columns)
        unknown = [c for c in cols if c not in STEP_COLUMNS]
        if unknown:
            raise ValueError(f"unknown step column(s) {unknown}; allowed: {', '.join(STEP_COLUMNS)}")
        thin = f" AND step % {int(every)} = 0" if every and int(every) > 1 else ""
        return self._rows(f"SELECT {', '.join(['step', 'wall_time', *cols])} FROM steps WHERE run_id = ? AND "
                          f"step > ?{thin} ORDER BY step", (run_id, int(after_step)))

    def read_evals(self, run_id: str, after_step: int = -1) -> Rows:
        return self._rows("SELECT step, wall_time, key, value FROM evals WHERE run_id = ? AND step > ? "
                          "ORDER BY step, key", (run_id, int(after_step)))

    def read_layers(self, run_id: str, step: int | None = None, all_steps: bool = False) -> Rows:
        """Per-layer quantization stats at `step` (None: the latest logged step; all_steps=True: every step)."""
        columns = "step, " + ", ".join(LAYER_COLUMNS)
        if all_steps:
            return self._rows(f"SELECT {columns} FROM layers WHERE run_id = ? ORDER BY step, pos", (run_id,))
        if step is None:
            return self._rows(f"SELECT {columns} FROM layers WHERE run_id = ? AND step = "
                              "(SELECT MAX(step) FROM layers WHERE run_id = ?) ORDER BY pos", (run_id, run_id))
        return self._rows(f"SELECT {columns} FROM layers WHERE run_id = ? AND step = ? ORDER BY pos",
                          (run_id, int(step)))

    def read_plan(self, run_id: str) -> Rows:
        return self._rows(f"SELECT {', '.join(PLAN_COLUMNS)} FROM plan WHERE run_id = ? ORDER BY pos", (run_id,))

    def read_samples(self, run_id: str, features: bool = False) -> Rows:
        """The samples' 2-D projection (x, y), cluster and text. features=True adds a `features` column of float32
        vectors (the featuriser's output, when the trainer stored it) for re-projecting, e.g. with t-SNE."""
        columns = ", ".join(SAMPLE_COLUMNS) + (", features" if features else "")
        rows = self._rows(f"SELECT {columns} FROM samples WHERE run_id = ? ORDER BY split, idx", (run_id,))
        if features:
            import numpy as np      # here, not at import: the store opens in every CLI probe, which never reads these
            rows.values = [(*r[:-1], None if r[-1] is None else np.frombuffer(r[-1], dtype=np.float32))
                           for r in rows.values]
        return rows

    def read_cluster_batches(self, run_id: str) -> Rows:
        """How many batches (training steps) each data cluster supplied, from the steps' cluster_id."""
        return self._rows("SELECT CAST(cluster_id AS INTEGER) AS cluster, COUNT(*) AS batches FROM steps "
                          "WHERE run_id = ? AND cluster_id IS NOT NULL GROUP BY cluster_id ORDER BY cluster_id",
                          (run_id,))

    def mark_stage(self, run_id: str, stage: str) -> None:
        """A setup stage of a queued (launched) run began: its first sign of life, written by the CLI before it
        imports torch, so the workbench shows progress within a second of the launch. The trainer's RunWriter
        continues the same row (its start time is kept)."""
        now = time.time()
        with self._write() as conn:
            self._require(conn, run_id)
            conn.execute("INSERT INTO stages(run_id, stage, pos, started_at, updated_at) VALUES (?, ?, (SELECT "
                         "COUNT(*) FROM stages WHERE run_id = ?), ?, ?) ON CONFLICT(run_id, stage) DO UPDATE SET "
                         "updated_at = excluded.updated_at, ended_at = NULL", (run_id, stage, run_id, now, now))
            conn.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", (now, run_id))

    def read_stages(self, run_id: str) -> Rows:
        """The run's setup stages in the order they began: stage, pos, started_at, updated_at, ended_at (NULL while
        the stage runs), done and total (its progress; NULL when it has no count), detail."""
        return self._rows(f"SELECT {', '.join(STAGE_COLUMNS)} FROM stages WHERE run_id = ? ORDER BY pos",
                          (run_id,))

    def read_logs(self, run_id: str, after_seq: int = 0, limit: int | None = None, tail: bool = False) -> Rows:
        """Log lines with seq > after_seq in order; `limit` keeps the first N (or the last N with tail=True)."""
        if limit is None:
            return self._rows("SELECT seq, time, level, message FROM logs WHERE run_id = ? AND seq > ? ORDER BY seq",
                              (run_id, int(after_seq)))
        order = "DESC" if tail else "ASC"
        rows = self._rows(f"SELECT seq, time, level, message FROM logs WHERE run_id = ? AND seq > ? "
                          f"ORDER BY seq {order} LIMIT ?", (run_id, int(after_seq), int(limit)))
        if tail:
            rows.values.reverse()
        return rows

    def max_steps_by_run(self, run_ids: Iterable[str]) -> dict[str, int | None]:
        """The latest step per run (what the live view polls to know whether anything is new)."""
        ids = list(run_ids)
        if not ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(f"SELECT run_id, step FROM runs WHERE run_id IN ({','.join('?' * len(ids))})", ids)
            return dict(rows.fetchall())

    def teacher_val_losses(self, run_ids: Iterable[str]) -> dict[str, float | None]:
        """Each run's teacher held-out loss (the student's reference line; None: not known yet, or a run recorded
        before it was kept). Written at set-up, so a live run has it before its first step."""
        ids = list(run_ids)
        if not ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(f"SELECT run_id, teacher_val_loss FROM runs WHERE run_id IN ({','.join('?' * len(ids))})",
                                ids)
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
            apply_status(conn, run_id, status, error)

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set plain run columns (pid, host, device, name, total_steps, args, config) — used by the launcher."""
        allowed = {"pid", "host", "device", "name", "total_steps", "args", "config", "preset", "heartbeat"}
        bad = sorted(set(fields) - allowed)
        if bad:
            raise ValueError(f"cannot update run column(s) {bad}; allowed: {', '.join(sorted(allowed))}")
        if "name" in fields:
            _check_text(name=fields["name"])
        values = {k: json.dumps(v, default=str) if k in ("args", "config") else v for k, v in fields.items()}
        with self._write() as conn:
            self._require(conn, run_id)
            conn.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE run_id = ?",
                         (*values.values(), run_id))

    def set_tags(self, run_id: str, tags: Iterable[str]) -> None:
        if isinstance(tags, str):
            tags = [t for t in tags.split(",")]
        clean = sorted({str(t).strip() for t in tags if str(t).strip()})
        _check_text(tags=clean)
        with self._write() as conn:
            self._require(conn, run_id)
            conn.execute("UPDATE runs SET tags = ? WHERE run_id = ?", (json.dumps(clean), run_id))

    def set_notes(self, run_id: str, notes: str) -> None:
        _check_text(notes=notes)
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

    def refresh_liveness(self, stale_after_s: float = liveness.DEFAULT_STALE_AFTER_S) -> list[str]:
        """Mark queued/running runs whose process is gone as `lost` (the rule: tracking/liveness.py). Returns the
        ids marked lost."""
        now, host = time.time(), socket.gethostname()

        def reason(pid, run_host, heartbeat):
            return liveness.lost_reason(pid, run_host, heartbeat, stale_after_s, now=now, this_host=host)

        with self._read() as conn:
            candidates = conn.execute("SELECT run_id, pid, host, heartbeat FROM runs WHERE status IN (?, ?)",
                                      ACTIVE_STATUSES).fetchall()
        suspects = [run_id for run_id, *rest in candidates if reason(*rest)]
        marked = []
        if suspects:
            with self._write() as conn:
                for run_id in suspects:
                    # Re-check inside the write transaction: the trainer may have just finished or beaten.
                    row = conn.execute("SELECT status, pid, host, heartbeat FROM runs WHERE run_id = ?",
                                       (run_id,)).fetchone()
                    why = reason(*row[1:]) if row is not None and row[0] in ACTIVE_STATUSES else None
                    if why:
                        apply_status(conn, run_id, "lost", f"marked lost: {why}", keep_error=True)
                        marked.append(run_id)
        return marked


__all__ = ["DB_NAME", "RUN_ID_PATTERN", "Rows", "RunStore", "apply_status", "default_runs_root", "new_run_id"]
