"""The project's one vocabulary, torch-free: what a training step reports, what a run's summary means, the names a
user may choose from, and how any of it becomes JSON.

    StepMetrics       one training step's numbers. Its fields are the history keys and the metrics CSV header; the
                      fields marked `store` are the run store's step columns (STEP_COLUMNS, in the store's order).
    RunSummary        a run's final numbers, one meaning per line of the guide's printed summary, and
                      `render_summary` — the ONE renderer of that block, used by the CLI and the workbench.
    choices           presets, precisions, devices, cluster batching, export formats, run statuses, ...
    to_jsonable       numpy / torch scalars, arrays, paths, dataclasses → plain JSON values.

Importing this module costs no torch, numpy or pandas: the CLI validates flags and the workbench builds its forms
with it before anything heavy is loaded.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# -- choices -------------------------------------------------------------------------------------------------------
# Plain tuples of strings (argparse `choices`, Streamlit selectboxes and error messages take them as they are).
DEVICES = ("auto", "cpu", "cuda", "mps")
CLUSTER_BATCHES = ("mixed", "single")             # --hybrid batches: a share of every cluster, or one cluster each
EMBEDDERS = ("tfidf", "minilm")                   # sample features for data clustering
DATA_SOURCES = ("chatterbot", "python-docs")     # --data_source NAME (their loaders: distill/data.py)
DATA_SUFFIXES = (".txt", ".jsonl")                # --data FILE: plain text, or one chat per line
# A run id (the store's folder name): what new_run_id makes, and what --resume / --run_id / RUN_ID accept.
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


@dataclass(frozen=True)
class ExportFormat:
    name: str           # --export NAME / --format NAME
    file_name: str      # what it writes in the run folder
    label: str          # how the app names it


EXPORTS = (
    ExportFormat("packed", "student.safetensors", "Packed safetensors (this project's loader)"),
    ExportFormat("gguf", "student.gguf", "GGUF for llama.cpp (ternary TQ2_0)"),
    ExportFormat("hf", "student-hf", "Hugging Face LlamaForCausalLM folder (zip)"),
)
EXPORT_FORMATS = tuple(e.name for e in EXPORTS)   # --export FORMAT; a bare --export is "packed"
EXPORT_FILE_NAMES = {e.name: e.file_name for e in EXPORTS}
EXPORT_LABELS = {e.name: e.label for e in EXPORTS}
# --trust_region_mode: absolute ‖ΔΘ‖ ≤ μ over all parameters (the guide's); relative ‖ΔW‖ ≤ μ‖W‖ per tensor;
# bounded = relative, and no tensor's update RMS above a fixed cap (HybridOptimizer max_update_rms; issue 16);
# rms = absolute measured in update-RMS units: ‖ΔΘ‖ ≤ μ·max_update_rms·√N over all N updated entries, so the same μ
# allows the same per-entry step at any model size (the absolute radius shrinks per entry as the model grows).
TRUST_REGION_MODES = ("absolute", "relative", "bounded", "rms")
# The modes whose region is per tensor (‖ΔW‖ against each ‖W‖): the optimizer measures ‖W‖ for them and μ is a
# fraction of ‖W‖₂ (the Live page's axis title).
PER_TENSOR_TRUST_REGIONS = frozenset({"relative", "bounded"})
# The "bounded" region's cap on each tensor's update RMS, and the "rms" region's unit (μ = 1 caps the whole update's
# RMS there): the guide's LR (AdamW's update RMS is about its LR). HybridOptimizer's max_update_rms default.
MAX_UPDATE_RMS = 1e-3
# --optimizer: the optimizer a run trains with (optimizers.build_optimizer). muon = torch.optim.Muon on the 2-D
# hidden matrices + AdamW on embeddings, norms and head; schedule-free = PyPI schedulefree AdamWScheduleFree;
# prodigy = PyPI prodigyopt (LR-free: --lr is the factor on its estimated step size, default 1.0).
BASE_OPTIMIZERS = ("adamw", "sgd", "muon", "schedule-free", "prodigy")
# The bases whose direction the hybrid (--hybrid) can steer with its learned multiplier and trust region.
HYBRID_BASES = ("adamw", "sgd", "muon")
# --schedule: the LR schedule after --warmup_steps of linear warmup (wsd: warmup, stable, linear decay to 0 over
# the last 20 % of the steps). Schedule-Free has its own averaging and takes constant only. hybrid-cosine (--hybrid
# only) is the same warmup + cosine applied inside the hybrid, which also anneals its aux net's meta-learning rate
# by the same factor: under a plain cosine the learned multiplier rises as the LR decays and undoes part of the
# decay (issue 16's robustness report, H-cos vs H-sched-free).
SCHEDULES = ("constant", "cosine", "wsd", "hybrid-cosine")
HYBRID_ONLY_SCHEDULES = ("hybrid-cosine",)
# --schedule unset: constant for a plain optimizer; this for --hybrid (what the robustness report supports: paired
# against the constant-LR hybrid at 1600 steps, 5 seeds, level by cross-entropy and closer to the teacher by KL on
# both workloads, never worse — benchmarks/results/robustness/report.md, H-sched-free vs H-rms-free).
HYBRID_DEFAULT_SCHEDULE = "hybrid-cosine"


def resolved_schedule(schedule: str | None, hybrid: bool) -> str:
    """What an unset --schedule means for the run (None → constant, or HYBRID_DEFAULT_SCHEDULE with --hybrid)."""
    if schedule is not None:
        return schedule
    return HYBRID_DEFAULT_SCHEDULE if hybrid else "constant"
# --warmup_steps left unset: this fraction of the run's steps whenever the LR has a schedule (cosine, wsd) or the
# optimizer is Schedule-Free (its own warmup), else no warmup. It is the benchmark's setting (AlgoPerf's NAdamW
# baseline warms up over ~5 % of the steps), so `--optimizer muon --schedule cosine` runs what the report measured.
DEFAULT_WARMUP_FRACTION = 0.05
WARMUP_WORDS = f"{DEFAULT_WARMUP_FRACTION * 100:g} % of the steps with a schedule or Schedule-Free, else none"


def default_warmup_steps(optimizer: str | None, schedule: str, total_steps: int) -> int:
    """The warmup an unset --warmup_steps means for a run of `total_steps` (see DEFAULT_WARMUP_FRACTION): at least
    one step when there is any, and always less than the run."""
    if schedule == "constant" and optimizer != "schedule-free":
        return 0
    return scheduled_warmup_steps(total_steps)


def scheduled_warmup_steps(total_steps: int) -> int:
    """DEFAULT_WARMUP_FRACTION of a run with a schedule: at least one step, always less than the run."""
    return max(0, min(max(1, round(DEFAULT_WARMUP_FRACTION * total_steps)), total_steps - 1))


def optimizer_combination_error(optimizer: str, schedule: str, hybrid: bool, warmup_steps: Any = 0,
                                total_steps: int | None = None) -> str | None:
    """The optimizer menu's one rule (optimizers.build_optimizer, TrainOptions.errors): one line naming what is
    wrong and what is allowed, or None when the combination can run. Torch-free, for the CLI's early validation."""
    if optimizer not in BASE_OPTIMIZERS:
        return f"--optimizer {optimizer!r} is invalid: it must be one of {', '.join(BASE_OPTIMIZERS)}"
    if schedule not in SCHEDULES:
        return f"--schedule {schedule!r} is invalid: it must be one of {', '.join(SCHEDULES)}"
    if warmup_steps is None:                 # unset: default_warmup_steps, which always fits the run
        pass
    elif isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        return f"--warmup_steps {warmup_steps!r} is invalid: it must be an integer ≥ 0 (or unset: {WARMUP_WORDS})"
    elif total_steps is not None and warmup_steps >= total_steps > 0 and warmup_steps > 0:
        return (f"--warmup_steps {warmup_steps} is invalid: it must be less than the run's {total_steps} steps "
                "(warmup is a part of the run)")
    if schedule in HYBRID_ONLY_SCHEDULES and not hybrid:
        return (f"--schedule {schedule} is invalid without --hybrid: it anneals the hybrid's meta-learning with the "
                "LR; add --hybrid, or use --schedule cosine")
    if optimizer == "schedule-free" and schedule != "constant":
        return (f"--schedule {schedule} cannot be combined with --optimizer schedule-free: Schedule-Free replaces "
                "the schedule by averaging; use --schedule constant (its warmup: --warmup_steps)")
    if hybrid and optimizer not in HYBRID_BASES:
        return (f"--hybrid cannot be combined with --optimizer {optimizer}: the hybrid steers the direction of "
                f"{', '.join(HYBRID_BASES)}; use one of those, or drop --hybrid")
    return None
