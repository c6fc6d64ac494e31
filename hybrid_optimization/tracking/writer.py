"""RunWriter: how a trainer records its run. The trainer only enqueues; one background thread owns the
connection and commits.

Every `log_*` / `set_*` call validates its values and appends them to an in-memory batch — no SQL on the
training thread. The thread commits the batch in one transaction at most every `commit_every_s`, at once when
`max_buffer_rows` rows wait, and whenever someone calls `flush()` (which waits for that commit: `set_status` and
`close` do, so a status is durable once set). It also refreshes the heartbeat every `heartbeat_every_s` while
the process lives, so a long data preparation is not mistaken for a dead run, and polls the run's stop flag
once a second so `stop_requested()` is a plain attribute read.

A failed commit is never swallowed: the rows stay queued and are retried; the failure is written to stderr (the
run's log file when the launcher started it), counted on the writer (`failures`, `last_error`), and recorded on
the run (`runs.write_failures`, `runs.last_write_error`) and as an error line in its log — at once if the store
can take a small write, else with the next commit that succeeds. `flush()` raises StoreError when its commit
failed, so a status that could not be recorded is an error for the caller.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
import threading
import time
from typing import Any, Callable

from .errors import RunNotFound, StoreError
from .files import describe_write_error
from .schema import (LAYER_COLUMNS, PLAN_COLUMNS, SAMPLE_COLUMNS, STATUSES, STEP_COLUMNS, apply_status, connect,
                     is_locked, transaction)

STOP_POLL_S = 1.0
RETRY_AFTER_FAILURE_S = 1.0


def scalar(value: Any) -> Any:
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


def json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _require_unique(keys: list, what: str) -> None:
    # Checked here, on the caller's thread: a duplicate key would make every later commit of the batch fail.
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"{what} {duplicate!r} appears twice")


class _Batch:
    """What waits to be committed. Steps are keyed by step (a re-logged step replaces the row); `ops` are
    whole-table replacements and status changes, applied in the order they were asked for."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple] = {}
        self.evals: list[tuple] = []
        self.layers: list[tuple] = []
        self.logs: list[tuple] = []
        self.updates: dict[str, Any] = {}
        self.ops: list[tuple] = []

    def rows(self) -> int:
        return len(self.steps) + len(self.evals) + len(self.layers) + len(self.logs)

    def __len__(self) -> int:
        return self.rows() + len(self.updates) + len(self.ops)

    def put_back(self, newer: "_Batch") -> "_Batch":
        """This (failed) batch followed by what was queued since: order and last-write-wins preserved."""
        self.steps.update(newer.steps)
        self.evals += newer.evals
        self.layers += newer.layers
        self.logs += newer.logs
        self.updates.update(newer.updates)
        self.ops += newer.ops
        return self


