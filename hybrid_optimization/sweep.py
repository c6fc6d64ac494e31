"""Hyperparameter sweeps over the hybrid config: `python -m hybrid_optimization.sweep --name NAME --trials N`.

Optuna samples (TPE) and prunes (median pruner). Every trial is an ordinary training run: the sweep creates its
record in the run store (tagged `sweep:NAME`), starts the training CLI on it as a child process and watches the
evaluations that run writes to the store; each evaluation's validation loss is reported to Optuna, and a trial the
median pruner stops gets a stop request (the trainer ends at its next step, status "stopped", tag "pruned").

The study lives in an Optuna RDB storage: by default the SQLite file `<runs root>/sweeps.db`; `--storage URL`
points workers on several machines at one shared PostgreSQL / MySQL database. A second worker joins a running
sweep with the same `--name` and `--storage` (its search space, objective and base config come from the study):

    python -m hybrid_optimization.sweep --name lr-search --trials 10 --storage postgresql://user:pw@db-host/optuna

Search space (`--param`, repeatable; names are HybridTrainingConfig fields or pipeline options):
    --param base_learning_rate=1e-4:1e-2:log     a float range, log-uniform (use it for rates)
    --param data_clusters=2:16                   an integer range (integers when both bounds are)
    --param target_bits=1,1.58,2                 a choice; true,false for switches
Objective (`--objective`): final_val_loss (default), best_val_loss, or steps_to_target with `--target V` (the
first evaluated step whose validation loss is ≤ V; a trial that never gets there counts as 2 × its steps).

Exit codes: 0 done (prints the best trial's run id and value), 1 no trial completed, 2 bad input (one line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, HybridTrainingConfig
from .tracking import RunStore, StoreError, default_runs_root

OBJECTIVES = ("final_val_loss", "best_val_loss", "steps_to_target")
OBJECTIVE_LABELS = {"final_val_loss": "final validation loss", "best_val_loss": "best validation loss",
                    "steps_to_target": "steps to the target validation loss"}
PRUNE_METRIC = "val_loss"          # the evaluation the median pruner compares across trials
STORAGE_NAME = "sweeps.db"
SWEEP_TAG_PREFIX = "sweep:"
PRUNED_TAG = "pruned"
# Pipeline options a sweep may search besides HybridTrainingConfig fields: name -> kind of values.
OPTION_KINDS = {"hybrid": bool, "alpha": float, "temperature": float, "seq_len": int, "cluster_batches": str,
                "student_size": str, "embedder": str}
# Sensible ranges the Sweep page offers first (log-uniform for rates).
DEFAULT_SPACE = ("base_learning_rate=1e-4:1e-2:log", "initial_trust_radius=1e-3:1:log",
                 "auxiliary_nn_learning_rate=1e-5:1e-2:log")
POLL_S = 0.5


class SweepError(ValueError):
    """Bad sweep input (a range, a field name, an objective); the message names it and what is allowed."""


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

    def spec(self) -> str:
        """The `--param` text of this parameter (what the study stores, so other workers can join)."""
        if self.choices:
            return f"{self.name}=" + ",".join(_text(c) for c in self.choices)
        low, high = (int(self.low), int(self.high)) if self.integer else (self.low, self.high)
        return f"{self.name}={low:g}:{high:g}" + (":log" if self.log else "")


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def searchable_fields() -> dict[str, type]:
    """Every name a sweep may search -> the type of its values."""
    defaults = HybridTrainingConfig().to_dict()
    kinds = {name: (float if name == "precision_budget" else type(value)) for name, value in defaults.items()}
    return {**kinds, **OPTION_KINDS}


def parse_param(text: str) -> Param:
    """`name=low:high[:log]` or `name=a,b,c` -> Param; SweepError names what is wrong."""
    name, sep, body = text.partition("=")
    name, body = name.strip(), body.strip()
    fields = searchable_fields()
    if not sep or not body:
        raise SweepError(f"--param {text!r} is invalid: write NAME=LOW:HIGH[:log] or NAME=A,B,C")
    if name not in fields:
        raise SweepError(f"--param {name!r} is not searchable: use a HybridTrainingConfig field or one of "
                         f"{', '.join(OPTION_KINDS)}")
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


def _choice(kind: type, text: str) -> Any:
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return lowered in ("true", "1")
    if kind is str:
        return text
    value = float(text)
    return int(value) if kind is int and value.is_integer() else value


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
    base_options: dict = field(default_factory=lambda: {"hybrid": True})   # fixed pipeline options
    pruning: bool = True

    def validate(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise SweepError(f"--name {self.name!r} is invalid: use letters, digits, - _ .")
        if not self.params:
            raise SweepError("nothing to search: give at least one --param")
        if self.objective not in OBJECTIVES:
            raise SweepError(f"--objective {self.objective!r} is invalid: it must be one of {', '.join(OBJECTIVES)}")
        if self.objective == "steps_to_target" and (self.target is None or not math.isfinite(self.target)):
            raise SweepError("--objective steps_to_target needs --target V (a validation loss)")
        if self.max_steps < 1 or self.eval_every < 1:
            raise SweepError("--max_steps and --eval_every must be integers ≥ 1")
        unknown = sorted(set(self.base_options) - set(OPTION_KINDS))
        if unknown:
            raise SweepError(f"unknown pipeline option(s) {', '.join(unknown)}: allowed {', '.join(OPTION_KINDS)}")
        # The base config with each range's low end must be a valid config (the core's own validation).
        try:
            self.trial_config({p.name: p.choices[0] if p.choices else (int(p.low) if p.integer else p.low)
                               for p in self.params})
        except ConfigError as exc:
            raise SweepError(f"the sweep's config is invalid: {exc}") from None

    def trial_config(self, values: dict) -> HybridTrainingConfig:
        config = {**HybridTrainingConfig().to_dict(), **self.base_config, "max_steps": self.max_steps}
        config.update({k: v for k, v in values.items() if k not in OPTION_KINDS})
        return HybridTrainingConfig.from_dict(config)

    def trial_options(self, values: dict) -> dict:
        return {**self.base_options, **{k: v for k, v in values.items() if k in OPTION_KINDS}}

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


# -- running one trial --------------------------------------------------------------------------------------------
def trial_argv(config_path: Path, options: dict, spec: SweepSpec, config: HybridTrainingConfig, run_id: str,
               runs_root: Path, python: str = sys.executable) -> list[str]:
    """The training CLI's argument list for one trial (config fields in --config, pipeline options as flags)."""
    argv = [python, "-m", "hybrid_optimization.distill", "--preset", spec.preset, "--config", str(config_path),
            "--max_steps", str(spec.max_steps), "--eval_every", str(spec.eval_every), "--seed", str(config.seed)]
    if options.get("hybrid", True):
        argv.append("--hybrid")
    if config.use_quantization:
        argv += ["--qat", "--bits", f"{config.target_bits:g}"]
    for name in ("alpha", "temperature", "seq_len", "cluster_batches", "student_size", "embedder"):
        if options.get(name) is not None:
            argv += [f"--{name}", _text(options[name])]
    argv += ["--run_id", run_id, "--runs_root", str(runs_root), "--quiet", "--no_progress"]
    return argv


