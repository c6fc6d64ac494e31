"""`plan_run(options) -> RunPlan`: every decision a run makes before it touches data, torch-free and quick.

A RunPlan is frozen: the resolved options (a resumed run's stored options merged with the overrides allowed on
--resume), the HybridTrainingConfig, the window length, the batch size, the steps / epochs arithmetic, the bits,
the clustering switches and the optimizer kind. Everything a user can get wrong that needs no data is checked here,
so the CLI answers in well under a second, before torch is imported:

    --epochs × steps per epoch over MAX_STEPS    --resume of an unknown / live run
    a fixed option changed on --resume (named, with both values; repeating the stored value is fine)
(TrainOptions.validate checks each value on its own, the --teacher path included.)

When an epoch is one pass over the data (the smollm2 preset), the number of steps is known only once the data is
split: `plan.for_data(n_train_windows)` returns the complete plan (and refuses a total over the bound then).
Tested without data in tests/test_plan.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import HybridTrainingConfig
from ..schema import SUPPORTED_BITS, default_warmup_steps, optimizer_combination_error, resolved_schedule
from .options import MAX_STEPS, RESUME_ALWAYS_ALLOWED, RESUME_OVERRIDABLE, OptionsError, TrainOptions
from .presets import Preset

PLAN_WARMUP_FRACTION = 0.1      # the precision plan is made after 10 % of the steps, when the weights carry signal
CHECKPOINT_EVERY_S = 30.0
SUBSET_MIN_WINDOWS = 1024       # a split of at most this many windows is always used whole (small data: as before)
# Python-side hooks of a resume call: they are not stored with the run, so the caller's always apply.
RESUME_HOOKS = ("optimizer_factory", "stop_after_steps", "track", "runs_root", "callbacks")
# Options that do not change what is trained (how it is shown, stored or exported, or a bookkeeping value): they
# are left out of the options hash a checkpoint carries, so a resume that changes them still fits its checkpoint.
NOT_HASHED = (*RESUME_OVERRIDABLE, *RESUME_ALWAYS_ALLOWED, *RESUME_HOOKS, "given", "run_id", "hybrid_config",
              "run_name", "tags", "notes", "eval_every", "eval_every_steps", "config")


class RunResumeError(OptionsError):
    """--resume names a run that cannot be resumed (running, unknown, or finished with nothing left to do)."""


@dataclass(frozen=True)
class RunPlan:
    options: TrainOptions              # resolved: a resumed run's stored options with the allowed overrides
    config: HybridTrainingConfig       # the optimizer / clustering / quantization settings (max_steps = total)
    preset: Preset
    seq_len: int
    batch_size: int
    bits: float                        # 32: full precision; else the QAT bit-width
    steps_per_epoch: int | None        # None until for_data() when an epoch is one pass over the data
    total_steps: int | None
    data_clustering: bool              # sample batches by data cluster (hybrid)
    param_clustering: bool             # per-layer precision plan from parameter clustering (hybrid, QAT)
    optimizer: str                     # hybrid | custom (an optimizer_factory) | a schema.BASE_OPTIMIZERS name
    teacher_kind: str                  # user | tiny | smollm2
    train_windows: int | None          # training windows this run draws (None: all)
    eval_windows: int
    top_k: int
    resume_dir: Path | None = None     # the resumed run's folder

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def n_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def plan_at_step(self) -> int:
        """The step before which the precision plan is made."""
        return max(1, round(PLAN_WARMUP_FRACTION * self.total_steps))

    @property
    def schedule(self) -> str:
        """--schedule, or what it means unset (schema.resolved_schedule: constant; --hybrid's default with it)."""
        return resolved_schedule(self.options.schedule, self.options.hybrid)

    @property
    def warmup_steps(self) -> int:
        """--warmup_steps, or what it means unset (schema.default_warmup_steps: 5 % of the steps when the LR has a
        schedule or the optimizer is Schedule-Free, else 0). Needs the run's length (for_data when per epoch)."""
        opts = self.options
        if opts.warmup_steps is not None:
            return opts.warmup_steps
        return default_warmup_steps(opts.optimizer, self.schedule, self.total_steps)

    @property
    def checkpoint_every_s(self) -> float:
        every = self.options.checkpoint_every_s
        return CHECKPOINT_EVERY_S if every is None else every

    @property
    def student_size(self) -> str:
        return self.options.student_size or self.preset.student_size

    @property
    def source_name(self) -> str:
        opts = self.options
        return str(opts.data or opts.data_source or "chatterbot-corpus (English)")

    @property
    def precision_ladder(self) -> tuple[float, ...]:
        return precision_ladder_for(self.bits, self.config.parameter_clusters)

    def for_data(self, n_train: int, n_available: int | None = None) -> "RunPlan":
        """The complete plan once the training split has `n_train` windows (of `n_available`): an epoch may be one
        pass over them, and a run that draws a subset records its size, so --resume uses exactly those windows."""
        opts = self.options
        per_epoch = self.steps_per_epoch or math.ceil(n_train / self.batch_size)
        total = schedule_steps(opts.max_steps, opts.epochs, per_epoch)
        _check_warmup(opts, total)
        if n_available is not None and n_train < n_available:
            opts = opts.replace(train_windows=n_train)
        return dataclasses.replace(self, options=opts, steps_per_epoch=per_epoch, total_steps=total,
                                   config=opts.hybrid_training_config(total_steps=total))

    # -- what a checkpoint must match ------------------------------------------------------------------------
    def hashed_options(self) -> dict[str, Any]:
        """The options that decide what is trained, resolved (the config included, its step budget excluded)."""
        values = {k: v for k, v in self.options.to_dict().items() if k not in NOT_HASHED}
        values["config"] = {k: v for k, v in self.config.to_dict().items() if k != "max_steps"}
        values.update(bits=self.bits, seq_len=self.seq_len, batch_size=self.batch_size,
                      student_size=self.student_size, data_clustering=self.data_clustering,
                      param_clustering=self.param_clustering, optimizer=self.optimizer)
        return json.loads(json.dumps(values, sort_keys=True, default=str))

    def options_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.hashed_options(), sort_keys=True).encode()).hexdigest()[:16]


