"""One way to start a training run in the background: write its options document, start the CLI on it.

The workbench's launcher and the sweep both call `spawn`: it writes ONE `options.json` in the run folder (the
TrainOptions document, `TrainOptions.to_dict()`) and starts

    python distillation.py --options=<run folder>/options.json

as an argument list (never a shell string; the only argument is the file, so nothing a user typed can be read as
a flag), in its own session and process group, stdout and stderr going to `stdout.log` / `stderr.log` in the run
folder. Torch-free, so a launcher answers at once.

Two lifetimes:
- `die_with_parent=False` (the workbench): the run outlives the app, which finds it again in the store.
- `die_with_parent=True` (a sweep's trial): the run dies with the process that started it. On Linux a small
  supervisor (`python -c`, see _SUPERVISOR) asks the kernel for SIGTERM when its parent dies (prctl
  PR_SET_PDEATHSIG), which covers kill -9 of the parent, and ends the trainer: SIGTERM, then SIGKILL of the group
  after STOP_GRACE_S. On a normal exit, or SIGTERM/SIGINT handled by the parent, `stop_children()` (registered with
  atexit) ends every such child's process group. The death signal is set in that separate process rather than in
  Popen's preexec_fn, which is not safe in a process with threads (a sweep with --workers runs trials in threads).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTILLATION_SCRIPT = REPO_ROOT / "distillation.py"
OPTIONS_NAME, STDOUT_NAME, STDERR_NAME = "options.json", "stdout.log", "stderr.log"
STOP_GRACE_S = 10.0          # SIGTERM, then SIGKILL after this long (the trainer checkpoints on SIGTERM)

# The supervisor of a `die_with_parent` child, run with `python -c`: it asks the kernel for SIGTERM when its parent
# dies (it gives up at once if the parent is already gone: the parent may die between fork and prctl), runs the CLI
# as its own child in the same process group and passes on its exit code. When the parent dies it forwards SIGTERM
# (the trainer checkpoints and marks its run stopped), and if the trainer has not ended after the grace period —
# a SIGTERM can be deferred during setup — it SIGKILLs the whole group. A SIGTERM sent to the group by the parent
# reaches the trainer directly; the supervisor then only enforces the same grace period.
_SUPERVISOR = """
import ctypes, os, signal, subprocess, sys, time
parent, grace, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(143)
deadline = None
def ending(signum, frame):
    global deadline
    if deadline is None:
        deadline = time.monotonic() + grace
        if os.getppid() != parent:          # the death signal: the trainer has not been told yet
            child.send_signal(signal.SIGTERM)
signal.signal(signal.SIGTERM, ending)
signal.signal(signal.SIGINT, ending)
child = subprocess.Popen(argv)
while child.poll() is None:
    if deadline is not None and time.monotonic() > deadline:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    try:
        child.wait(0.2)
    except subprocess.TimeoutExpired:
        pass