# Quantized bit-widths the quantizers implement (1.58 = ternary); 16 and 32 mean full precision.
SUPPORTED_BITS = (1, 1.58, 2, 4, 8)
PRECISIONS = (*SUPPORTED_BITS, 16, 32)
# Run statuses. "diverged": the loss became NaN/Inf (the run ended with a non-zero exit and says at which step).
RUN_STATUSES = ("queued", "running", "finished", "failed", "stopped", "lost", "diverged")
STATUS_COLORS = {"queued": "gray", "running": "blue", "finished": "green", "failed": "red", "stopped": "orange",
                 "lost": "violet", "diverged": "red"}          # the app's status badges
ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("finished", "failed", "stopped", "lost", "diverged")


class UnsupportedBitsError(ValueError):
    """A bit-width that no quantizer implements."""


TERNARY_BITS = 1.58


def normalize_bits(bits: Any) -> float:
    """THE canonical bit-width: 1, 1.58, 2, 4, 8, or 16 / 32 (full precision). 1.58, 1.585, log2(3) and 1.6 (the
    packed size) are ternary; "ternary" and numbers written as text are read too. Anything else raises
    UnsupportedBitsError naming what is allowed."""
    value = bits
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "ternary":
            return TERNARY_BITS
        try:
            value = float(text)
        except ValueError:
            value = None
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "__float__")):
        value = None
    if value is not None:
        value = float(value)
        if math.isfinite(value):
            if 1.575 <= value <= 1.6 + 1e-9:
                return TERNARY_BITS
            for allowed in PRECISIONS:
                if abs(value - allowed) < 1e-9:
                    return float(allowed)
    shown = repr(bits) if len(repr(bits)) <= 40 else repr(bits)[:40] + "…"
    raise UnsupportedBitsError(f"bits {shown} is invalid: it must be one of "
                               + ", ".join(f"{b:g}" for b in PRECISIONS) + " (16 and 32: full precision)")