def plan_run(options: TrainOptions) -> RunPlan:
    """Resolve and check `options` (see the module docstring). Raises OptionsError (or a subclass) for bad input;
    reads nothing but the run store (for --resume) and the teacher path."""
    resume_dir = None
    if options.resume is not None:
        stored, resume_dir = load_resumed_options(options)
        options = merge_for_resume(stored, options)
    options.validate()
    preset = options.preset_obj
    if options.export and not options.track:
        raise OptionsError("export needs a run folder: use track=True (the default)")
    config = options.hybrid_training_config()
    bits = options.resolved_bits()
    per_epoch = options.steps_per_epoch or preset.steps_per_epoch
    total = schedule_steps(options.max_steps, options.epochs, per_epoch) if per_epoch or options.max_steps \
        else None
    if total is not None:
        _check_warmup(options, total)
        config = options.hybrid_training_config(total_steps=total)
    use_clustering = config.use_clustering
    optimizer = "custom" if options.optimizer_factory else ("hybrid" if options.hybrid else options.optimizer or "adamw")
    return RunPlan(
        options=options, config=config, preset=preset, seq_len=options.seq_len or preset.seq_len,
        batch_size=config.batch_size, bits=bits, steps_per_epoch=per_epoch, total_steps=total if per_epoch else None,
        data_clustering=options.hybrid and (options.data_clustering if options.data_clustering is not None
                                            else use_clustering),
        param_clustering=options.hybrid and bits < 16 and (options.param_clustering if options.param_clustering
                                                           is not None else use_clustering),
        optimizer=optimizer, teacher_kind="user" if options.teacher is not None else preset.teacher,
        train_windows=train_windows_budget(config.batch_size, options.max_steps, options.epochs, per_epoch,
                                           stored=options.train_windows),
        eval_windows=options.eval_windows or preset.eval_windows, top_k=options.top_k or preset.top_k,
        resume_dir=resume_dir)


def _check_warmup(options: TrainOptions, total_steps: int) -> None:
    """--warmup_steps must fit in the run. With --max_steps the options check it; with --epochs the run's length is
    known only here (at plan time, or once the data is split), so the same rule is applied again with it."""
    if options.optimizer_factory is not None:
        return
    message = optimizer_combination_error(options.optimizer or "adamw",
                                          resolved_schedule(options.schedule, options.hybrid), options.hybrid,
                                          options.warmup_steps, total_steps)
    if message:
        raise OptionsError(message)


def schedule_steps(max_steps: int | None, epochs: int, steps_per_epoch: int | None) -> int:
    """Optimizer steps in total: --max_steps, else epochs × steps per epoch (refused over MAX_STEPS)."""
    if max_steps:
        return max_steps
    total = epochs * steps_per_epoch
    if total > MAX_STEPS:
        raise OptionsError(f"--epochs {epochs} × {steps_per_epoch} steps per epoch = {total:,} steps, more than the "
                           f"limit of {MAX_STEPS:,}")
    return total


