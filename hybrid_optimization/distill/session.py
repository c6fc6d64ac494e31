"""`with RunSession(plan, device) as session:` — one run's process environment, opened and closed in one place.

    enter   torchrun's process group (if launched by it), SIGTERM / SIGINT handlers, the launcher's pre-created
            record (status queued; its heartbeat kept alive from now on)
    open    the run record (new, the launcher's, or the resumed one), status running, the RunWriter
    while   `say(line)` to the terminal and the run's log; `stage(name, done, total)` to the store's setup stages;
            `recorder` (the writer, or a Recorder that records nothing) for the callbacks
    exit    a failure marks the record (bad input before the record was opened: one line; later: the traceback), a
            signal during setup marks it stopped, the writer is closed, the process group destroyed

Signals: during setup (data, teacher, logits, clustering) a SIGTERM / SIGINT ends the run at once — `SetupStopped`
is raised in the main thread, so it is honoured as soon as Python runs again (well within 2 s); during training it
only sets `stop_signal`, and the loop stops after the step, with a checkpoint. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from pathlib import Path

import torch

from .. import distributed as dist_utils
from ..config import ConfigError
from ..quantization import QuantizedExportError
from ..tracking import RunNotFound, RunStore, StoreError
from .callbacks import NO_RECORDER, Recorder
from .checkpoint import CheckpointError, CheckpointWriteError
from .data import DataError, make_progress
from .export import ExportError
from .options import OptionsError
from .plan import RunPlan
from .teacher import TeacherError

# Errors that mean "the input is wrong": the CLI prints them in one line and exits with code 2.
BAD_INPUT_ERRORS = (OptionsError, ConfigError, DataError, TeacherError, CheckpointError, RunNotFound,
                    QuantizedExportError, StoreError)


class SetupStopped(BaseException):
    """A SIGTERM / SIGINT arrived before training began (a BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} during setup")
        self.signum = signum


