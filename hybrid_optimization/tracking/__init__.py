"""The run store: one SQLite file shared by training processes (writers) and the workbench (readers).

Layout under a runs root:

    <runs_root>/runs.db          every run's record, per-step scalars, evals, layers, plan, samples, logs
    <runs_root>/<run_id>/        checkpoints, exports, metrics CSV, stdout/stderr of the training process

Why SQLite in WAL mode: readers see committed rows while a writer appends, a reader never blocks a writer, and
several training processes can append to the same file at once (writes are serialised by SQLite's lock; each
commit is one short transaction). The store is the single source of truth: the app may restart while runs go on.
Times are Unix seconds (float). Tags are lists of strings. Config, args and summary are stored as JSON.

The package, one concept per module:
    schema.py    tables, numbered migrations keyed on PRAGMA user_version, integrity check on open, connection
                 settings, apply_status (the one status transition)
    store.py     RunStore: create / manage runs, read them back as rows (pandas lives in workbench/queries.py)
    writer.py    RunWriter: the trainer only enqueues; a background thread commits; failures are recorded
    liveness.py  is a run's process still there (pid on this host, heartbeat elsewhere)
    files.py     atomic files in run folders: temporary names, stale temp cleanup, "disk full" in words
    errors.py    StoreError and its kinds, each message one line
"""
from .errors import RunNotFound, StoreDamaged, StoreError, StoreMissing
from .liveness import pid_alive
from .schema import (ACTIVE_STATUSES, DB_NAME, LAYER_COLUMNS, PLAN_COLUMNS, SAMPLE_COLUMNS, SCHEMA_VERSION,
                     STAGE_COLUMNS, STATUSES, STEP_COLUMNS, TERMINAL_STATUSES)
from .store import RUN_ID_PATTERN, Rows, RunStore, default_runs_root, new_run_id
from .writer import RunWriter

__all__ = ["ACTIVE_STATUSES", "DB_NAME", "LAYER_COLUMNS", "PLAN_COLUMNS", "RUN_ID_PATTERN", "Rows", "RunNotFound",
           "RunStore", "RunWriter", "SAMPLE_COLUMNS", "SCHEMA_VERSION", "STAGE_COLUMNS", "STATUSES", "STEP_COLUMNS",
           "StoreDamaged", "StoreError", "StoreMissing", "TERMINAL_STATUSES", "default_runs_root", "new_run_id", "pid_alive"]
