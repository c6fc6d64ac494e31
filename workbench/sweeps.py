"""Sweeps for the workbench: start `python -m hybrid_optimization.sweep` in the background, find it again, and read
its Optuna study as tables (no Streamlit here; the Sweep page draws them).

The sweep process runs its trials as ordinary training runs in the run store, so the app may restart while a sweep
goes on: its pid and command line are kept in `<runs root>/sweeps/<name>.json`, its output in `<name>.log`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from hybrid_optimization import schema
from hybrid_optimization import sweep as core
from hybrid_optimization.tracking import pid_alive

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEPS_DIR = "sweeps"
# Fields a user most often searches, first in the picker; rates default to log-uniform ranges.
SUGGESTED = ("base_learning_rate", "initial_trust_radius", "auxiliary_nn_learning_rate", "weight_decay",
             "data_clusters", "parameter_clusters", "target_bits", "use_trust_region", "use_auxiliary_nn",
             "trust_region_mode", "batch_size", "alpha", "temperature", "hybrid")


def default_range(name: str) -> dict:
    """What the page pre-fills for a field: low/high/log for numbers, choices for switches and choices."""
    kind = core.searchable_fields()[name]
    defaults = {"base_learning_rate": (1e-4, 1e-2, True), "initial_trust_radius": (1e-3, 1.0, True),
                "auxiliary_nn_learning_rate": (1e-5, 1e-2, True), "weight_decay": (1e-6, 1e-1, True),
                "data_clusters": (2, 16, False), "parameter_clusters": (1, 8, False), "batch_size": (8, 64, True),
                "alpha": (0.0, 1.0, False), "temperature": (1.0, 4.0, False), "momentum": (0.8, 0.99, False),
                "max_sample_repeats": (1, 8, False), "auxiliary_nn_hidden_size": (8, 128, True)}
    if kind is bool:
        return {"choices": "true,false"}
    if kind is str or name in ("target_bits",):
        menus = {"trust_region_mode": schema.TRUST_REGION_MODES, "base_optimizer": schema.HYBRID_BASES,
                 "optimizer": schema.BASE_OPTIMIZERS,
                 # (hybrid-cosine only with hybrid=true: typed in by hand, not offered to every sweep)
                 "schedule": tuple(s for s in schema.SCHEDULES if s not in schema.HYBRID_ONLY_SCHEDULES),
                 "cluster_batches": schema.CLUSTER_BATCHES, "embedder": schema.EMBEDDERS}
        return {"choices": {"target_bits": "1,1.58,2", "student_size": "tiny,small",
                            **{k: ",".join(v) for k, v in menus.items()}}.get(name, "")}
    low, high, log = defaults.get(name, (1, 10, False) if kind is int else (0.1, 1.0, False))
    return {"low": low, "high": high, "log": log or "rate" in name}


def sweep_dir(runs_root: Path) -> Path:
    return Path(runs_root) / SWEEPS_DIR


def start(runs_root: Path, name: str, trials: int, params: list[str], objective: str, target: float | None,
          preset: str, max_steps: int, eval_every: int, workers: int, pruning: bool, fixed: list[str],
          storage: str | None = None) -> list[str]:
    """Start the sweep CLI in its own session; returns its argv. Raises core.SweepError for bad input (checked
    here first, so nothing starts)."""
    # The same typing as the sweep CLI's --set ("false" -> False, config fields apart), so what is checked here
    # is what the sweep process will run.
    config, options = core.fixed_values(fixed)
    spec = core.SweepSpec(name=name, params=core.parse_params(params), objective=objective,
                          target=target, preset=preset, max_steps=max_steps, eval_every=eval_every,
                          base_config=config, base_options={"hybrid": True, **options})
    spec.validate()
    if trials < 1 or workers < 1:
        raise core.SweepError("trials and parallel workers must be ≥ 1")
    argv = [sys.executable, "-m", "hybrid_optimization.sweep", "--name", name, "--trials", str(trials),
            "--objective", objective, "--preset", preset, "--max_steps", str(max_steps), "--eval_every",
            str(eval_every), "--workers", str(workers), "--runs_root", str(runs_root)]
    for param in params:
        argv += ["--param", param]
    for item in fixed:
        argv += ["--set", item]
    if target is not None:
        argv += ["--target", f"{target:g}"]
    if not pruning:
        argv.append("--no_pruning")
    if storage:
        argv += ["--storage", storage]
    folder = sweep_dir(runs_root)
    folder.mkdir(parents=True, exist_ok=True)
    before = finished_trials(storage_url(runs_root, storage), name)     # "n/N" counts this start's trials only
    with open(folder / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(argv, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    (folder / f"{name}.json").write_text(json.dumps({"pid": proc.pid, "argv": argv, "started_at": time.time(),
                                                     "storage": storage, "trials": trials,
                                                     "trials_before": before}))
    _CHILDREN.append(proc)
    return argv


_CHILDREN: list[subprocess.Popen] = []      # reaped so finished sweeps do not linger as zombies


def process_info(runs_root: Path, name: str) -> dict:
    """{'pid', 'argv', 'started_at', 'alive'} of a sweep started from the app ({} if it was not)."""
    for proc in list(_CHILDREN):
        if proc.poll() is not None:
            _CHILDREN.remove(proc)
    path = sweep_dir(runs_root) / f"{name}.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    info["alive"] = pid_alive(info.get("pid")) and _is_sweep(info.get("pid"), name)
    return info


def _is_sweep(pid: int | None, name: str) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return bool(pid)
    return "hybrid_optimization.sweep" in command and name in command


def stop(runs_root: Path, name: str) -> bool:
    """SIGTERM the sweep: it starts no new trial and asks its running trials to stop."""
    info = process_info(runs_root, name)
    if not info.get("alive"):
        return False
    try:
        os.kill(info["pid"], signal.SIGTERM)
    except OSError:
        return False
    return True


def log_tail(runs_root: Path, name: str, lines: int = 20) -> str:
    try:
        text = (sweep_dir(runs_root) / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


# -- reading studies ------------------------------------------------------------------------------------------------
def storage_url(runs_root: Path, storage: str | None = None) -> str:
    return storage or core.default_storage(runs_root)


_STORAGES: dict[str, object] = {}


def _storage(url: str):
    """One Optuna storage per URL for this process: a new RDBStorage per call builds an SQLAlchemy engine and
    re-reads every trial; a kept one caches the finished trials (Optuna's _CachedStorage), so a 200-trial sweep
    page reads only what changed."""
    import optuna

    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.get_storage(url)       # _CachedStorage(RDBStorage(url))
    return _STORAGES[url]


def list_sweeps(storage: str) -> list[str]:
    """Study names in the storage, newest first ([] when the storage does not exist yet)."""
    import optuna

    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summaries = optuna.study.get_all_study_summaries(_storage(storage), include_best_trial=False)
    return [s.study_name for s in sorted(summaries, key=lambda s: s.datetime_start or 0, reverse=True)]


def load(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=_storage(storage))


def spec_of(study) -> core.SweepSpec | None:
    data = study.user_attrs.get("spec")
    return core.SweepSpec.from_attrs(data) if data else None


def trials_frame(study) -> pd.DataFrame:
    """One row per trial: number, state, value, run id, duration and every searched parameter (as `p.<name>`)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        last = max(trial.intermediate_values) if trial.intermediate_values else None
        rows.append({"trial": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                     "run_id": trial.user_attrs.get("run_id"), "seconds": duration,
                     "last evaluated step": last,
                     **{f"p.{k}": v for k, v in trial.params.items()}})
    frame = pd.DataFrame(rows)
    for col in ("value", "seconds", "last evaluated step"):    # missing values as empty cells, not "None"
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def best(study):
    return core.best_trial(study)


FINISHED_STATES = ("complete", "pruned", "fail")


def finished_trials(storage: str, name: str) -> int:
    """Trials of the study that are over (complete, pruned or failed); 0 when the study does not exist yet."""
    try:
        if name not in list_sweeps(storage):
            return 0
        frame = trials_frame(load(storage, name))
    except Exception:                  # an unreachable storage: the sweep process will say why in its log
        return 0
    return int(frame.state.isin(FINISHED_STATES).sum()) if len(frame) else 0


def progress(info: dict, frame: pd.DataFrame) -> tuple[int, int | None]:
    """(trials over since this start, trials this start asked for) from process_info and trials_frame."""
    done = int(frame.state.isin(FINISHED_STATES).sum()) if len(frame) else 0
    total = info.get("trials")
    return max(0, done - int(info.get("trials_before") or 0)), (int(total) if total else None)


def format_param(value) -> str:
    """A searched value as every part of the Sweep page shows it (3 significant digits: 0.000326, not 0.0003 in
    one place and 0.000325789 in another)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.3g}"


# -- Optuna's own figures (optuna.visualization, plotly) -----------------------------------------------------------
FIGURES = ("history", "intermediate values", "parallel coordinates", "slice", "contour", "importance")
RELIABLE_IMPORTANCE_TRIALS = 10      # fewer completed trials: importances are noise, and the page says so


def figure(study, kind: str, objective_label: str = "objective", importance_params: list[str] | None = None):
    """One of Optuna's plotly figures of the study, laid out for the page. importance uses PED-ANOVA (Optuna's
    fast evaluator: ~0.2 s at 200 trials where fANOVA takes ~8 s on 2 cores) and its title says when fewer than
    RELIABLE_IMPORTANCE_TRIALS completed trials make it unreliable. contour draws the two most important
    parameters (importance_params), or the first two searched."""
    import optuna

    if kind not in FIGURES:
        raise ValueError(f"figure {kind!r} is invalid: it must be one of {', '.join(FIGURES)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _figure(study, kind, objective_label, importance_params)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:    # e.g. too few trials for an evaluator
        return None, f"Optuna could not draw it yet ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


def _figure(study, kind: str, objective_label: str, importance_params: list[str] | None):
    import optuna
    import optuna.visualization as ov

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    params = sorted({p for t in complete for p in t.params})
    title = None
    if kind == "history":
        fig = ov.plot_optimization_history(study, target_name=objective_label)
        title = f"History: {objective_label} per trial, best so far"
    elif kind == "intermediate values":
        fig = ov.plot_intermediate_values(study)
        title = "Intermediate values (the evaluations the pruner compared)"
        fig.update_xaxes(title_text="step")
        fig.update_yaxes(title_text="validation loss")
    elif kind == "parallel coordinates":
        fig = ov.plot_parallel_coordinate(study, target_name=objective_label)
        title = "Parallel coordinates (completed trials)"
    elif kind == "slice":
        fig = ov.plot_slice(study, target_name=objective_label)
        title = f"Slice: {objective_label} against each parameter"
    elif kind == "contour":
        chosen = [p for p in (importance_params or []) if p in params][:2] or params[:2]
        if len(chosen) < 2:
            return None, "a contour needs two searched parameters with completed trials"
        fig = ov.plot_contour(study, params=chosen, target_name=objective_label)
        title = f"Contour: {chosen[0]} × {chosen[1]}"
    else:
        if len(complete) < 2 or len({t.value for t in complete}) < 2:
            return None, "importance needs at least two completed trials that differ"
        fig = ov.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                                        target_name=objective_label)
        title = "Parameter importance (PED-ANOVA)"
        if len(complete) < RELIABLE_IMPORTANCE_TRIALS:
            title += f" · unreliable: {len(complete)} completed trials (needs ≥ {RELIABLE_IMPORTANCE_TRIALS})"
    fig.update_layout(title=dict(text=title), height=380, margin=dict(l=10, r=10, t=50, b=10),
                      uirevision=f"sweep:{kind}")
    return fig, None


MENU_OPTIONS = ("optimizer", "schedule", "warmup_steps")
# The Configure form's launch options a trial carries over (its name, tags and process count are the new run's own).
FORM_OPTIONS = ("preset", "hybrid", "data", "teacher", "student_size", "epochs", "seq_len", "device", "embedder",
                "cluster_batches", "alpha", "temperature", "export", "save_metrics", "optimizer", "schedule",
                "warmup_steps", "trust_region_mode")


def launch_values(run: dict, store, name: str) -> dict:
    """What "Launch with this config" puts into the Configure form for a trial's run: its config and every
    launch option it ran with (from the run's options document), and its evaluation cadence — the options'
    eval_every_steps, else the step gap between the evaluations the trial actually logged — as the config's
    eval_interval (the form's evaluation setting)."""
    from workbench.launcher import FORM_FIELDS

    args = run.get("args") if isinstance(run.get("args"), dict) else {}
    options = args.get("options") if isinstance(args.get("options"), dict) else {}
    config = dict(options.get("hybrid_config") or run.get("config") or {})
    known = set(FORM_FIELDS) - {"tags", "run_name", "nproc"}
    # None = the option's default; kept for the optimizer menu, whose "default" differs with --hybrid (else the
    # form would keep whatever optimizer, schedule or warmup it showed before, and launch another run)
    form = {k: v for k, v in options.items() if k in known and (v is not None or k in MENU_OPTIONS)}
    if options.get("max_steps"):        # the trial's length is its config's max_steps, not a number of epochs
        form.pop("epochs", None)
    if "export" in options:
        form["export"] = bool(options["export"])
    form.setdefault("hybrid", bool(options.get("hybrid", True)))
    form["preset"] = options.get("preset") or run.get("preset") or "tiny"
    form["run_name"] = name
    cadence = options.get("eval_every_steps")
    if not cadence:
        try:
            steps = sorted(set(int(s) for s in store.read_evals(run["run_id"]).column("step")))
        except Exception:
            steps = []
        gaps = [b - a for a, b in zip([0, *steps], steps) if b > a]
        # The most common gap: the last evaluation (at the final step) may come after a shorter one.
        cadence = max(sorted(set(gaps)), key=gaps.count) if gaps else None
    if cadence:
        config["eval_interval"] = int(cadence)
    return {"config": config, "options": form}