class RunWriter:
    """Appends one run's data; used only by that run's trainer process (see the module docstring)."""

    def __init__(self, store: Any, run_id: str, commit_every_s: float = 1.0, max_buffer_rows: int = 2000,
                 heartbeat_every_s: float = 5.0, auto_heartbeat: bool = True):
        self.store = store
        self.run_id = run_id
        self.commit_every_s = max(0.0, float(commit_every_s))
        self.max_buffer_rows = max(1, int(max_buffer_rows))
        self.heartbeat_every_s = float(heartbeat_every_s) if auto_heartbeat else float("inf")
        self.failures = 0                       # commits that failed (each retried)
        self.last_error: str | None = None
        self._conn = connect(store.db_path, readonly=False)
        try:
            if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise RunNotFound(f"no run {run_id!r} in {store.db_path}; create it with RunStore.create_run first")
            row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM logs WHERE run_id = ?", (run_id,)).fetchone()
        except BaseException:
            self._conn.close()
            raise
        self._next_seq = int(row[0]) + 1
        self._cond = threading.Condition(threading.RLock())
        self._batch = _Batch()
        self._max_step: int | None = None
        self._asked = 0                         # flush generations asked for / committed
        self._committed = 0
        self._failed_generation = 0             # the newest generation whose commit failed
        self._unrecorded_failures = 0           # failures not yet written on the run
        self._last_commit = time.monotonic()
        self._last_heartbeat = 0.0
        self._stop_flag = False
        self._closing = False
        self._closed = False
        self.heartbeat()
        self._thread = threading.Thread(target=self._loop, name=f"runwriter-{run_id}", daemon=True)
        self._thread.start()
        self.flush()

    # -- enqueueing (the trainer's side: no I/O) ----------------------------------------------------------------
    def _enqueue(self, fill: Callable[[_Batch], None]) -> None:
        with self._cond:
            if self._closing:
                raise StoreError(f"the writer of run {self.run_id} is closed")
            fill(self._batch)
            if self._batch.rows() >= self.max_buffer_rows or self.commit_every_s == 0:
                self._cond.notify_all()

    def log_step(self, step: int, wall_time: float | None = None, **scalars: Any) -> None:
        unknown = sorted(set(scalars) - set(STEP_COLUMNS))
        if unknown:
            raise ValueError(f"unknown step metric(s) {unknown}; allowed: {', '.join(STEP_COLUMNS)}")
        row = (self.run_id, int(step), time.time() if wall_time is None else wall_time,
               *(scalar(scalars.get(c)) for c in STEP_COLUMNS))

        def fill(batch: _Batch) -> None:
            batch.steps[int(step)] = row
            self._max_step = int(step) if self._max_step is None else max(self._max_step, int(step))
        self._enqueue(fill)

    def log_eval(self, step: int, wall_time: float | None = None, **metrics: Any) -> None:
        now = time.time() if wall_time is None else wall_time
        rows = [(self.run_id, int(step), now, str(key), scalar(value)) for key, value in metrics.items()]
        self._enqueue(lambda batch: batch.evals.extend(rows))

    def log_layers(self, step: int, rows: list[dict]) -> None:
        records = []
        for pos, row in enumerate(rows):
            unknown = sorted(set(row) - set(LAYER_COLUMNS))
            if unknown:
                raise ValueError(f"unknown layer field(s) {unknown}; allowed: {', '.join(LAYER_COLUMNS)}")
            if "layer" not in row:
                raise ValueError("each layer row needs a 'layer' name")
            records.append((self.run_id, int(step), *(scalar(row.get(c)) for c in LAYER_COLUMNS), pos))
        self._enqueue(lambda batch: batch.layers.extend(records))

    def log(self, message: str, level: str = "info") -> None:
        def fill(batch: _Batch) -> None:
            batch.logs.append((self.run_id, self._next_seq, time.time(), str(level), str(message)))
            self._next_seq += 1
        self._enqueue(fill)

    def heartbeat(self) -> None:
        """Note that the run is alive (throttled to one update per second; cheap to call every step)."""
        now = time.time()
        with self._cond:
            if now - self._last_heartbeat >= 1.0:
                self._last_heartbeat = now
                self._batch.updates["heartbeat"] = now

    def set_pid(self, pid: int) -> None:
        self._set(pid=int(pid), host=socket.gethostname())

    def set_device(self, device: str) -> None:
        self._set(device=str(device))

    def set_teacher_val_loss(self, value: float | None) -> None:
        """The teacher's held-out loss on the run's evaluation windows (the student's reference; set at set-up)."""
        self._set(teacher_val_loss=scalar(value))

    def set_summary(self, summary: dict) -> None:
        self._set(summary=json.dumps(summary, default=json_default))

    def _set(self, **fields: Any) -> None:
        def fill(batch: _Batch) -> None:
            batch.updates.update(fields)
        self._enqueue(fill)
        with self._cond:
            self._cond.notify_all()             # run fields show at once, without waiting for the commit period

    def set_plan(self, rows: list[dict]) -> None:
        records = []
        for pos, row in enumerate(rows):
            unknown = sorted(set(row) - set(PLAN_COLUMNS) - {"features"})
            if unknown:
                raise ValueError(f"unknown plan field(s) {unknown}; allowed: {', '.join(PLAN_COLUMNS)}, features")
            features = row.get("features_json", row.get("features"))
            if features is not None and not isinstance(features, str):
                features = json.dumps(features, default=json_default)
            records.append((self.run_id, str(row["layer"]), row.get("module_type"), scalar(row.get("bits")),
                            scalar(row.get("cluster")), scalar(row.get("n_params")), features, pos))
        _require_unique([r[1] for r in records], "plan layer")
        self._enqueue(lambda batch: batch.ops.append(("plan", records)))

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
                import numpy as np      # here, not at import: the CLI's argument checks open the store without numpy
                if hasattr(features, "detach"):
                    features = features.detach().cpu().numpy()
                features = np.asarray(features, dtype=np.float32).ravel().tobytes()
            records.append((self.run_id, str(row.get("split", "train")), int(row["idx"]), scalar(row.get("cluster")),
                            scalar(row.get("x")), scalar(row.get("y")), row.get("text"),
                            scalar(row.get("n_tokens")), features))
        _require_unique([(r[1], r[2]) for r in records], "sample (split, idx)")
        self._enqueue(lambda batch: batch.ops.append(("samples", records)))

    def stage(self, name: str, done: float | None = None, total: float | None = None, detail: str | None = None,
              ended: bool = False, at: float | None = None) -> None:
        """A setup stage began, progressed (`done` of `total`) or `ended` (store.read_stages reads them); `at`: when
        (default now). Only the newest update of a stage waits in a batch (keeping when the stage began), so
        progress can be reported as often as it is known."""
        now = time.time() if at is None else float(at)
        op = ["stage", str(name), scalar(done), scalar(total), detail, now, now, bool(ended)]

        def fill(batch: _Batch) -> None:
            last = batch.ops[-1] if batch.ops else None
            if last is not None and last[0] == "stage" and last[1] == op[1] and not last[7]:
                op[5] = last[5]                 # the stage began at the earlier update
                op[2] = op[2] if op[2] is not None else last[2]
                op[3] = op[3] if op[3] is not None else last[3]
                batch.ops[-1] = tuple(op)
            else:
                batch.ops.append(tuple(op))
        self._enqueue(fill)

    def set_artifact(self, kind: str, path: str | os.PathLike) -> None:
        self._enqueue(lambda batch: batch.ops.append(("artifact", str(kind), str(path))))

    def set_status(self, status: str, error: str | None = None) -> None:
        """Queue a status change and wait until it (and everything queued before it) is committed; started_at /
        ended_at / error follow the status. Raises StoreError when the store could not take it."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is invalid: it must be one of {', '.join(STATUSES)}")
        self._enqueue(lambda batch: batch.ops.append(("status", status, error)))
        self.flush()

    def stop_requested(self) -> bool:
        """Whether someone asked this run to stop (the writer thread polls the store about once a second)."""
        return self._stop_flag

    # -- committing (the writer thread) -------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit everything queued so far and wait for it; StoreError if that commit failed."""
        with self._cond:
            if self._closed:
                raise StoreError(f"the writer of run {self.run_id} is closed")
            self._asked += 1
            generation = self._asked
            self._cond.notify_all()
            while self._committed < generation and self._failed_generation < generation:
                if not self._thread.is_alive():
                    raise StoreError(f"the writer thread of run {self.run_id} died: {self.last_error}")
                self._cond.wait(0.5)
            if self._committed < generation:
                raise StoreError(f"could not write run {self.run_id} to the run store: {self.last_error}")

    def _due(self, now: float) -> bool:
        return (self._closing or self._asked > max(self._committed, self._failed_generation)
                or self._batch.rows() >= self.max_buffer_rows
                or (len(self._batch) > 0 and now - self._last_commit >= self.commit_every_s))

    def _loop(self) -> None:
        last_poll = 0.0
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._due(now) or now - last_poll >= STOP_POLL_S:
                        break
                    if time.time() - self._last_heartbeat >= self.heartbeat_every_s:
                        self.heartbeat()
                        continue
                    waits = [STOP_POLL_S - (now - last_poll), self.heartbeat_every_s]
                    if len(self._batch):
                        waits.append(self.commit_every_s - (now - self._last_commit))
                    self._cond.wait(max(0.01, min(waits)))
                closing = self._closing
                due = self._due(time.monotonic())
                if due:
                    batch, self._batch = self._batch, _Batch()
                    max_step, self._max_step = self._max_step, None
                    generation = self._asked
            if due:
                self._commit(batch, max_step, generation)
            if time.monotonic() - last_poll >= STOP_POLL_S:
                last_poll = time.monotonic()
                self._poll_stop()
            if closing:
                return

    def _commit(self, batch: _Batch, max_step: int | None, generation: int) -> None:
        try:
            self._write(batch, max_step)
        except Exception as exc:                # any failure: kept, counted, reported; the thread lives on
            message = describe_write_error(exc, self.store.db_path)
            with self._cond:
                self._batch = batch.put_back(self._batch)
                if max_step is not None:
                    self._max_step = max_step if self._max_step is None else max(self._max_step, max_step)
                self.failures += 1
                self._unrecorded_failures += 1
                first = self.last_error != message
                self.last_error = message
                self._failed_generation = generation
                self._last_commit = time.monotonic() - max(0.0, self.commit_every_s - RETRY_AFTER_FAILURE_S)
                self._cond.notify_all()
            if first:
                print(f"run store: could not write run {self.run_id}: {message} (rows kept; retrying)",
                      file=sys.stderr, flush=True)
            self._note_failure_on_run(message)
            return
        with self._cond:
            self._committed = max(self._committed, generation)
            self._last_commit = time.monotonic()
            self._cond.notify_all()

    def _write(self, batch: _Batch, max_step: int | None) -> None:
        run_id = self.run_id
        with self._cond:
            failures, self._unrecorded_failures = self._unrecorded_failures, 0
        note = None
        if failures:                            # an earlier failure that could not be recorded then
            note = (run_id, self._take_seq(), time.time(), "error", f"run store: {failures} write(s) failed before "
                    f"this one ({self.last_error}); their rows were kept and are written now")
        deadline = time.monotonic() + 60.0
        while True:
            try:
                with transaction(self._conn, retry_for_s=60.0):
                    self._apply(self._conn, batch, max_step, failures, note)
                return
            except sqlite3.OperationalError as exc:
                if not is_locked(exc) or time.monotonic() > deadline:
                    if failures:
                        with self._cond:
                            self._unrecorded_failures += failures
                    raise
                time.sleep(0.05)

    def _take_seq(self) -> int:
        with self._cond:
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            return seq

    def _apply(self, conn: sqlite3.Connection, batch: _Batch, max_step: int | None, failures: int,
               note: tuple | None) -> None:
        run_id = self.run_id
        if batch.steps:
            names = ("run_id", "step", "wall_time", *STEP_COLUMNS)
            conn.executemany(f"INSERT OR REPLACE INTO steps({', '.join(names)}) VALUES ({','.join('?' * len(names))})",
                             list(batch.steps.values()))
        if batch.evals:
            conn.executemany("INSERT OR REPLACE INTO evals(run_id, step, wall_time, key, value) VALUES (?,?,?,?,?)",
                             batch.evals)
        if batch.layers:
            names = ("run_id", "step", *LAYER_COLUMNS, "pos")
            conn.executemany(f"INSERT OR REPLACE INTO layers({', '.join(names)}) VALUES ({','.join('?' * len(names))})",
                             batch.layers)
        if batch.logs:
            conn.executemany("INSERT OR REPLACE INTO logs(run_id, seq, time, level, message) VALUES (?,?,?,?,?)",
                             batch.logs)
        updates = dict(batch.updates)
        if max_step is not None:
            updates.setdefault("heartbeat", time.time())
            conn.execute("UPDATE runs SET step = MAX(COALESCE(step, -1), ?) WHERE run_id = ?", (max_step, run_id))
        if updates:
            conn.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in updates)} WHERE run_id = ?",
                         (*updates.values(), run_id))
        if failures:
            conn.execute("INSERT OR REPLACE INTO logs(run_id, seq, time, level, message) VALUES (?,?,?,?,?)", note)
            conn.execute("UPDATE runs SET write_failures = write_failures + ?, last_write_error = ? WHERE run_id = ?",
                         (failures, self.last_error, run_id))
        for op in batch.ops:
            if op[0] == "plan":
                conn.execute("DELETE FROM plan WHERE run_id = ?", (run_id,))
                conn.executemany("INSERT INTO plan(run_id, layer, module_type, bits, cluster, n_params, "
                                 "features_json, pos) VALUES (?,?,?,?,?,?,?,?)", op[1])
            elif op[0] == "samples":
                conn.execute("DELETE FROM samples WHERE run_id = ?", (run_id,))
                conn.executemany("INSERT INTO samples(run_id, split, idx, cluster, x, y, text, n_tokens, features) "
                                 "VALUES (?,?,?,?,?,?,?,?,?)", op[1])
            elif op[0] == "artifact":
                conn.execute("INSERT OR REPLACE INTO artifacts(run_id, kind, path) VALUES (?,?,?)",
                             (run_id, op[1], op[2]))
            elif op[0] == "status":
                apply_status(conn, run_id, op[1], op[2])
            elif op[0] == "stage":
                _, name, done, total, detail, started, now, ended = op
                conn.execute("INSERT INTO stages(run_id, stage, pos, started_at, updated_at, ended_at, done, total, "
                             "detail) VALUES (?, ?, (SELECT COUNT(*) FROM stages WHERE run_id = ?), ?, ?, ?, ?, ?, ?) "
                             "ON CONFLICT(run_id, stage) DO UPDATE SET updated_at = excluded.updated_at, "
                             "ended_at = excluded.ended_at, done = COALESCE(excluded.done, done), "
                             "total = COALESCE(excluded.total, total), detail = COALESCE(excluded.detail, detail)",
                             (run_id, name, run_id, started, now, now if ended else None, done, total, detail))

    def _note_failure_on_run(self, message: str) -> None:
        """Record a failed commit on the run at once if the store can take this small write (the big batch may
        have been what did not fit); otherwise it is recorded with the next commit that succeeds."""
        try:
            with transaction(self._conn, retry_for_s=1.0):
                self._conn.execute("UPDATE runs SET write_failures = write_failures + ?, last_write_error = ? "
                                   "WHERE run_id = ?", (self._unrecorded_failures, message, self.run_id))
                self._conn.execute("INSERT OR REPLACE INTO logs(run_id, seq, time, level, message) VALUES "
                                   "(?,?,?,?,?)", (self.run_id, self._take_seq(), time.time(), "error",
                                                   f"run store: a write failed ({message}); rows kept, retrying"))
            with self._cond:
                self._unrecorded_failures = 0
        except (sqlite3.Error, OSError):
            pass                                # recorded later; stderr already has it

    def _poll_stop(self) -> None:
        try:
            row = self._conn.execute("SELECT stop_requested FROM runs WHERE run_id = ?", (self.run_id,)).fetchone()
            self._stop_flag = bool(row and row[0])
        except sqlite3.Error:
            pass                                # a busy or failing store: keep the last answer, commits report it

    def close(self) -> None:
        """Commit what is queued, stop the thread, close the connection. Rows that still cannot be written are
        reported on stderr (one line) and counted in `failures`; they are not silently dropped."""
        with self._cond:
            if self._closed:
                return
        try:
            self.flush()
        except StoreError as exc:
            with self._cond:
                left = len(self._batch)
            print(f"run store: {left} queued record(s) of run {self.run_id} were not written: {exc}",
                  file=sys.stderr, flush=True)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._cond:
            self._closed = True
            self._batch = _Batch()
        self._conn.close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