class RunSession:
    def __init__(self, plan: RunPlan, device: torch.device):
        self.plan, self.device = plan, device
        self.ctx = dist_utils.DistContext()
        self.store: RunStore | None = None
        self.writer = None
        self.opened = False
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.stop_signal: int | None = None
        self.training = False
        self.console = None                  # the Console callback, when the loop shows one
        self._old_handlers: dict = {}
        self._bars: dict = {}
        self._said_at: dict = {}
        self._early_stages: list[tuple] = []

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def recorder(self) -> Recorder:
        return self.writer if self.writer is not None else NO_RECORDER

    @property
    def show_bars(self) -> bool:
        return self.is_main and self.plan.options.progress and not self.plan.options.quiet

    # -- enter / exit ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "RunSession":
        self.ctx = dist_utils.init_distributed(self.device.type)
        if self.ctx.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.ctx.local_rank)
        if self.ctx.enabled and self.device.type == "cpu":        # the cores are shared between the ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.ctx.world_size))
        self._install_signal_handlers()
        try:
            self._attach_launcher_record()
        except BaseException:
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is not None:
                self._record_failure(exc)
                reporter = getattr(self, "reporter", None)      # --report_to: end the MLflow run, not RUNNING
                if reporter is not None:
                    reporter.on_failure("stopped" if isinstance(exc, (SetupStopped, KeyboardInterrupt)) else
                                        "failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._restore_signal_handlers()
            if self.console is not None:
                self.console.on_fit_end(None)
            if self.writer is not None:
                self.writer.close()
            dist_utils.cleanup(self.ctx)
        return False

    # -- the record -----------------------------------------------------------------------------------------------
    def open(self, plan: RunPlan) -> None:
        """Create (or take) the run record, status running; every rank learns its id and folder."""
        self.plan, opts = plan, plan.options
        run_id = None
        if self.is_main and opts.track:
            self.store = self.store or RunStore(opts.runs_root)
            config = config_record(plan, self.ctx.world_size)
            args = {"argv": opts.argv, "options": opts.to_dict()}
            if opts.resume is not None:
                run_id = opts.resume
                self.store.update_run(run_id, total_steps=plan.total_steps, config=config)
            elif opts.run_id is not None:
                run_id = opts.run_id
                self.store.update_run(run_id, total_steps=plan.total_steps, config=config, args=args,
                                      preset=opts.preset)
            else:
                run_id = self.store.create_run(config=config, args=args, preset=opts.preset, name=opts.run_name,
                                               tags=list(opts.tags), notes=opts.notes, status="queued",
                                               total_steps=plan.total_steps)
            self.run_dir = self.store.run_dir(run_id)
            self.writer = self.writer or self.store.writer(run_id)
            self.writer.set_pid(os.getpid())
            self.writer.set_device(self.device_label())
            self.writer.set_status("running")
            for name, done, total, ended, at in self._early_stages:     # stages before the record existed
                self.writer.stage(name, done=done, total=total, ended=ended, at=at)
        self.opened = True
        self.run_id = dist_utils.broadcast_object(run_id, self.ctx)
        run_dir = dist_utils.broadcast_object(str(self.run_dir) if self.run_dir else None, self.ctx)
        self.run_dir = Path(run_dir) if run_dir else None
        if self.is_main and opts.quiet and self.run_id is not None:
            print(f"run_id={self.run_id}", flush=True)
        if self.run_id is not None and self.is_main:
            self.say(f"Run {self.run_id} ({'resumed' if opts.resume else 'new'}) — store {self.store.root}, "
                     f"folder {self.run_dir}")

    def end(self, status: str, summary: dict, steps: int, diverged: str | None = None) -> None:
        """The run's summary and final status (every rank waits for rank 0 to have written them)."""
        if self.writer is not None:
            self.writer.set_summary(summary)
            self.writer.log(f"run {status} after {steps} steps" + (f": {diverged}" if diverged else ""),
                            level="error" if diverged else "info")
            self.writer.set_status(status, error=f"diverged: {diverged}" if diverged else None)
        dist_utils.barrier(self.ctx)

    def device_label(self) -> str:
        label = str(self.device)
        if self.device.type == "cuda":
            label += f" ({torch.cuda.get_device_name(self.device)})"
        if self.ctx.enabled:
            label += f" × {self.ctx.world_size} ranks ({self.ctx.backend})"
        return label

    # -- reporting ------------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """A progress line: to stdout (rank 0, not quiet) and to the run's log in the store."""
        if not self.is_main:
            return
        if not self.plan.options.quiet:
            if self.console is None or not self.console.write(message):
                print(message, flush=True)
        if self.writer is not None:
            self.writer.log(message)

    def stage(self, name: str, done: float | None = None, total: float | None = None, ended: bool = False) -> None:
        """A setup stage began / progressed / ended: to the store (the Live page), and n/N lines for long ones."""
        if not self.is_main:
            return
        if self.writer is not None:
            self.writer.stage(name, done=done, total=total, ended=ended)
            self.writer.heartbeat()
        elif not self.opened:                       # before the record exists: kept, written when it opens
            self._early_stages.append((name, done, total, ended, time.time()))
        if done is None or not total:
            return
        label = name.replace("_", " ")
        tenth = int(10 * done / total)
        if done == total or tenth > self._said_at.get(name, 0):
            self._said_at[name] = tenth
            line = f"  {label}: {done}/{total}" + (" windows" if name == "teacher_logits" else " steps")
            if self.show_bars and self.writer is not None:
                self.writer.log(line)              # the bar shows it on the terminal
            elif not self.show_bars:
                self.say(line)
        if self.show_bars:
            if name not in self._bars:
                self._bars[name] = make_progress(label, self.say, True, "windows" if name == "teacher_logits"
                                                 else "steps")
            self._bars[name](done, total)

    # -- signals and failures -------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt        # a second Ctrl-C: stop now
            self.stop_signal = signum
            if not self.training:
                raise SetupStopped(signum)     # nothing to save yet: stop now

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _record_failure(self, exc: BaseException) -> None:
        if self.writer is None:
            return
        try:
            if isinstance(exc, SetupStopped):
                self.writer.log(str(exc), level="error")
                self.writer.set_status("stopped", error=str(exc))
            elif isinstance(exc, KeyboardInterrupt):
                self.writer.set_status("stopped", error="interrupted (KeyboardInterrupt)")
            elif isinstance(exc, BAD_INPUT_ERRORS) and not self.opened:
                # Bad input for a launcher's record: it must not stay queued forever.
                self.writer.log(f"error: {exc}", level="error")
                self.writer.set_status("failed", error=str(exc))
            else:
                text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                if isinstance(exc, (CheckpointWriteError, StoreError, ExportError)):
                    text = str(exc)                 # one line says it all (e.g. "disk full" and where)
                self.writer.log(f"failed: {type(exc).__name__}: {exc}", level="error")
                self.writer.set_status("failed", error=text)
        except Exception:
            pass

    def _attach_launcher_record(self) -> None:
        """A launcher pre-created the record (status queued): check it and keep its heartbeat alive from now on,
        so a long preparation (e.g. converting the GGUF teacher) is not mistaken for a dead process."""
        opts = self.plan.options
        if not (self.is_main and opts.track and opts.run_id):
            return
        self.store = RunStore(opts.runs_root)
        run = self.store.get_run(opts.run_id)
        if run["status"] != "queued":
            raise OptionsError(f"--run_id {opts.run_id}: the run is {run['status']}, not queued; use --resume to "
                               "continue a stopped run")
        self.writer = self.store.writer(opts.run_id)
        self.writer.set_pid(os.getpid())


def config_record(plan: RunPlan, world_size: int) -> dict:
    """The run's `config` column: the HybridTrainingConfig and the pipeline's resolved settings."""
    opts = plan.options
    return {**plan.config.to_dict(), "hybrid": opts.hybrid, "preset": opts.preset, "bits": plan.bits,
            "student_size": plan.student_size, "seq_len": plan.seq_len, "epochs": plan.n_epochs,
            "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps, "alpha": opts.alpha,
            "temperature": opts.temperature, "embedder": opts.embedder, "data": plan.source_name,
            "teacher": opts.teacher or plan.preset.teacher, "world_size": world_size, "split_seed": opts.split_seed,
            "data_clustering": plan.data_clustering, "param_clustering": plan.param_clustering,
            "cluster_batches": opts.cluster_batches if plan.data_clustering else None, "optimizer": plan.optimizer}