def train_windows_budget(batch_size: int, max_steps: int | None, epochs: int, steps_per_epoch: int | None,
                         stored: int | None = None) -> int | None:
    """Training windows a run draws (steps × batch size), never fewer than SUBSET_MIN_WINDOWS; None when an epoch
    is one pass over the data (every window is used). `stored`: the number a run recorded when it started, so a
    resumed run (even with a larger --max_steps) keeps exactly its windows and its teacher logits."""
    if stored is not None:
        return stored
    if max_steps:
        steps = max_steps
    elif steps_per_epoch:
        steps = epochs * steps_per_epoch
    else:
        return None
    return max(steps * batch_size, SUBSET_MIN_WINDOWS)


def precision_ladder_for(target_bits: float, n_groups: int) -> tuple[float, ...]:
    """Bits per sensitivity rank around the target: one level up, the target, one level down. For a 1.58-bit
    target and 4 groups this is the guide's (2, 1.58, 1.58, 1)."""
    levels = sorted(float(b) for b in SUPPORTED_BITS)
    i = levels.index(float(target_bits))
    up, down = levels[min(i + 1, len(levels) - 1)], levels[max(i - 1, 0)]
    if n_groups == 1:
        return (float(target_bits),)
    if n_groups == 2:
        return (up, down)
    return (up, *([float(target_bits)] * (n_groups - 2)), down)


# -- resume ------------------------------------------------------------------------------------------------------
def load_resumed_options(given: TrainOptions) -> tuple[TrainOptions, Path]:
    """The stored options of run `given.resume` and its folder; RunResumeError when it cannot be resumed."""
    from ..tracking import RunNotFound, RunStore, StoreError, pid_alive
    try:
        run = RunStore(given.runs_root, create=False).get_run(given.resume)
    except RunNotFound:          # a StoreError too, but its message is already the one to show
        raise
    except StoreError as exc:
        raise RunResumeError(f"--resume {given.resume}: {exc}") from None
    if run["status"] in ("running", "queued") and run.get("pid") and pid_alive(run["pid"]) \
            and run["pid"] != os.getpid():
        raise RunResumeError(f"run {given.resume} is {run['status']} (pid {run['pid']}); stop it before "
                             "resuming it")
    stored_args = run.get("args") or {}
    if not isinstance(stored_args, dict) or "options" not in stored_args:
        raise RunResumeError(f"run {given.resume} was not started by this pipeline (no stored options)")
    stored = TrainOptions.from_dict(stored_args["options"])
    config = {k: v for k, v in (run.get("config") or {}).items()
              if k in HybridTrainingConfig.__dataclass_fields__}
    stored = stored.replace(hybrid_config=HybridTrainingConfig.from_dict(config) if config else None)
    return stored, Path(run["run_dir"])


def merge_for_resume(stored: TrainOptions, given: TrainOptions) -> TrainOptions:
    """The stored run's options, with the overridable values the resume call set.

    A fixed option may be repeated with the stored value (the user adds --resume ID to the command they ran); a
    different value is refused by name, with both values. The CLI says which options were given (`given.given`);
    a Python caller does not, so there a fixed option that differs from both its default and the stored value is
    refused (say `lr=0.01` on a run that trained at 0.001) — it would otherwise be dropped without a word."""
    defaults = TrainOptions()
    ignored = {"given", "run_id", "train_windows", "hybrid_config", *RESUME_OVERRIDABLE, *RESUME_ALWAYS_ALLOWED,
               *RESUME_HOOKS}
    if given.given is not None:
        candidates = [name for name in given.given if name not in ignored and name in TrainOptions.__dataclass_fields__]
    else:
        candidates = [name for name in TrainOptions.__dataclass_fields__
                      if name not in ignored and getattr(given, name) != getattr(defaults, name)]
    fixed = [f"{name}={getattr(given, name)!r} (the run's: {getattr(stored, name)!r})"
             for name in candidates if not _same(getattr(given, name), getattr(stored, name))]
    if fixed:
        raise OptionsError(f"resume {given.resume}: {'; '.join(fixed)} cannot change when a run is resumed; "
                           f"only {', '.join(RESUME_OVERRIDABLE)} may")
    if given.given is not None:
        changes = {name: getattr(given, name) for name in RESUME_OVERRIDABLE if name in given.given}
    else:
        changes = {name: getattr(given, name) for name in RESUME_OVERRIDABLE
                   if getattr(given, name) != getattr(defaults, name)}
    hooks = {name: getattr(given, name) for name in RESUME_HOOKS}
    return stored.replace(**changes, **hooks, resume=given.resume, run_id=None, given=None)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b