# -- a run's labels: one bound for the CLI, the launcher, the sweep, the store and the app's edits ------------------
MAX_RUN_NAME_CHARS = 200        # a run name is a label, shown in tables and titles
MAX_NOTES_CHARS = 10_000
MAX_TAGS = 32
MAX_TAG_CHARS = 64


def run_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a run name (None when it can): one line of 1 to MAX_RUN_NAME_CHARS printable characters."""
    if isinstance(name, str) and name.strip() and len(name) <= MAX_RUN_NAME_CHARS and name.isprintable():
        return None
    size = f"of {len(name):,} characters " if isinstance(name, str) else f"{type(name).__name__} "
    return f"{size}is invalid: it must be one line of 1 to {MAX_RUN_NAME_CHARS} printable characters"


def tags_problem(tags: Any) -> str | None:
    """Why `tags` cannot be a run's tags (None when they can)."""
    if isinstance(tags, (list, tuple)) and len(tags) <= MAX_TAGS and all(
            isinstance(t, str) and t.strip() and "," not in t and len(t) <= MAX_TAG_CHARS and t.isprintable()
            for t in tags):
        return None
    return f"are invalid: at most {MAX_TAGS} non-empty one-line tags of ≤ {MAX_TAG_CHARS} characters, without commas"


def notes_problem(notes: Any) -> str | None:
    if isinstance(notes, str) and len(notes) <= MAX_NOTES_CHARS:
        return None
    size = f"of {len(notes):,} characters " if isinstance(notes, str) else ""
    return f"{size}are invalid: notes are text of at most {MAX_NOTES_CHARS:,} characters"


# -- the runs root: one rule for the CLI, the store, the sweep and the app -----------------------------------------
class RunsRootError(ValueError):
    """The runs root cannot hold a run store; the message says why and what to pass instead."""


