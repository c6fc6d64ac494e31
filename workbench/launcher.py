"""Start, stop and resume training runs as background processes of the pipeline's CLI (distillation.py).

The app never trains and never touches CUDA. A launch turns the form's values and config into THE options
document — a TrainOptions with the config embedded, validated by the same code as the CLI's flags —, creates the
run record (status queued) and starts the CLI on it through `hybrid_optimization.launch.spawn`, the one launch path
the sweep uses too: one `<run_dir>/options.json`, then

    sys.executable distillation.py --options=<run_dir>/options.json

as an argument list (nothing a user typed can be read as a flag) in its own session / process group, stdout and
stderr going to files in the run folder. It returns at once; the trainer reports through the store. Because the
child has its own session, it survives an app restart, and the app finds it again in the store.

The form's values are TrainOptions fields (FORM_DEFAULTS: the ones the Configure page shows, with the form's own
starting values) plus `nproc` (processes under torchrun); the config fields that are options of their own on the
CLI (quantization, length, seed, evaluation cadence) come from the config.

Stop asks politely first (a flag in the store that the trainer polls), then sends SIGTERM to the process group
after a grace period. Resume starts the CLI again with --resume RUN_ID.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from hybrid_optimization import launch as launch_path
from hybrid_optimization.config import HybridTrainingConfig
from hybrid_optimization.distill import reporting
from hybrid_optimization.distill.options import PYTHON_ONLY, TrainOptions
from hybrid_optimization.distill.presets import PRESETS as _PRESETS
from hybrid_optimization.distill.presets import STUDENT_SIZES as _STUDENT_SIZES
from hybrid_optimization.schema import CLUSTER_BATCHES, DATA_SUFFIXES, DEVICES, EMBEDDERS  # noqa: F401 (form choices)
from hybrid_optimization.tracking import ACTIVE_STATUSES, RunStore, StoreError, pid_alive

REPO_ROOT = launch_path.REPO_ROOT
DISTILLATION_SCRIPT = launch_path.DISTILLATION_SCRIPT
# The form's choices are the CLI's own (defined once in the core).
PRESETS = tuple(_PRESETS)
STUDENT_SIZES = tuple(_STUDENT_SIZES)
STOP_GRACE_S = 30.0
STDOUT_NAME, STDERR_NAME, OPTIONS_NAME = launch_path.STDOUT_NAME, launch_path.STDERR_NAME, launch_path.OPTIONS_NAME
CONFIG_NAME = OPTIONS_NAME       # the run's configuration file: the options document, config embedded
build_argv = launch_path.cli_argv
cli_prefix = launch_path.cli_prefix

_DEFAULTS = TrainOptions()
# What the Configure page starts from: TrainOptions' own defaults, except where the form differs on purpose (a new
# user launches the hybrid optimizer and gets the packed model and a metrics CSV); None = the preset's value, and
# no epochs = the config's max_steps.
FORM_DEFAULTS: dict[str, Any] = {
    "preset": _DEFAULTS.preset, "hybrid": True, "data": None, "teacher": None, "student_size": None, "epochs": None,
    "seq_len": None, "device": _DEFAULTS.device, "nproc": 1, "embedder": _DEFAULTS.embedder,
    "cluster_batches": _DEFAULTS.cluster_batches, "alpha": None, "temperature": None, "export": True,
    "save_metrics": True, "run_name": None, "tags": [],
}
# Set by the launcher from the config and the store, never by the form.
DERIVED = ("qat", "ternary", "bits", "max_steps", "seed", "eval_every", "eval_every_steps", "hybrid_config",
           "config", "run_id", "runs_root", "resume", "quiet", "progress", "track", "argv", "train_windows",
           "stop_after_steps", "data_clustering", "param_clustering")
# Options that are config fields under another name: the form sets them in the config (one place, one value).
IN_CONFIG = ("lr", "weight_decay", "batch_size", "data_clusters", "param_clusters", "precision_budget",
             "trust_region_mode")
FORM_FIELDS = frozenset({f.name for f in dataclasses.fields(TrainOptions)} - PYTHON_ONLY - set(DERIVED)
                        - set(IN_CONFIG) | {"nproc"})


class LaunchError(ValueError):
    """A launch option is invalid (or the CLI cannot be started); `field` names the option."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def form_defaults() -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in FORM_DEFAULTS.items()}


def check_form(values: dict[str, Any]) -> dict[str, Any]:
    """The form's values, or LaunchError for a name that is not a form field (a preset file, a sweep's trial)."""
    if not isinstance(values, dict):
        raise LaunchError(f"launch options must be a mapping of option -> value, not {type(values).__name__}")
    unknown = sorted(set(values) - FORM_FIELDS)
    if unknown:
        raise LaunchError(f"unknown launch option(s): {', '.join(map(str, unknown))}; allowed: "
                          f"{', '.join(sorted(FORM_FIELDS))}", field=str(unknown[0]))
    return dict(values)


