"""Hyperparameter sweeps over the hybrid config: `python -m hybrid_optimization.sweep --name NAME --trials N`.

Optuna samples (TPE) and prunes (median pruner). Every trial is an ordinary training run: the sweep builds the
trial's TrainOptions (the sweep's base options + the trial's values, one options document), creates its record in
the run store (tagged `sweep:NAME`), starts the training CLI on it (`launch.spawn`, the same launch path as the
workbench) and watches the evaluations that run writes to the store; each evaluation's validation loss is reported
to Optuna, and a trial the median pruner stops gets a stop request (the trainer ends at its next step, status
"stopped", tag "pruned"). A trial's training process dies with its sweep, even after kill -9 of the sweep.

The study lives in an Optuna RDB storage: by default the SQLite file `<runs root>/sweeps.db`; `--storage URL`
points workers on several machines at one shared PostgreSQL / MySQL database. A second worker joins a running
sweep with the same `--name` and `--storage` (its search space, objective and base options come from the study):

    python -m hybrid_optimization.sweep --name lr-search --trials 10 --storage postgresql://user:pw@db-host/optuna

Search space (`--param`, repeatable; names are HybridTrainingConfig fields or TrainOptions fields):
    --param base_learning_rate=1e-4:1e-2:log     a float range, log-uniform (use it for rates)
    --param data_clusters=2:16                   an integer range (integers when both bounds are)
    --param target_bits=1,1.58,2                 a choice; true,false for switches
Both ends of every range and every choice are checked against the CLI's own bounds before any trial starts.
Objective (`--objective`): final_val_loss (default), best_val_loss, or steps_to_target with `--target V` (the
first evaluated step whose validation loss is ≤ V; a trial that never gets there counts as 2 × its steps).

Surviving crashes: trials send Optuna heartbeats; a RUNNING trial whose worker died (kill -9, a lost machine) is
failed and retried once as a new trial — at once by the next worker on the same host (its process is gone), after
the heartbeat's grace period by a worker elsewhere.

Exit codes: 0 done (prints the best trial's run id and value), 1 no trial completed (with the last reason),
2 bad input (one line; nothing started, nothing written), 143 stopped by a signal.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import socket
import sqlite3
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import launch
from .config import ConfigError, HybridTrainingConfig
from .distill.options import OptionsError, TrainOptions, check_batch_memory
from .distill.presets import PRESETS, get_preset
from .distill.report_to import parse_report_to
from .tracking import ACTIVE_STATUSES, RunStore, StoreError, default_runs_root

OBJECTIVES = ("final_val_loss", "best_val_loss", "steps_to_target")
OBJECTIVE_LABELS = {"final_val_loss": "final validation loss", "best_val_loss": "best validation loss",
                    "steps_to_target": "steps to the target validation loss"}
PRUNE_METRIC = "val_loss"          # the evaluation the median pruner compares across trials
STORAGE_NAME = "sweeps.db"
SWEEP_TAG_PREFIX = "sweep:"
PRUNED_TAG = "pruned"
# Sensible ranges the Sweep page offers first (log-uniform for rates).
DEFAULT_SPACE = ("base_learning_rate=1e-4:1e-2:log", "initial_trust_radius=1e-3:1:log",
                 "auxiliary_nn_learning_rate=1e-5:1e-2:log")
POLL_S = 0.5
MAX_TRIALS = 100_000
MAX_WORKERS = 64
MAX_NAME_CHARS = 50                # the run tag sweep:NAME stays within a tag's length bound
MAX_SEED = 2 ** 32 - 1
# Heartbeats (seconds): a trial whose worker stopped beating for GRACE_S is failed by the next worker that starts
# a trial, and retried MAX_RETRY time(s) with the same values.
HEARTBEAT_S = 5
GRACE_S = 20
MAX_RETRY = 1
STORAGE_PROBE_S = 3.0              # a database server that does not answer within this is refused, not waited for
SCHEMA_ATTEMPTS = 5                # a shared database created by two workers at once: retry the loser

# -- what a sweep may search ------------------------------------------------------------------------------------
# TrainOptions fields the sweep sets itself (where and how a trial runs), and TrainOptions fields that are a config
# field under another name (searched, and validated, under the config's name).
SWEEP_OWNED = frozenset({
    "epochs", "max_steps", "eval_every", "eval_every_steps", "stop_after_steps", "seed", "preset", "run_id",
    "runs_root", "run_name", "tags", "notes", "resume", "quiet", "progress", "config", "argv", "given",
    "train_windows", "track", "callbacks", "optimizer_factory", "hybrid_config", "data_clustering",
    "param_clustering", "export", "save_metrics", "checkpoint_every_s", "options_file"})
CONFIG_ALIASES = {"lr": "base_learning_rate", "weight_decay": "weight_decay", "batch_size": "batch_size",
                  "data_clusters": "data_clusters", "param_clusters": "parameter_clusters",
                  "trust_region_mode": "trust_region_mode", "precision_budget": "precision_budget",
                  "bits": "target_bits", "qat": "use_quantization", "ternary": "target_bits"}
_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


class SweepError(ValueError):
    """Bad sweep input (a range, a field name, an objective, the storage); the message names it and what is
    allowed."""


def _scalar_kind(annotation: Any) -> type | None:
    """bool/int/float/str of a dataclass field's annotation ("float | None" -> float); None for anything else."""
    if isinstance(annotation, type):
        return annotation if annotation in (bool, int, float, str) else None
    text = str(annotation).replace("Optional[", "").rstrip("]")
    kinds = [part.strip() for part in text.split("|") if part.strip() != "None"]
    return _SCALARS.get(kinds[0]) if len(kinds) == 1 else None