class _Stopping:
    """Set by SIGTERM / SIGINT: no new trials; running trials get a stop request."""
    event = threading.Event()


def run_trial(trial, spec: SweepSpec, runs_root: Path, poll_s: float = POLL_S) -> float:
    import optuna

    values = {p.name: p.suggest(trial) for p in spec.params}
    config = spec.trial_config(values)
    options = spec.trial_options(values)
    store = RunStore(runs_root, create=True)
    run_id = store.create_run(config.to_dict(), {}, spec.preset, name=f"{spec.name}-{trial.number}",
                              tags=[sweep_tag(spec.name)], status="queued", total_steps=spec.max_steps)
    trial.set_user_attr("run_id", run_id)
    trial.set_user_attr("host", socket.gethostname())
    config_path = store.run_dir(run_id) / "config.json"
    config_path.write_text(config.to_json())
    argv = trial_argv(config_path, options, spec, config, run_id, store.root)
    store.update_run(run_id, args={"argv": argv, "options": {**options, "preset": spec.preset},
                                   "sweep": {"name": spec.name, "trial": trial.number, "params": values}})
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run_dir = store.run_dir(run_id)
    with open(run_dir / "stdout.log", "ab") as out, open(run_dir / "stderr.log", "ab") as err:
        proc = subprocess.Popen(argv, cwd=str(Path(__file__).resolve().parents[1]), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env, start_new_session=True)
    store.update_run(run_id, pid=proc.pid, host=socket.gethostname())
    reported: list[tuple[int, float]] = []
    last_step, pruned = -1, False
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
        if _Stopping.event.is_set() and code is None:
            store.request_stop(run_id)
        if code is not None:
            break
        time.sleep(poll_s)
    run = store.get_run(run_id)
    value = objective_value(spec, reported, int(run.get("step") or 0))
    if pruned:
        store.set_tags(run_id, [sweep_tag(spec.name), PRUNED_TAG])
        raise optuna.TrialPruned(f"pruned at step {reported[-1][0]} (val_loss {reported[-1][1]:.4f})")
    if run["status"] != "finished" or value is None:
        # The run store keeps the reason (traceback, stderr); the trial just fails.
        raise TrialFailed(f"run {run_id} ended {run['status']} (exit code {code})")
    trial.set_user_attr("val_loss", reported[-1][1])
    return value