def train_options(config: HybridTrainingConfig, form: dict[str, Any], run_id: str | None = None,
                  runs_root: Path | str | None = None) -> TrainOptions:
    """THE options document of a run launched from the form: its values (None = TrainOptions' default), the config
    embedded, and the four config fields the CLI takes as options of its own — quantization (qat + bits; none =
    full-precision student), the length (max_steps, unless epochs are given), the seed, and the evaluation cadence
    (the config's eval_interval = evaluate every N steps, instead of the CLI's default of every epoch)."""
    form = {**form_defaults(), **check_form(form)}
    quantized = bool(config.use_quantization)
    export = form.get("export")
    values = {k: v for k, v in form.items() if k != "nproc" and v is not None}
    values.update(
        hybrid_config=config, qat=quantized, ternary=quantized and config.target_bits == 1.58,
        bits=config.target_bits if quantized else None,
        max_steps=None if form.get("epochs") is not None else config.max_steps, seed=config.seed,
        eval_every=None, eval_every_steps=config.eval_interval,
        export="packed" if export is True else (export or None), tags=list(form.get("tags") or []),
        run_name=form.get("run_name") or None, run_id=run_id,
        runs_root=str(runs_root) if runs_root is not None else None, quiet=True)
    return TrainOptions(**values)


def option_errors(form: dict[str, Any], config: HybridTrainingConfig | None = None) -> dict[str, str]:
    """Every invalid launch option -> its message (empty when all are valid): the process count, then
    TrainOptions' own checks (the CLI's rules and messages, one definition), named by the field."""
    errors: dict[str, str] = {}
    nproc = form.get("nproc", 1) if isinstance(form, dict) else 1
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        errors["nproc"] = f"nproc = {nproc!r} is invalid: it must be an integer ≥ 1"
    try:
        options = train_options(config or HybridTrainingConfig(), form)
    except LaunchError as exc:
        return {**errors, exc.field or "options": str(exc)}
    except ValueError as exc:
        return {**errors, "options": str(exc)}
    for name, message in options.errors().items():
        flag = f"--{name} "             # the form names the field itself: "alpha = 2.0 is invalid: ..."
        errors.setdefault(name, f"{name} = {message[len(flag):]}" if message.startswith(flag) else message)
    return errors


# -- processes ------------------------------------------------------------------------------------------------------
# Children started by this app process: pid -> (Popen, runs root, run id). Polled by `reap` so that a finished
# child does not linger as a zombie and a child that died before reporting is marked failed with its stderr.
_CHILDREN: dict[int, tuple[subprocess.Popen, Path, str]] = {}
_CHILDREN_LOCK = threading.Lock()


def _track(store: RunStore, run_id: str, start) -> subprocess.Popen:
    try:
        proc = start()
    except OSError as exc:
        store.set_status(run_id, "failed", f"could not start the training process: {exc}")
        raise LaunchError(f"could not start the training process: {exc}") from None
    store.update_run(run_id, pid=proc.pid, host=socket.gethostname())
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = (proc, store.root, run_id)
    return proc


def launch(store: RunStore, config: HybridTrainingConfig | dict, form: dict,
           script: Path = DISTILLATION_SCRIPT) -> str:
    """Validate, create the run record (queued), start the CLI in the background; returns the run id at once.

    Raises ConfigError / LaunchError (nothing created, nothing started) for bad input."""
    if isinstance(config, dict):
        config = HybridTrainingConfig.from_dict(config)   # the core's validation: raises ConfigError
    errors = option_errors(form, config)
    if errors:
        name, message = next(iter(errors.items()))
        raise LaunchError(message, field=name)
    if not Path(script).is_file():
        raise LaunchError(f"the training CLI {script} is missing; the workbench launches runs through it")
    nproc = int(form.get("nproc", 1))
    options = train_options(config, form)
    run_id = store.create_run(config.to_dict(), [], options.preset, name=options.run_name, tags=options.tags,
                              status="queued", total_steps=options.max_steps)
    options = options.replace(run_id=run_id, runs_root=str(store.root))
    run_dir = store.run_dir(run_id)
    store.update_run(run_id, args={"argv": build_argv(run_dir / OPTIONS_NAME, nproc, script),
                                   "options": options.to_dict(), "nproc": nproc})
    _track(store, run_id, lambda: launch_path.spawn(options, run_dir, nproc=nproc, script=script,
                                                    env=launch_path.child_env(store.root)))
    return run_id