def default_runs_root() -> Path:
    """`$HYBRID_RUNS_ROOT` if set, else `~/.cache/hybrid-workbench/runs`."""
    env = os.environ.get("HYBRID_RUNS_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid-workbench" / "runs"


def check_runs_root(root: str | os.PathLike, must_exist: bool = False, writable: bool = True) -> Path:
    """The runs root as a Path, or RunsRootError: it must be (or be creatable as) a directory — one that exists
    when `must_exist` — and, when `writable`, really writable: checked by creating (and removing) a temporary
    entry, since permission bits say nothing for root or a read-only mount."""
    import tempfile
    root = Path(root).expanduser()
    try:
        resolved = root.resolve(strict=False)
        exists = resolved.exists()
    except (RuntimeError, OSError) as exc:          # a symlink loop, a component that is not a directory, ...
        raise RunsRootError(f"--runs_root {root}: cannot be used ({_reason(exc)})") from None
    if exists and not resolved.is_dir():
        raise RunsRootError(f"--runs_root {root}: is a file, not a directory; pass a folder for the run store")
    if not exists and must_exist:
        raise RunsRootError(f"--runs_root {root}: does not exist (no run store there)")
    if not writable:
        return root
    probe_in = resolved
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise RunsRootError(f"--runs_root {root}: cannot be created ({probe_in} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=probe_in))
    except OSError as exc:
        where = "the directory" if exists else f"its parent {probe_in}"
        raise RunsRootError(f"--runs_root {root}: {where} is not writable ({_reason(exc)}); pass a writable "
                            "folder") from None
    return root


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


# -- one training step ---------------------------------------------------------------------------------------------
def _metric(default: Any = None, store: bool = True, doc: str = "") -> Any:
    return field(default=default, metadata={"store": store, "doc": doc})


@dataclass
class StepMetrics:
    """What one optimizer step reports. Field order = the CSV header; `store` fields = the store's step columns."""
    step: int = _metric(0, store=False, doc="optimizer steps completed (1-based; the store's key column)")
    loss: float = _metric(math.nan, doc="the batch's distillation loss (all ranks averaged)")
    learning_rate: float | None = _metric(doc="effective LR of this step (base LR × multiplier for the hybrid)")
    lr_multiplier: float | None = _metric(doc="the auxiliary net's LR multiplier (1.0 for a plain optimizer)")
    trust_radius: float | None = _metric(doc="trust radius μ after the step (None: no trust region)")
    constraint_active: bool | None = _metric(doc="the update was projected onto the trust region")
    update_magnitude: float | None = _metric(doc="‖ΔΘ‖₂ of the applied update")
    gradient_magnitude: float | None = _metric(doc="‖g‖₂ over all parameters")
    quantization_error: float | None = _metric(doc="parameter-weighted relative quantization error (log steps)")
    flip_rate: float | None = _metric(doc="fraction of quantized codes that changed in this step")
    tokens_per_s: float | None = _metric(doc="training tokens per second of this step")
    cluster_id: int | None = _metric(doc="the batch's data cluster; None for a mixed batch (it has none)")
    skipped: bool = _metric(False, doc="the optimizer skipped the step (non-finite loss or gradient)")
    epoch: int = _metric(0, doc="0-based epoch of the step")
    ce: float | None = _metric(store=False, doc="hard-label cross-entropy part of the loss")
    kl: float | None = _metric(store=False, doc="KL-to-teacher part of the loss")
    time: float | None = _metric(store=False, doc="training seconds since the run began (resumes included)")
    # The rest of what the optimizer reports per step (optim.StepInfo's fields are a strict subset of these, so a
    # step's record is one shape from the optimizer to the CSV); history and CSV only, not store columns.
    efficiency: float | None = _metric(store=False, doc="‖applied update‖ / ‖proposed update‖ (1.0: unconstrained)")
    hypergradient: float | None = _metric(store=False, doc="cos(g_t, Δ_{t-1}) fed to the auxiliary net's LR head")
    rho: float | None = _metric(store=False, doc="trust-region agreement ratio fed to the radius head")
    lr_schedule: float | None = _metric(store=False, doc="the optimizer's built-in warmup / decay factor")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def store_values(self) -> dict[str, Any]:
        """The store's step columns of this step (`step` is passed separately as the row key)."""
        return {name: getattr(self, name) for name in STEP_COLUMNS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepMetrics":
        return cls(**{k: v for k, v in data.items() if k in HISTORY_KEYS})


HISTORY_KEYS = tuple(f.name for f in fields(StepMetrics))                      # also the metrics CSV's first columns
STEP_COLUMNS = tuple(f.name for f in fields(StepMetrics) if f.metadata["store"])  # the run store's step columns


def metrics_csv_header(eval_keys: list[str] | tuple[str, ...] = ()) -> list[str]:
    """metrics.csv: every StepMetrics field, then the evaluation metrics (filled on the steps that evaluated)."""
    return [*HISTORY_KEYS, *sorted(k for k in eval_keys if k not in HISTORY_KEYS and k != "step")]


# -- a run's summary -------------------------------------------------------------------------------------------------
def _line(label: str, fmt: str, doc: str) -> Any:
    return field(default=None, metadata={"label": label, "fmt": fmt, "doc": doc})


def _value(doc: str, default: Any = None) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class RunSummary:
    """A run's final numbers. The first five fields are the guide's summary lines (label and format in their
    metadata); each has ONE meaning, written next to it. Values a run does not have stay None ("—" when shown)."""
    steps_completed: int | None = _line("Total Steps", "{:d}", "optimizer steps completed (the guide's label)")
    final_loss: float | None = _line("Final Loss", "{:.6f}", "training loss of the last step whose loss was finite")
    avg_lr_multiplier: float | None = _line("Avg Learning Rate Multiplier", "{:.2f}x",
                                            "mean LR multiplier over the steps taken")
    constraint_activation_rate: float | None = _line("Constraint Activation Rate", "{:.1%}",
                                                     "fraction of steps whose update hit the trust region")
    final_trust_radius: float | None = _line("Final Trust Radius", "{:.6f}", "trust radius after the last step")
    optimizer: str | None = _value("hybrid | adamw | custom (None: an older run, shown with the hybrid title)")
    final_epoch_loss: float | None = _value("mean training loss over the last epoch's finite steps")
    final_step_loss: float | None = _value("loss of the very last step (NaN when it diverged)")
    skipped_steps: int = _value("steps the optimizer skipped (non-finite loss or gradient)", 0)
    val_loss: float | None = _value("validation loss of the last evaluation")
    val_ppl: float | None = _value("its perplexity")
    top1_agreement: float | None = _value("top-1 agreement with the teacher at the last evaluation")
    kl_teacher: float | None = _value("KL(teacher top-k ‖ student) per position at the last evaluation")
    teacher_val_loss: float | None = _value("the teacher's own cross-entropy on the same validation windows (the "
                                            "student's reference; over the student's vocabulary, like val_loss)")
    teacher_gap: float | None = _value("val_loss − teacher_val_loss in nats (0: as good as its teacher)")
    teacher_gap_ratio: float | None = _value("val_loss ÷ teacher_val_loss (1.0: as good as its teacher)")
    tokens_per_s: float | None = _value("training tokens per second over the training loop")
    train_seconds: float | None = _value("seconds in the training loop (resumed runs: all segments)")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"doc": "every other final value (flat)"})

    def __post_init__(self) -> None:
        # The gap to the teacher follows from the two losses (one rule, also for summaries read back from a store).
        if self.val_loss is not None and self.teacher_val_loss is not None:
            if self.teacher_gap is None:
                self.teacher_gap = float(self.val_loss) - float(self.teacher_val_loss)
            if self.teacher_gap_ratio is None and float(self.teacher_val_loss) > 0:
                self.teacher_gap_ratio = float(self.val_loss) / float(self.teacher_val_loss)

    def to_dict(self) -> dict[str, Any]:
        """Flat: the named fields and the extra values side by side (what the store keeps)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return to_jsonable(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "RunSummary":
        data = dict(data or {})
        if "total_steps" in data:       # summaries stored before the rename (and the guide's manager dict)
            data.setdefault("steps_completed", data.pop("total_steps"))
        named = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: data.pop(k) for k in list(data) if k in named}, extra=data)


SUMMARY_LINES = tuple((f.metadata["label"], f.name, f.metadata["fmt"]) for f in fields(RunSummary)
                      if "label" in f.metadata)
RULE = "=" * 60


def summary_title(optimizer: str | None) -> str:
    if optimizer in (None, "hybrid"):
        return "HYBRID OPTIMIZATION SUMMARY"
    names = {"custom": "custom optimizer", "sgd": "SGD with momentum", "muon": "Muon + AdamW",
             "schedule-free": "Schedule-Free AdamW", "prodigy": "Prodigy (LR-free)"}
    name = names.get(optimizer, "AdamW at constant LR")
    return f"TRAINING SUMMARY (baseline: {name})"


def render_summary(summary: RunSummary | dict[str, Any] | None, optimizer: str | None = None) -> str:
    """The guide's summary block. A baseline run shows only Total Steps and Final Loss under its own title (it has
    no multiplier or radius); Validation, Teacher (its held-out loss and the student's gap to it) and Throughput lines
    follow when the run has those values."""
    s = summary if isinstance(summary, RunSummary) else RunSummary.from_dict(summary)
    optimizer = optimizer or s.optimizer
    lines = [summary_title(optimizer), RULE]
    for label, key, fmt in SUMMARY_LINES:
        if optimizer not in (None, "hybrid") and key not in ("steps_completed", "final_loss"):
            continue
        lines.append(f"{label}: {_format(getattr(s, key), fmt)}")
    if s.val_loss is not None:
        line = f"Validation Loss: {_format(s.val_loss, '{:.6f}')}"
        if s.val_ppl is not None:
            line += f" (perplexity {_format(s.val_ppl, '{:.2f}')})"
        if s.top1_agreement is not None:
            line += f", top-1 agreement with the teacher {_format(s.top1_agreement, '{:.1%}')}"
        lines.append(line)
    if s.teacher_val_loss is not None:
        # After the guide's lines: the student's reference, the teacher on the very same held-out windows.
        lines.append(f"Teacher Held-out Loss: {_format(s.teacher_val_loss, '{:.6f}')} (perplexity "
                     f"{_format(math.exp(min(float(s.teacher_val_loss), 50.0)), '{:.2f}')}) on the same "
                     "validation windows")
        if s.teacher_gap is not None:
            line = f"Student Gap to Teacher: {_format(s.teacher_gap, '{:+.6f}')} nats"
            if s.teacher_gap_ratio is not None:
                line += f" ({_format(s.teacher_gap_ratio, '{:.3f}')}× the teacher's loss)"
            if s.kl_teacher is not None:
                line += f", KL to the teacher {_format(s.kl_teacher, '{:.4f}')}"
            lines.append(line)
    if s.tokens_per_s is not None and s.train_seconds is not None:
        lines.append(f"Throughput: {s.tokens_per_s:,.0f} tokens/s over {s.train_seconds:.1f} s")
    lines.append(RULE)
    return "\n".join(lines)


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    try:
        return fmt.format(int(value) if fmt == "{:d}" else float(value))
    except (TypeError, ValueError, OverflowError):
        return str(value)


# -- JSON --------------------------------------------------------------------------------------------------------------
def to_jsonable(value: Any, nonfinite_as_text: bool = False) -> Any:
    """A plain JSON value (dict / list / str / int / float / bool / None) from numpy and torch scalars or arrays,
    paths, enums, dataclasses, tuples and sets; anything else unknown becomes its str(). Non-finite floats stay
    floats (json writes NaN / Infinity, which json.loads reads back), or become "nan" / "inf" / "-inf" with
    `nonfinite_as_text` (strict JSON for other readers)."""
    again = lambda v: to_jsonable(v, nonfinite_as_text)  # noqa: E731
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return str(value) if nonfinite_as_text and not math.isfinite(value) else float(value)
    if isinstance(value, dict):
        return {str(k): again(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [again(v) for v in value]
    if isinstance(value, enum.Enum):
        return again(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return again({f.name: getattr(value, f.name) for f in fields(value)})
    if hasattr(value, "tolist"):                       # numpy arrays and scalars, torch tensors
        return again(value.tolist())
    if hasattr(value, "item"):
        return again(value.item())
    return str(value)