class TrialFailed(RuntimeError):
    pass


# -- the study ----------------------------------------------------------------------------------------------------
def open_study(spec: SweepSpec | None, storage: str, name: str, seed: int | None = None):
    """Create the study (or join the existing one of that name); returns (study, spec as the study stores it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed)
    # Startup trials: with few trials the pruner only prunes when others have finished; warmup: never before the
    # first evaluation has been compared.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    stored = study.user_attrs.get("spec")
    if stored:
        stored_spec = SweepSpec.from_attrs(stored)
        if spec is not None and spec.params and [p.spec() for p in spec.params] != stored["params"]:
            raise SweepError(f"sweep {name!r} already exists with another search space "
                             f"({'; '.join(stored['params'])}); choose another --name")
        return study, stored_spec
    if spec is None:
        raise SweepError(f"sweep {name!r} does not exist in {storage}; give --param ranges to start it")
    study.set_user_attr("spec", spec.to_attrs())
    study.set_user_attr("created_at", time.time())
    return study, spec


def best_trial(study):
    """The best completed trial, or None."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    return min(done, key=lambda t: t.value) if done else None


def run_sweep(spec: SweepSpec | None, trials: int, name: str, runs_root: Path, storage: str | None = None,
              workers: int = 1, seed: int | None = None, log=print):
    """Run `trials` trials (in `workers` parallel threads, each driving one training process); returns the study."""
    import optuna

    runs_root = Path(runs_root).expanduser()
    RunStore(runs_root, create=True)
    storage = storage or default_storage(runs_root)
    study, spec = open_study(spec, storage, name, seed=seed)
    spec.validate()
    log(f"sweep {name}: {trials} trial(s), {workers} worker(s), objective {OBJECTIVE_LABELS[spec.objective]}, "
        f"storage {storage}, runs root {runs_root}")

    def objective(trial) -> float:
        if _Stopping.event.is_set():
            study.stop()
            raise optuna.TrialPruned("the sweep was stopped")
        return run_trial(trial, spec, runs_root)

    def report(study, trial) -> None:
        value = "—" if trial.value is None else f"{trial.value:.6g}"
        log(f"trial {trial.number} {trial.state.name.lower()}: run {trial.user_attrs.get('run_id')} value {value} "
            f"params {json.dumps(trial.params, default=str)}")

    study.optimize(objective, n_trials=trials, n_jobs=workers, catch=(TrialFailed,), callbacks=[report])
    return study


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    p = Parser(prog="python -m hybrid_optimization.sweep", description=__doc__.split("\n\n")[0],
               epilog="See the module docstring (python -m pydoc hybrid_optimization.sweep) for the full story.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the sweep (Optuna study) name; the same name joins a sweep")
    p.add_argument("--trials", type=int, required=True, help="trials this worker runs")
    p.add_argument("--param", action="append", default=[], metavar="SPEC",
                   help="NAME=LOW:HIGH[:log] or NAME=A,B,C (repeatable); default: " + " ".join(DEFAULT_SPACE))
    p.add_argument("--objective", default="final_val_loss", help=f"one of {', '.join(OBJECTIVES)}")
    p.add_argument("--target", type=float, help="target validation loss of --objective steps_to_target")
    p.add_argument("--preset", default="tiny", help="the training preset (tiny, smollm2)")
    p.add_argument("--max_steps", type=int, default=30, help="steps per trial (30)")
    p.add_argument("--eval_every", type=int, default=1, help="epochs between evaluations, i.e. pruning points (1)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a fixed config field or pipeline option for every trial (repeatable), e.g. "
                        "--set hybrid=false --set target_bits=1.58")
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel on this machine (1)")
    p.add_argument("--no_pruning", dest="pruning", action="store_false", help="never prune")
    p.add_argument("--storage", help="Optuna RDB URL shared by all workers (default sqlite:///<runs root>/sweeps.db)")
    p.add_argument("--runs_root", help="run store folder (default $HYBRID_RUNS_ROOT or ~/.cache/hybrid-workbench/runs)")
    p.add_argument("--seed", type=int, help="sampler seed (reproducible suggestions on one worker)")
    return p