code = child.returncode
sys.exit(code if code >= 0 else 128 - code)
"""


def options_document(options: Any) -> dict[str, Any]:
    """The JSON document of a TrainOptions (or of a dict of its fields)."""
    return dict(options) if isinstance(options, dict) else options.to_dict()


def write_options(options: Any, folder: Path, name: str = OPTIONS_NAME) -> Path:
    """Write the options document to `folder/name` atomically (temporary file, then rename); returns its path."""
    folder = Path(folder)
    path = folder / name
    text = json.dumps(options_document(options), indent=1, default=_json_default)
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):          # an embedded HybridTrainingConfig
        return value.to_dict()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def cli_argv(options_path: Path, nproc: int = 1, script: Path = DISTILLATION_SCRIPT,
             python: str = sys.executable) -> list[str]:
    """The CLI's argument list: the interpreter (through torchrun for several processes), the script and the
    options file, in the `--flag=VALUE` form."""
    return [*cli_prefix(nproc, script, python), f"--options={options_path}"]


def cli_prefix(nproc: int = 1, script: Path = DISTILLATION_SCRIPT, python: str = sys.executable) -> list[str]:
    """The interpreter (through torchrun for several processes) and the CLI script."""
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return [python, str(script)]


def child_env(runs_root: Path | str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a training child: offline model hubs, unbuffered output, the run store."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if runs_root is not None:
        env["HYBRID_RUNS_ROOT"] = str(runs_root)
    env.update(extra or {})
    return env


# -- children that die with this process ------------------------------------------------------------------------
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


def start(argv: list[str], log_dir: Path, *, die_with_parent: bool = False, env: dict[str, str] | None = None,
          cwd: Path = REPO_ROOT, grace_s: float = STOP_GRACE_S) -> subprocess.Popen:
    """Start `argv` in a new session (its own process group), output appended to log_dir's stdout.log / stderr.log.
    With `die_with_parent`, the process ends when this one dies (SIGTERM, then SIGKILL after `grace_s`).
    Raises OSError when it cannot be started."""
    if die_with_parent and sys.platform.startswith("linux"):
        argv = [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), str(grace_s), *argv]
    log_dir = Path(log_dir)
    with open(log_dir / STDOUT_NAME, "ab") as out, open(log_dir / STDERR_NAME, "ab") as err:
        proc = subprocess.Popen(argv, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env if env is not None else child_env(), start_new_session=True, close_fds=True)
    if die_with_parent:
        with _CHILDREN_LOCK:
            _CHILDREN[proc.pid] = proc
    return proc


def spawn(options: Any, run_dir: Path, *, nproc: int = 1, die_with_parent: bool = False,
          env: dict[str, str] | None = None, script: Path = DISTILLATION_SCRIPT,
          python: str = sys.executable) -> subprocess.Popen:
    """Write `run_dir/options.json` (the options document) and start the training CLI on it in the background.

    `env` defaults to `child_env(options' runs_root)`. Returns the Popen (its pid leads the child's process group).
    Raises OSError when the file cannot be written or the process cannot be started."""
    run_dir = Path(run_dir)
    document = options_document(options)
    path = write_options(document, run_dir)
    argv = cli_argv(path, nproc, script, python)
    return start(argv, run_dir, die_with_parent=die_with_parent,
                 env=env if env is not None else child_env(document.get("runs_root")))


def forget(proc: subprocess.Popen) -> None:
    """The child has been waited for: stop tracking it."""
    with _CHILDREN_LOCK:
        _CHILDREN.pop(proc.pid, None)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM the child's process group, SIGKILL it after `grace_s`; returns the exit code (None if unknown)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        except PermissionError:
            proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    forget(proc)
    return proc.poll()


def stop_children(grace_s: float = STOP_GRACE_S) -> None:
    """End every `die_with_parent` child still running (called at exit, and by a parent's signal handler)."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN.values())
    for proc in children:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in children:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        stop_group(proc, grace_s=0.0)


def process_matches(pid: int | None, text: str) -> bool:
    """Guard against pid reuse: the live process `pid`'s command line must contain `text` (e.g. a run id, which is
    in the options file's path)."""
    if not pid or pid <= 0:
        return False
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def kill_run_process(pid: int | None, run_id: str, grace_s: float = STOP_GRACE_S) -> bool:
    """End a training process this host started for `run_id` that nobody supervises any more (its sweep died):
    SIGTERM to its process group, SIGKILL after `grace_s`. False when no such process is alive."""
    if not process_matches(pid, run_id):
        return False
    try:
        group = os.getpgid(pid)         # the trainer records its own pid; its group is the one spawn started
    except ProcessLookupError:
        return True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and process_matches(pid, run_id) and _alive(pid):
            time.sleep(0.1)
        if not (process_matches(pid, run_id) and _alive(pid)):
            return True
    return True


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


atexit.register(stop_children)