def config_fields() -> dict[str, type]:
    """HybridTrainingConfig fields -> the type of their values."""
    return {f.name: kind for f in dataclasses.fields(HybridTrainingConfig)
            if (kind := _scalar_kind(f.type)) is not None and f.name != "max_steps"}   # --max_steps is the sweep's


def option_fields() -> dict[str, type]:
    """TrainOptions fields a sweep may search or fix (a new option appears here by itself) -> their type."""
    config = config_fields()
    return {f.name: kind for f in dataclasses.fields(TrainOptions)
            if (kind := _scalar_kind(f.type)) is not None and f.name not in SWEEP_OWNED
            and f.name not in CONFIG_ALIASES and f.name not in config}


def searchable_fields() -> dict[str, type]:
    """Every name a sweep may search or fix -> the type of its values."""
    return {**config_fields(), **option_fields()}


# -- the search space --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched field: a numeric range (float or int, optionally log-uniform) or a list of choices."""
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def extremes(self) -> list:
        """The values validation must accept: every choice, or both ends of the range."""
        if self.choices:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.integer else [float(self.low), float(self.high)]

    def spec(self) -> str:
        """The `--param` text of this parameter (what the study stores, so other workers can join)."""
        if self.choices:
            return f"{self.name}=" + ",".join(_text(c) for c in self.choices)
        low, high = (int(self.low), int(self.high)) if self.integer else (self.low, self.high)
        return f"{self.name}={low:g}:{high:g}" + (":log" if self.log else "")


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def parse_param(text: str) -> Param:
    """`name=low:high[:log]` or `name=a,b,c` -> Param; SweepError names what is wrong."""
    name, sep, body = text.partition("=")
    name, body = name.strip(), body.strip()
    fields = searchable_fields()
    if not sep or not body:
        raise SweepError(f"--param {text!r} is invalid: write NAME=LOW:HIGH[:log] or NAME=A,B,C")
    if name not in fields:
        alias = CONFIG_ALIASES.get(name)
        hint = f" (search it as {alias})" if alias else ""
        raise SweepError(f"--param {name!r} is not searchable{hint}: use a HybridTrainingConfig field or one of "
                         f"{', '.join(option_fields())}")
    kind = fields[name]
    if "," in body or kind in (bool, str):
        values = [v.strip() for v in body.split(",") if v.strip()]
        try:
            choices = tuple(_choice(kind, v) for v in values)
        except ValueError:
            raise SweepError(f"--param {text!r} is invalid: {name} takes {kind.__name__} values") from None
        if not choices:
            raise SweepError(f"--param {text!r} is invalid: give at least one value")
        return Param(name, choices=tuple(dict.fromkeys(choices)))
    parts = body.split(":")
    log = len(parts) == 3 and parts[2].strip().lower() == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise SweepError(f"--param {text!r} is invalid: a range is LOW:HIGH or LOW:HIGH:log")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise SweepError(f"--param {text!r} is invalid: LOW and HIGH must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SweepError(f"--param {text!r} is invalid: it needs finite LOW < HIGH")
    if log and low <= 0:
        raise SweepError(f"--param {text!r} is invalid: a log-uniform range needs LOW > 0")
    if kind is int and not (low.is_integer() and high.is_integer()):
        raise SweepError(f"--param {text!r} is invalid: {name} is an integer field")
    return Param(name, low=low, high=high, log=log, integer=kind is int)


def parse_params(texts: list[str]) -> list[Param]:
    """Every `--param`, each name at most once."""
    params = [parse_param(t) for t in texts]
    seen: set[str] = set()
    for param in params:
        if param.name in seen:
            raise SweepError(f"--param {param.name} is given twice: give each field one range or one list")
        seen.add(param.name)
    return params


def _choice(kind: type, text: str) -> Any:
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return lowered in ("true", "1")
    if kind is str:
        return text
    value = float(text)
    if kind is int:
        if not value.is_integer():
            raise ValueError(text)
        return int(value)
    return value


# -- a sweep: what it searches and how each trial runs ---------------------------------------------------------------
@dataclass
class SweepSpec:
    name: str
    params: list[Param]
    objective: str = "final_val_loss"
    target: float | None = None            # steps_to_target only
    preset: str = "tiny"
    max_steps: int = 30
    eval_every: int = 1                    # epochs between evaluations (tiny: an epoch is 10 steps)
    base_config: dict = field(default_factory=dict)    # fixed HybridTrainingConfig fields
    base_options: dict = field(default_factory=lambda: {"hybrid": True})   # fixed TrainOptions fields
    pruning: bool = True

    def validate(self) -> None:
        """The whole sweep, before any trial: its settings, the base options, and the options of every range's
        two ends and every choice — each built into a real TrainOptions and checked as the CLI checks it."""
        if not self.name or len(self.name) > MAX_NAME_CHARS or \
                not all(c.isalnum() or c in "-_." for c in self.name):
            raise SweepError(f"--name {self.name[:MAX_NAME_CHARS]!r} is invalid: use 1–{MAX_NAME_CHARS} letters, "
                             "digits, - _ .")
        if not self.params:
            raise SweepError("nothing to search: give at least one --param")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise SweepError(f"--param {duplicate} is given twice: give each field one range or one list")
        if self.objective not in OBJECTIVES:
            raise SweepError(f"--objective {self.objective!r} is invalid: it must be one of {', '.join(OBJECTIVES)}")
        if self.objective == "steps_to_target" and not _finite(self.target):
            raise SweepError("--objective steps_to_target needs --target V (a finite validation loss)")
        if self.target is not None and not _finite(self.target):
            raise SweepError(f"--target {self.target!r} is invalid: it must be a finite validation loss")
        if self.preset not in PRESETS:
            raise SweepError(f"--preset {self.preset!r} is invalid: it must be one of {', '.join(PRESETS)}")
        if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 1:
            raise SweepError(f"--eval_every {self.eval_every!r} is invalid: it must be an integer ≥ 1")
        fields = searchable_fields()
        unknown = sorted((set(self.base_options) | set(self.base_config)) - set(fields) - {"report_to"})
        if unknown:
            raise SweepError(f"--set {unknown[0]} is not a field a sweep can set: use a HybridTrainingConfig field "
                             f"or one of {', '.join(option_fields())}")
        self._check({}, "the sweep's base options")
        for param in self.params:
            self.check_param(param)
        self._check({p.name: p.extremes()[0] for p in self.params}, "every range at its low end together")
        self._check({p.name: p.extremes()[-1] for p in self.params}, "every range at its high end together")

    def check_param(self, param: Param) -> None:
        """Every choice, or both ends of the range, as a trial of this sweep would run it (the CLI's bounds); also
        the workbench's Sweep form's check of each field as it is typed."""
        for value in param.extremes():
            where = f"--param {param.spec()}" + ("" if param.choices else
                                                 f" at its {'low' if value == param.extremes()[0] else 'high'} end")
            self._check({param.name: value}, where)

    def _check(self, values: dict, where: str) -> None:
        try:
            options = self.trial_options(values)
            problems = options.errors()
            if problems:
                raise OptionsError(next(iter(problems.values())))
            config = options.hybrid_training_config()
            preset = get_preset(self.preset)
            check_batch_memory(config.batch_size, options.seq_len or preset.seq_len, preset, options.student_size)
        except (ConfigError, OptionsError, TypeError, ValueError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SweepError(f"{where}: {message}") from None

    def trial_config(self, values: dict) -> HybridTrainingConfig:
        """The trial's HybridTrainingConfig: defaults, the sweep's fixed fields, then the trial's values."""
        config_names = config_fields()
        config = {**HybridTrainingConfig().to_dict(), **self.base_config, "max_steps": self.max_steps}
        config.update({k: v for k, v in values.items() if k in config_names})
        return HybridTrainingConfig.from_dict(config)

    def trial_options(self, values: dict, run_id: str | None = None, runs_root: Path | str | None = None,
                      run_name: str | None = None) -> TrainOptions:
        """The trial's one options document: the sweep's base options + the trial's values, with the config
        embedded. Config fields the CLI also has as flags carry the config's value, so the CLI's bounds apply."""
        config = self.trial_config(values)
        option_names = option_fields()
        quantized = bool(config.use_quantization)
        document = {
            **{k: v for k, v in self.base_options.items() if k in option_names},
            **{k: v for k, v in values.items() if k in option_names},
            "preset": self.preset, "max_steps": self.max_steps, "eval_every": self.eval_every, "seed": config.seed,
            "qat": quantized, "ternary": quantized and config.target_bits == 1.58,
            "bits": config.target_bits if quantized else None, "lr": config.base_learning_rate,
            "weight_decay": config.weight_decay, "batch_size": config.batch_size,
            "data_clusters": config.data_clusters, "param_clusters": config.parameter_clusters,
            "trust_region_mode": config.trust_region_mode, "precision_budget": config.precision_budget,
            "hybrid_config": config, "run_id": run_id, "runs_root": None if runs_root is None else str(runs_root),
            "run_name": run_name, "tags": [sweep_tag(self.name)], "quiet": True, "progress": False,
            "report_to": list(self.base_options.get("report_to") or []),     # --report_to: every trial reports
        }
        return TrainOptions(**document)

    def to_attrs(self) -> dict:
        """What the study keeps so that a worker on another machine runs the same sweep."""
        data = dataclasses.asdict(self)
        data["params"] = [p.spec() for p in self.params]
        return data

    @classmethod
    def from_attrs(cls, data: dict) -> "SweepSpec":
        data = dict(data)
        data["params"] = [parse_param(p) for p in data.get("params", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def default_storage(runs_root: Path) -> str:
    return f"sqlite:///{Path(runs_root).expanduser().resolve() / STORAGE_NAME}"


def sweep_tag(name: str) -> str:
    return f"{SWEEP_TAG_PREFIX}{name}"


def objective_value(spec: SweepSpec, evals: list[tuple[int, float]], steps_done: int) -> float | None:
    """The trial's objective from its (step, val_loss) evaluations; None when it has none."""
    losses = [(step, value) for step, value in evals if value is not None and math.isfinite(value)]
    if not losses:
        return None
    if spec.objective == "final_val_loss":
        return losses[-1][1]
    if spec.objective == "best_val_loss":
        return min(value for _, value in losses)
    hit = next((step for step, value in losses if value <= spec.target), None)
    return float(hit) if hit is not None else float(2 * max(steps_done, spec.max_steps))


# -- the storage ----------------------------------------------------------------------------------------------------
SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL"}


def _url(storage: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage)
    except (ArgumentError, ValueError, TypeError):
        raise SweepError(f"--storage {storage[:200]!r} is not a database URL: use sqlite:///PATH/sweeps.db, "
                         "postgresql://USER:PW@HOST/DB or mysql://USER:PW@HOST/DB") from None


def sqlite_path(storage: str) -> Path | None:
    """The file of an SQLite storage URL (None for other databases)."""
    url = _url(storage)
    return Path(url.database).expanduser() if url.get_backend_name() == "sqlite" and url.database else None


def check_storage(storage: str) -> None:
    """Refuse, in one line, a storage the sweep could not use — before anything is created or started: not a URL,
    an SQLite file in a missing folder, a file that is not an SQLite database or is damaged, a database server
    that does not answer within a few seconds, a missing driver. Writes nothing."""
    url = _url(storage)
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise SweepError(f"--storage {shown}: an in-memory database cannot be shared by workers; give a file, "
                             "e.g. sqlite:///runs/sweeps.db")
        path = Path(url.database).expanduser()
        if not path.parent.is_dir():
            raise SweepError(f"--storage {shown}: the folder {path.parent} does not exist")
        if path.exists():
            _check_sqlite_file(path, shown)
        return
    if backend not in DEFAULT_PORTS:
        raise SweepError(f"--storage {shown}: {backend!r} databases are not supported: use sqlite, postgresql or "
                         "mysql")
    host, port = url.host or "localhost", url.port or DEFAULT_PORTS[backend]
    if not host.startswith("/"):
        try:
            socket.create_connection((host, port), timeout=STORAGE_PROBE_S).close()
        except OSError as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise SweepError(f"--storage {shown}: cannot reach the {backend} server at {host}:{port} ({reason})") \
                from None
    try:
        url.get_dialect().import_dbapi()
    except ImportError:
        raise SweepError(f"--storage {shown}: the {backend} driver is not installed "
                         f"(pip install {DRIVERS[backend]})") from None


def _check_sqlite_file(path: Path, shown: str) -> None:
    if not path.is_file():
        raise SweepError(f"--storage {shown}: {path} is not a file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise SweepError(f"--storage {shown}: {path} cannot be read ({exc.strerror or exc})") from None
    if not head:
        return                                  # empty: SQLite makes it a database
    if head != SQLITE_MAGIC:
        raise SweepError(f"--storage {shown}: {path} is not an SQLite database")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SweepError(f"--storage {shown}: {path} is damaged ({exc}); move it aside or use another "
                         "--storage") from None
    if not result or result[0] != "ok":
        raise SweepError(f"--storage {shown}: {path} is damaged (integrity check: {result[0] if result else '?'}); "
                         "move it aside or use another --storage")
    if tables and "studies" not in tables:      # e.g. the run store's runs.db: never add Optuna's tables to it
        raise SweepError(f"--storage {shown}: {path} is another program's SQLite database (no Optuna studies in "
                         "it); give a new file or an Optuna storage")


@contextlib.contextmanager
def storage_lock(storage: str):
    """An exclusive lock beside an SQLite storage while the schema, the study and its settings are created (two
    workers started at the same instant on a new sweeps.db otherwise race in Optuna's table creation). SQLite RDB
    rather than JournalStorage for the local default: only RDBStorage has heartbeats (failing and retrying the
    trials of a dead worker), and the workbench and optuna-dashboard read the same sweeps.db file."""
    path = sqlite_path(storage)
    if path is None:
        yield
        return
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_storage(storage: str):
    """Optuna's RDBStorage with heartbeats and a retry of stale trials. Call inside `storage_lock`."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite_path(storage) else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, heartbeat_stale_trial_callback=retry)
        except SQLAlchemyError as exc:
            # A shared server's schema created by two workers at once: the loser retries and finds it made.
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise SweepError(f"--storage {_url(storage).render_as_string(hide_password=True)}: cannot be "
                                 f"opened ({str(exc).splitlines()[0]})") from None
            time.sleep(0.5 + random.random())
        except (RuntimeError, ValueError) as exc:        # e.g. a schema from another Optuna version
            raise SweepError(f"--storage {_url(storage).render_as_string(hide_password=True)}: "
                             f"{str(exc).splitlines()[0]}") from None


def stored_spec(storage: str, name: str) -> SweepSpec | None:
    """The spec of an existing sweep of that name (None when there is none). Reads only."""
    import optuna

    path = sqlite_path(storage)
    if path is not None and (not path.exists() or path.stat().st_size == 0):
        return None                 # do not create the file just by looking
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        summaries = optuna.study.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as exc:        # noqa: BLE001 - any storage failure is one line
        raise SweepError(f"--storage {_url(storage).render_as_string(hide_password=True)}: cannot be read "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for summary in summaries:
        if summary.study_name == name:
            data = summary.user_attrs.get("spec")
            return SweepSpec.from_attrs(data) if data else None
    return None


JOIN_CHECKED = ("objective", "target", "max_steps", "preset", "eval_every", "pruning")


def join_conflicts(stored: SweepSpec, spec: SweepSpec, given: set[str]) -> str | None:
    """Why `spec` (with the flags in `given` set explicitly) cannot join the stored sweep, or None."""
    if "param" in given and [p.spec() for p in spec.params] != [p.spec() for p in stored.params]:
        return (f"sweep {stored.name!r} already exists with another search space "
                f"({'; '.join(p.spec() for p in stored.params)}); leave --param out to join it, or choose another "
                "--name")
    for name in JOIN_CHECKED:
        if name in given and getattr(spec, name) != getattr(stored, name):
            flag = "--no_pruning" if name == "pruning" else f"--{name}"
            return (f"{flag} {getattr(spec, name)} differs from sweep {stored.name!r}'s {name} "
                    f"{getattr(stored, name)}; a sweep keeps its settings: leave {flag} out to join it, or choose "
                    "another --name")
    def fixed(s: SweepSpec) -> tuple:            # --report_to is this worker's own (see main)
        return s.base_config, {k: v for k, v in s.base_options.items() if k != "report_to"}

    if "set" in given and fixed(spec) != fixed(stored):
        return (f"--set differs from sweep {stored.name!r}'s fixed values "
                f"{json.dumps({**stored.base_options, **stored.base_config}, default=str)}; leave --set out to "
                "join it, or choose another --name")
    return None


# -- running one trial --------------------------------------------------------------------------------------------
class _Stopping:
    """Set by SIGTERM / SIGINT: no new trials; running trials get a stop request."""
    event = threading.Event()


class TrialFailed(RuntimeError):
    pass


def _process_started(pid: int) -> float | None:
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:               # noqa: BLE001 - gone, or no psutil: unknown
        return None


def failure_reason(store: RunStore, run: dict, code: int | None) -> str:
    """The trainer's own one-line error for a failed run: its `error:` line on stderr, else the store's error."""
    lines = launch_tail(Path(run["run_dir"]) / launch.STDERR_NAME).splitlines()
    said = [line.strip() for line in lines if line.strip().startswith("error:")]
    if said:
        return said[-1]
    if run.get("error"):
        return str(run["error"]).strip().splitlines()[-1]
    last = [line.strip() for line in lines if line.strip()]
    return last[-1] if last else f"the training process exited with code {code}"


def launch_tail(path: Path, max_bytes: int = 8000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def run_trial(trial, spec: SweepSpec, runs_root: Path, poll_s: float = POLL_S) -> float:
    import optuna

    values = {p.name: p.suggest(trial) for p in spec.params}
    store = RunStore(runs_root, create=True)
    config = spec.trial_config(values)
    run_name = f"{spec.name}-{trial.number}"
    run_id = store.create_run(config.to_dict(), {}, spec.preset, name=run_name, tags=[sweep_tag(spec.name)],
                              status="queued", total_steps=spec.max_steps)
    if trial.user_attrs.get("error"):            # a retry of a lost trial starts with that trial's attributes
        trial.set_user_attr("retried_error", trial.user_attrs["error"])
        trial.set_user_attr("error", None)
    trial.set_user_attr("run_id", run_id)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("worker_pid", os.getpid())
    trial.set_user_attr("worker_started", _process_started(os.getpid()))
    options = spec.trial_options(values, run_id=run_id, runs_root=store.root, run_name=run_name)
    run_dir = store.run_dir(run_id)
    document = options.to_dict()       # the config embedded: one options.json
    store.update_run(run_id, args={"options": document,
                                   "sweep": {"name": spec.name, "trial": trial.number, "params": values}})
    try:
        proc = launch.spawn(document, run_dir, die_with_parent=True)
    except OSError as exc:
        store.set_status(run_id, "failed", f"could not start the training process: {exc}")
        trial.set_user_attr("error", f"could not start the training process: {exc}")
        raise TrialFailed(f"could not start the training process: {exc}") from None
    store.update_run(run_id, pid=proc.pid, host=socket.gethostname())
    reported: list[tuple[int, float]] = []
    last_step, pruned, stop_sent = -1, False, None
    try:
        while True:
            code = proc.poll()
            evals = store.read_evals(run_id, after_step=last_step)      # rows, step-ordered
            for row in evals:
                if row["key"] != PRUNE_METRIC:
                    continue
                step, value = int(row["step"]), float("nan") if row["value"] is None else float(row["value"])
                reported.append((step, value))
                if spec.pruning and not pruned and math.isfinite(value):
                    trial.report(value, step)
                    if trial.should_prune():
                        pruned = True
                        store.request_stop(run_id)
            if len(evals):
                last_step = max(evals.column("step"))
            if code is not None:
                break
            if _Stopping.event.is_set():
                if stop_sent is None:
                    store.request_stop(run_id)
                    stop_sent = time.monotonic()
                elif time.monotonic() - stop_sent > launch.STOP_GRACE_S:
                    launch.stop_group(proc, grace_s=5.0)            # it did not honour the request in time
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:       # an exception in this loop: the trial's process does not outlive it
            launch.stop_group(proc, grace_s=5.0)
        launch.forget(proc)
    run = store.get_run(run_id)
    if run["status"] in ACTIVE_STATUSES:       # it died before reporting (e.g. bad input, exit 2)
        store.set_status(run_id, "failed", failure_reason(store, run, code))
        run = store.get_run(run_id)
    value = objective_value(spec, reported, int(run.get("step") or 0))
    if pruned:
        store.set_tags(run_id, [sweep_tag(spec.name), PRUNED_TAG])
        raise optuna.TrialPruned(f"pruned at step {reported[-1][0]} (val_loss {reported[-1][1]:.4f})")
    if run["status"] != "finished" or value is None:
        reason = failure_reason(store, run, code)
        trial.set_user_attr("error", reason)
        raise TrialFailed(f"run {run_id} ended {run['status']} (exit code {code}): {reason}")
    trial.set_user_attr("val_loss", reported[-1][1])
    return value


# -- the study ----------------------------------------------------------------------------------------------------
def recover_lost_trials(study, runs_root: Path | None, log=print) -> list[int]:
    """RUNNING trials started on this host by a sweep process that is gone (kill -9, a crash): fail them, retry them
    once (the heartbeat's own callback), end their training process if it still runs and mark their run failed.
    Trials of other hosts are left to the heartbeat's grace period. Returns the numbers of the trials failed."""
    import optuna

    storage = study._storage
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or not attrs.get("worker_pid"):
            continue
        pid = int(attrs["worker_pid"])
        started = _process_started(pid)
        if started is not None and (attrs.get("worker_started") is None
                                    or abs(started - float(attrs["worker_started"])) < 1.0):
            continue                                    # its worker is alive: not lost
        run_id = attrs.get("run_id")
        reason = f"lost: its sweep process {pid} died while the trial ran"
        if run_id and runs_root is not None:
            _end_lost_run(runs_root, run_id, reason)
        try:
            storage.set_trial_user_attr(trial._trial_id, "error", reason)
            if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue                                    # another worker got there first
        callback = storage.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study, storage.get_trial(trial._trial_id))
        failed.append(trial.number)
        log(f"trial {trial.number} failed: {reason} (run {run_id}); retried with the same values")
    return failed


def _end_lost_run(runs_root: Path, run_id: str, reason: str) -> None:
    try:
        store = RunStore(runs_root, create=False)
        run = store.get_run(run_id)
    except (StoreError, ValueError):
        return
    if run.get("host") in (None, socket.gethostname()):
        launch.kill_run_process(run.get("pid"), run_id)        # the orphan, if the death signal missed it
    run = store.get_run(run_id)
    if run["status"] in ACTIVE_STATUSES:
        store.set_status(run_id, "failed", reason)


def open_study(spec: SweepSpec | None, storage: str, name: str, seed: int | None = None,
               given: set[str] | None = None, runs_root: Path | None = None, log=print):
    """Create the study (or join the existing one of that name); returns (study, spec as the study stores it).
    Creation, the settings check and the recovery of lost trials run under the storage's lock."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = optuna.samplers.TPESampler(seed=seed)
    # Startup trials: with few trials the pruner only prunes when others have finished; warmup: never before the
    # first evaluation has been compared.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    with storage_lock(storage):
        rdb = open_storage(storage)
        study = optuna.create_study(study_name=name, storage=rdb, direction="minimize", sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        stored = study.user_attrs.get("spec")
        if stored:
            stored_spec_ = SweepSpec.from_attrs(stored)
            if spec is not None:
                conflict = join_conflicts(stored_spec_, spec, {"param", "set", *JOIN_CHECKED}
                                          if given is None else given)
                if conflict:
                    raise SweepError(conflict)
                if "report_to" in spec.base_options:      # this worker's own reporting
                    stored_spec_.base_options["report_to"] = spec.base_options["report_to"]
            spec = stored_spec_
        elif spec is None:
            raise SweepError(f"sweep {name!r} does not exist in {storage}; give --param ranges to start it")
        else:
            study.set_user_attr("spec", spec.to_attrs())
            study.set_user_attr("created_at", time.time())
        recover_lost_trials(study, runs_root, log=log)
    return study, spec


def best_trial(study):
    """The best completed trial, or None."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    return min(done, key=lambda t: t.value) if done else None


def run_sweep(spec: SweepSpec | None, trials: int, name: str, runs_root: Path, storage: str | None = None,
              workers: int = 1, seed: int | None = None, log=print, given: set[str] | None = None):
    """Run `trials` trials (in `workers` parallel threads, each driving one training process); returns the study."""
    import optuna

    runs_root = Path(runs_root).expanduser()
    RunStore(runs_root, create=True)
    storage = storage or default_storage(runs_root)
    study, spec = open_study(spec, storage, name, seed=seed, given=given, runs_root=runs_root, log=log)
    spec.validate()
    log(f"sweep {name}: {trials} trial(s), {workers} worker(s), objective {OBJECTIVE_LABELS[spec.objective]}, "
        f"storage {_url(storage).render_as_string(hide_password=True)}, runs root {runs_root}")

    def objective(trial) -> float:
        if _Stopping.event.is_set():
            study.stop()
            raise optuna.TrialPruned("the sweep was stopped")
        return run_trial(trial, spec, runs_root)

    def report(study, trial) -> None:
        params = json.dumps(trial.params, default=str)
        if trial.state == optuna.trial.TrialState.FAIL:      # the trainer's own one-line reason
            log(f"trial {trial.number} failed: run {trial.user_attrs.get('run_id')} params {params}: "
                f"{trial.user_attrs.get('error', 'no reason recorded')}")
            return
        value = "—" if trial.value is None else f"{trial.value:.6g}"
        log(f"trial {trial.number} {trial.state.name.lower()}: run {trial.user_attrs.get('run_id')} value {value} "
            f"params {params}")

    study.optimize(objective, n_trials=trials, n_jobs=workers, catch=(TrialFailed,), callbacks=[report])
    return study


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    from .progname import command_name
    p = Parser(prog=command_name("hybrid_optimization.sweep"), description=__doc__.split("\n\n")[0],
               epilog="See the module docstring (python -m pydoc hybrid_optimization.sweep) for the full story.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the sweep (Optuna study) name; the same name joins a sweep")
    p.add_argument("--trials", type=int, required=True, help=f"trials this worker runs (1–{MAX_TRIALS:,})")
    p.add_argument("--param", action="append", default=[], metavar="SPEC",
                   help="NAME=LOW:HIGH[:log] or NAME=A,B,C (repeatable); default: " + " ".join(DEFAULT_SPACE))
    # Settings default to None so that a worker joining a sweep can tell "not given" from a different value.
    p.add_argument("--objective", help=f"one of {', '.join(OBJECTIVES)} (final_val_loss)")
    p.add_argument("--target", type=float, help="target validation loss of --objective steps_to_target")
    p.add_argument("--preset", help="the training preset (tiny, smollm2; default tiny)")
    p.add_argument("--max_steps", type=int, help="steps per trial (30)")
    p.add_argument("--eval_every", type=int, help="epochs between evaluations, i.e. pruning points (1)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a fixed config field or pipeline option for every trial (repeatable), e.g. "
                        "--set hybrid=false --set target_bits=1.58")
    p.add_argument("--report_to", metavar="A,B", help="every trial also reports to: tensorboard, mlflow (this "
                                                    "worker's trials)")
    p.add_argument("--workers", type=int, default=1, help=f"trials run in parallel on this machine (1–{MAX_WORKERS})")
    p.add_argument("--no_pruning", dest="pruning", action="store_const", const=False, help="never prune")
    p.add_argument("--storage", help="Optuna RDB URL shared by all workers (default sqlite:///<runs root>/sweeps.db)")
    p.add_argument("--runs_root", help="run store folder (default $HYBRID_RUNS_ROOT or ~/.cache/hybrid-workbench/runs)")
    p.add_argument("--seed", type=int, help=f"sampler seed in [0, {MAX_SEED}] (reproducible suggestions on one "
                                            "worker)")
    return p


def fixed_values(items: list[str]) -> tuple[dict, dict]:
    """`--set NAME=VALUE` items -> (fixed config fields, fixed TrainOptions fields), values typed ("false" -> False);
    SweepError names a bad or repeated item."""
    config, options = {}, {}
    fields, config_names = searchable_fields(), config_fields()
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            alias = CONFIG_ALIASES.get(name)
            hint = f" (set it as {alias})" if alias else ""
            raise SweepError(f"--set {item!r} is invalid{hint}: write NAME=VALUE with a config field or one of "
                             f"{', '.join(option_fields())}")
        if name in config or name in options:
            raise SweepError(f"--set {name} is given twice: give each field one value")
        try:
            value = None if text.strip().lower() in ("", "none") else _choice(fields[name], text.strip())
        except ValueError:
            raise SweepError(f"--set {item!r} is invalid: {name} takes {fields[name].__name__} values") from None
        (config if name in config_names else options)[name] = value
    return config, options


def _check_int(flag: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise SweepError(f"{flag} {value} is invalid: it must be an integer in [{low}, {high:,}]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {name for name in ("objective", "target", "preset", "max_steps", "eval_every", "pruning")
             if getattr(args, name) is not None}
    given |= {name for name in ("param", "set") if getattr(args, name)}
    try:
        _check_int("--trials", args.trials, 1, MAX_TRIALS)
        _check_int("--workers", args.workers, 1, MAX_WORKERS)
        _check_int("--seed", args.seed, 0, MAX_SEED)
        if args.runs_root is not None and not args.runs_root.strip():
            raise SweepError("--runs_root '' is invalid: give a folder")
        runs_root = Path(args.runs_root).expanduser() if args.runs_root else default_runs_root()
        if runs_root.exists() and not runs_root.is_dir():
            raise SweepError(f"--runs_root {runs_root}: is a file, not a folder")
        config, options = fixed_values(args.set)
        if args.report_to is not None:
            options["report_to"] = list(parse_report_to(args.report_to))
        params = parse_params(args.param)
        spec = SweepSpec(name=args.name, params=params or [parse_param(p) for p in DEFAULT_SPACE],
                         objective=args.objective or "final_val_loss", target=args.target,
                         preset=args.preset or "tiny", max_steps=30 if args.max_steps is None else args.max_steps,
                         eval_every=1 if args.eval_every is None else args.eval_every, base_config=config,
                         base_options={"hybrid": True, **options},
                         pruning=True if args.pruning is None else args.pruning)
        storage = args.storage or default_storage(runs_root)
        check_storage(storage)
        stored = stored_spec(storage, args.name)
        if stored is not None:                  # joining: the study's settings rule, a different one is refused
            conflict = join_conflicts(stored, spec, given)
            if conflict:
                raise SweepError(conflict)
            if args.report_to is not None:      # where this worker's trials report is its own choice
                stored.base_options = {**stored.base_options, "report_to": options["report_to"]}
            spec = stored
        spec.validate()
    except (SweepError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc} (pip install -r requirements.txt)", file=sys.stderr)
        return 2

    def stop(signum, frame):
        if _Stopping.event.is_set():            # a second signal: do not wait for the trials
            print(f"signal {signum} again: ending the running trials now", file=sys.stderr, flush=True)
            launch.stop_children(grace_s=2.0)
            os._exit(143)
        print(f"signal {signum}: finishing — running trials get a stop request", file=sys.stderr, flush=True)
        _Stopping.event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.excepthook = _thread_error
    try:
        study = run_sweep(spec, args.trials, args.name, runs_root, storage, args.workers, args.seed,
                          log=lambda m: print(m, flush=True), given=given)
    except (SweepError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:        # noqa: BLE001 - the storage failed mid-sweep (disk full, server gone): one line
        reason = storage_failure(exc)
        if reason is None:
            raise
        launch.stop_children(grace_s=launch.STOP_GRACE_S)
        print(f"error: sweep {args.name}: the storage {_url(storage).render_as_string(hide_password=True)} failed "
              f"({reason}); finished trials are kept, rerun the command to continue", file=sys.stderr)
        return 1
    best = best_trial(study)
    if best is None:
        import optuna
        failed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
                  if t.user_attrs.get("error")]
        reason = f"; the last failure: {failed[-1].user_attrs['error']}" if failed else ""
        print(f"sweep {args.name}: no trial completed{reason}", file=sys.stderr)
        return 143 if _Stopping.event.is_set() else 1
    print(f"best trial {best.number}: run_id={best.user_attrs.get('run_id')} value={best.value:.6g} "
          f"params={json.dumps(best.params, default=str)}", flush=True)
    return 143 if _Stopping.event.is_set() else 0


def storage_failure(exc: BaseException) -> str | None:
    """The innermost storage error in an exception's chain (Optuna wraps a full disk in StorageInternalError, and
    may raise an AssertionError while handling it) as one line; None when the storage is not the cause."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (SQLAlchemyError, sqlite3.Error, OSError, optuna.exceptions.StorageInternalError)):
            found = exc
        exc = exc.__cause__ or exc.__context__
    if found is None:
        return None
    text = str(getattr(found, "orig", None) or found).strip()
    return text.splitlines()[0] if text else type(found).__name__


_THREAD_ERRORS: set[str] = set()


def _thread_error(args) -> None:
    """A storage failure in Optuna's heartbeat thread is one line (once), not a traceback; the sweep's own next
    write reports it and ends."""
    reason = storage_failure(args.exc_value) if args.exc_value is not None else None
    if reason is None:
        sys.__excepthook__(args.exc_type, args.exc_value, args.exc_traceback)
        return
    if reason not in _THREAD_ERRORS:
        _THREAD_ERRORS.add(reason)
        print(f"error: the sweep's heartbeat could not be written ({reason})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