def _fixed_values(items: list[str]) -> tuple[dict, dict]:
    config, options = {}, {}
    fields = searchable_fields()
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise SweepError(f"--set {item!r} is invalid: write NAME=VALUE with a config field or one of "
                             f"{', '.join(OPTION_KINDS)}")
        try:
            value = None if text.strip().lower() in ("", "none") else _choice(fields[name], text.strip())
        except ValueError:
            raise SweepError(f"--set {item!r} is invalid: {name} takes {fields[name].__name__} values") from None
        (options if name in OPTION_KINDS else config)[name] = value
    return config, options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs_root = Path(args.runs_root).expanduser() if args.runs_root else default_runs_root()
    try:
        if args.trials < 1 or args.workers < 1:
            raise SweepError("--trials and --workers must be integers ≥ 1")
        storage = args.storage or default_storage(runs_root)
        config, options = _fixed_values(args.set)
        params = [parse_param(p) for p in args.param]
        spec = None
        if params or not _study_exists(storage, args.name):
            spec = SweepSpec(name=args.name, params=params or [parse_param(p) for p in DEFAULT_SPACE],
                             objective=args.objective, target=args.target, preset=args.preset,
                             max_steps=args.max_steps, eval_every=args.eval_every, base_config=config,
                             base_options={"hybrid": True, **options}, pruning=args.pruning)
            spec.validate()
    except (SweepError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc} (pip install -r requirements.txt)", file=sys.stderr)
        return 2

    def stop(signum, frame):
        print(f"signal {signum}: finishing — running trials get a stop request", file=sys.stderr, flush=True)
        _Stopping.event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        study = run_sweep(spec, args.trials, args.name, runs_root, storage, args.workers, args.seed,
                          log=lambda m: print(m, flush=True))
    except (SweepError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    best = best_trial(study)
    if best is None:
        print(f"sweep {args.name}: no trial completed", file=sys.stderr)
        return 1
    print(f"best trial {best.number}: run_id={best.user_attrs.get('run_id')} value={best.value:.6g} "
          f"params={json.dumps(best.params, default=str)}", flush=True)
    return 143 if _Stopping.event.is_set() else 0


def _study_exists(storage: str, name: str) -> bool:
    import optuna

    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        return False            # do not create the file just by looking
    try:
        return name in {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    except Exception:   # a storage that cannot be opened is reported by create_study with its own message
        return False


if __name__ == "__main__":
    sys.exit(main())