def resume(store: RunStore, run_id: str, script: Path = DISTILLATION_SCRIPT) -> int:
    """Start the CLI again on a stopped / failed / lost run (--resume RUN_ID); returns the new pid."""
    run = store.get_run(run_id)
    if run["status"] in ACTIVE_STATUSES and pid_alive(run.get("pid")):
        raise LaunchError(f"run {run_id} is {run['status']}; it can be resumed once it has stopped")
    if not Path(script).is_file():
        raise LaunchError(f"the training CLI {script} is missing; the workbench resumes runs through it")
    # The trainer records its world size in the run's config; a run that never reported has the launcher's count.
    args = run.get("args") if isinstance(run.get("args"), dict) else {}
    nproc = (run.get("config") or {}).get("world_size") or args.get("nproc") or 1
    argv = [*cli_prefix(int(nproc), script), f"--resume={run_id}", f"--runs_root={store.root}", "--quiet"]
    store.set_status(run_id, "queued")
    run_dir = store.run_dir(run_id)
    return _track(store, run_id, lambda: launch_path.start(argv, run_dir, env=launch_path.child_env(store.root))).pid


def _is_run_process(pid: int, run_id: str) -> bool:
    """Guard against pid reuse: the process's command line must name the run."""
    try:
        return run_id in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return pid_alive(pid) and not Path("/proc").is_dir()


def terminate(run: dict, sig: int = signal.SIGTERM) -> bool:
    """Send `sig` to the run's process group (it leads its own session). False if it is not running here."""
    pid = run.get("pid")
    if not pid or run.get("host") not in (None, socket.gethostname()) or not pid_alive(pid):
        return False
    if not _is_run_process(pid, run["run_id"]):
        return False
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except OSError:
            return False
    return True


def stop(store: RunStore, run_id: str, grace_s: float = STOP_GRACE_S) -> bool:
    """Ask the run to stop (store flag); if it is still active after `grace_s`, SIGTERM its process group.
    Returns False if the run was not queued/running."""
    if not store.request_stop(run_id):
        return False
    root = store.root

    def fallback() -> None:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if RunStore(root, create=False).get_run(run_id)["status"] not in ACTIVE_STATUSES:
                    return
            except StoreError:
                return
        try:
            fresh = RunStore(root, create=False)
            run = fresh.get_run(run_id)
        except StoreError:
            return
        if run["status"] in ACTIVE_STATUSES and not terminate(run) and not pid_alive(run.get("pid")):
            fresh.set_status(run_id, "stopped", "stopped before its process reported")

    threading.Thread(target=fallback, name=f"stop-{run_id}", daemon=True).start()
    return True


def mark_lost(store: RunStore) -> list[str]:
    """Mark runs whose process died as lost (RunStore.refresh_liveness), and end the MLflow run each of them
    reported to (`--report_to mlflow`): a run killed with SIGKILL cannot end its own, which stayed RUNNING in MLflow
    for ever. Returns the ids marked lost."""
    lost = store.refresh_liveness()
    if lost:
        reporting.end_lost_mlflow_runs({rid: store.root / rid for rid in lost},
                                       {rid: store.get_run(rid).get("error") or "" for rid in lost})
    return lost


def reap(store: RunStore | None = None) -> list[str]:
    """Collect children that have exited. A child that exited while its run is still queued/running (it died
    before reporting, e.g. exit 2 on bad input) gets its run marked failed with the tail of its stderr — or
    stopped, when a stop had been requested and the SIGTERM fallback ended it. Returns the ids marked failed."""
    failed = []
    with _CHILDREN_LOCK:
        items = list(_CHILDREN.items())
    for pid, (proc, root, run_id) in items:
        code = proc.poll()
        if code is None:
            continue
        with _CHILDREN_LOCK:
            _CHILDREN.pop(pid, None)
        try:
            target = store if store is not None and store.root == root else RunStore(root, create=False)
            run = target.get_run(run_id)
            if run["status"] in ACTIVE_STATUSES and run.get("pid") == pid:
                if run.get("stop_requested") and code in (-signal.SIGTERM, 128 + signal.SIGTERM, 130, 143):
                    target.set_status(run_id, "stopped", f"stopped by signal (exit code {code})")
                    continue
                tail = stderr_tail(target, run_id)
                target.set_status(run_id, "failed", f"the training process exited with code {code}"
                                  + (f":\n{tail}" if tail else " before reporting a result"))
                failed.append(run_id)
        except StoreError:
            continue
    return failed


def stderr_tail(store: RunStore, run_id: str, max_bytes: int = 8000) -> str:
    path = store.root / run_id / STDERR_NAME
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""
