"""Start, stop and resume training runs as background processes of the pipeline's CLI (distillation.py).

The app never trains and never touches CUDA: a launch turns the form's values into the CLI's own TrainOptions
(torch-free, validated by the same code as the CLI's flags), creates the run record (status queued) in the store,
writes the config and the options next to the run, and starts

    sys.executable distillation.py --options=<run_dir>/options.json

as an argument list (never a shell string; the only argument is the file, so nothing a user typed — a run name or
a tag beginning with "-" — can be read as a flag) in its own session / process group, stdout and stderr going to
files in the run folder. It returns at once; the trainer reports through the store. Because the child has its
own session, it survives an app restart, and the app finds it again in the store.

Stop asks politely first (a flag in the store that the trainer polls), then sends SIGTERM to the process group
after a grace period. Resume starts the CLI again with --resume RUN_ID.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybrid_optimization.config import HybridTrainingConfig
from hybrid_optimization.distill.options import TrainOptions
from hybrid_optimization.distill.presets import PRESETS as _PRESETS
from hybrid_optimization.distill.presets import STUDENT_SIZES as _STUDENT_SIZES
from hybrid_optimization.schema import CLUSTER_BATCHES, DEVICES, EMBEDDERS  # noqa: F401  (the form's choices)
from hybrid_optimization.tracking import ACTIVE_STATUSES, RunStore, StoreError, pid_alive

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTILLATION_SCRIPT = REPO_ROOT / "distillation.py"
# The form's choices are the CLI's own (defined once in the core).
PRESETS = tuple(_PRESETS)
STUDENT_SIZES = tuple(_STUDENT_SIZES)
DATA_SUFFIXES = (".txt", ".jsonl")
STOP_GRACE_S = 30.0
STDOUT_NAME, STDERR_NAME, CONFIG_NAME, OPTIONS_NAME = "stdout.log", "stderr.log", "config.json", "options.json"


class LaunchError(ValueError):
    """A launch option is invalid (or the CLI cannot be started); `field` names the option."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class LaunchOptions:
    """The form's pipeline options that are not HybridTrainingConfig fields (`train_options` maps them, with the
    config, onto the CLI's TrainOptions)."""
    preset: str = "tiny"
    hybrid: bool = True                 # False: the AdamW baseline at constant LR (no --hybrid)
    data: str | None = None             # .txt or chat .jsonl; None: chatterbot-corpus
    teacher: str | None = None          # local HF causal-LM dir; None: the preset's teacher
    student_size: str | None = None     # None: the preset's default
    epochs: int | None = None           # None: stop at config.max_steps
    seq_len: int | None = None
    device: str = "auto"
    nproc: int = 1                      # > 1: torchrun --nproc_per_node
    embedder: str = "tfidf"
    cluster_batches: str = "mixed"      # hybrid batches: an equal share of every data cluster, or one cluster each
    alpha: float | None = None
    temperature: float | None = None
    export: bool = True
    save_metrics: bool = True
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LaunchOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise LaunchError(f"unknown launch option(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**data)


def option_errors(options: LaunchOptions) -> dict[str, str]:
    """Every invalid launch option -> its message (empty when all are valid): the launcher's own (process count,
    data file type, teacher folder), then TrainOptions' (the CLI's messages, one definition)."""
    errors: dict[str, str] = {}
    if not isinstance(options.nproc, int) or isinstance(options.nproc, bool) or options.nproc < 1:
        errors["nproc"] = f"nproc = {options.nproc!r} is invalid: it must be an integer ≥ 1"
    if options.data:
        path = Path(options.data).expanduser()
        if path.suffix.lower() not in DATA_SUFFIXES:
            errors["data"] = f"data file {path} must end in {' or '.join(DATA_SUFFIXES)}"
        elif not path.is_file():
            errors["data"] = f"data file {path} does not exist"
    if options.teacher and not Path(options.teacher).expanduser().is_dir():
        errors["teacher"] = f"teacher {options.teacher} is not a folder (a local Hugging Face causal-LM directory)"
    for name, message in train_options(HybridTrainingConfig(), options, "check", Path("runs")).errors().items():
        flag = f"--{name} "             # the form names the field itself: "alpha = 2.0 is invalid: ..."
        errors.setdefault(name, f"{name} = {message[len(flag):]}" if message.startswith(flag) else message)
    return errors


def train_options(config: HybridTrainingConfig, options: LaunchOptions, run_id: str, runs_root: Path,
                  config_path: Path | None = None) -> TrainOptions:
    """The CLI's TrainOptions for a new run. Config fields travel in the --config file; four are options of their
    own because the CLI derives them from options, not the file: quantization (qat + bits; none = full-precision
    student), the length (max_steps, unless epochs are given), the seed, and the evaluation cadence (the config's
    eval_interval = evaluate every N steps, instead of the CLI's default of every epoch)."""
    defaults = TrainOptions()
    quantized = bool(config.use_quantization)
    return TrainOptions(
        hybrid=options.hybrid, qat=quantized, ternary=quantized and config.target_bits == 1.58,
        bits=config.target_bits if quantized else None,
        epochs=options.epochs if options.epochs is not None else defaults.epochs,
        max_steps=None if options.epochs is not None else config.max_steps, seed=config.seed,
        eval_every=None, eval_every_steps=config.eval_interval,
        config=str(config_path) if config_path is not None else None, preset=options.preset, data=options.data or None,
        teacher=options.teacher or None, student_size=options.student_size, seq_len=options.seq_len,
        device=options.device, embedder=options.embedder, cluster_batches=options.cluster_batches,
        alpha=options.alpha if options.alpha is not None else defaults.alpha,
        temperature=options.temperature if options.temperature is not None else defaults.temperature,
        export="packed" if options.export else None, save_metrics=options.save_metrics,
        run_name=options.run_name or None, tags=list(options.tags), run_id=run_id, runs_root=str(runs_root),
        quiet=True)


def build_argv(options_path: Path, nproc: int = 1, script: Path = DISTILLATION_SCRIPT,
               python: str = sys.executable) -> list[str]:
    """The CLI's argument list: the interpreter (through torchrun for several processes), the script and the
    options file, in the `--flag=VALUE` form."""
    return [*cli_prefix(nproc, script, python), f"--options={options_path}"]


def cli_prefix(nproc: int, script: Path = DISTILLATION_SCRIPT, python: str = sys.executable) -> list[str]:
    """The interpreter (through torchrun for several processes) and the CLI script."""
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return [python, str(script)]


# -- processes ------------------------------------------------------------------------------------------------------
# Children started by this app process: pid -> (Popen, runs root, run id). Polled by `reap` so that a finished
# child does not linger as a zombie and a child that died before reporting is marked failed with its stderr.
_CHILDREN: dict[int, tuple[subprocess.Popen, Path, str]] = {}
_CHILDREN_LOCK = threading.Lock()


def child_env(runs_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HYBRID_RUNS_ROOT=str(runs_root), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return env


def start_process(argv: list[str], cwd: Path, log_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    """Popen in a new session (own process group, detached from the app's terminal), output to files."""
    with open(log_dir / STDOUT_NAME, "ab") as out, open(log_dir / STDERR_NAME, "ab") as err:
        return subprocess.Popen(argv, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True, close_fds=True)


def _spawn(store: RunStore, run_id: str, argv: list[str]) -> subprocess.Popen:
    try:
        proc = start_process(argv, REPO_ROOT, store.run_dir(run_id), child_env(store.root))
    except OSError as exc:
        store.set_status(run_id, "failed", f"could not start the training process: {exc}")
        raise LaunchError(f"could not start the training process: {exc}") from None
    store.update_run(run_id, pid=proc.pid, host=socket.gethostname())
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = (proc, store.root, run_id)
    return proc


def launch(store: RunStore, config: HybridTrainingConfig | dict, options: LaunchOptions | dict,
           script: Path = DISTILLATION_SCRIPT) -> str:
    """Validate, create the run record (queued), start the CLI in the background; returns the run id at once.

    Raises ConfigError / LaunchError (nothing created, nothing started) for bad input."""
    if isinstance(config, dict):
        config = HybridTrainingConfig.from_dict(config)   # the core's validation: raises ConfigError
    if isinstance(options, dict):
        options = LaunchOptions.from_dict(options)
    errors = option_errors(options)
    if errors:
        name, message = next(iter(errors.items()))
        raise LaunchError(message, field=name)
    if not Path(script).is_file():
        raise LaunchError(f"the training CLI {script} is missing; the workbench launches runs through it")
    run_id = store.create_run(config.to_dict(), [], options.preset, name=options.run_name or None,
                              tags=options.tags, status="queued",
                              total_steps=config.max_steps if options.epochs is None else None)
    run_dir = store.run_dir(run_id)
    config_path = run_dir / CONFIG_NAME
    config_path.write_text(config.to_json())
    train = train_options(config, options, run_id, store.root, config_path)
    options_path = run_dir / OPTIONS_NAME
    options_path.write_text(train.to_json())
    argv = build_argv(options_path, options.nproc, script)
    store.update_run(run_id, args={"argv": argv, "options": options.to_dict()})
    _spawn(store, run_id, argv)
    return run_id


def resume(store: RunStore, run_id: str, script: Path = DISTILLATION_SCRIPT) -> int:
    """Start the CLI again on a stopped / failed / lost run (--resume RUN_ID); returns the new pid."""
    run = store.get_run(run_id)
    if run["status"] in ACTIVE_STATUSES and pid_alive(run.get("pid")):
        raise LaunchError(f"run {run_id} is {run['status']}; it can be resumed once it has stopped")
    if not Path(script).is_file():
        raise LaunchError(f"the training CLI {script} is missing; the workbench resumes runs through it")
    # The trainer records its world size in the run's config; a run that never reported has the launcher's options.
    options = (run.get("args") or {}).get("options", {}) if isinstance(run.get("args"), dict) else {}
    nproc = (run.get("config") or {}).get("world_size") or options.get("nproc") or 1
    argv = [*cli_prefix(int(nproc), script), f"--resume={run_id}", f"--runs_root={store.root}", "--quiet"]
    store.set_status(run_id, "queued")
    return _spawn(store, run_id, argv).pid


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
