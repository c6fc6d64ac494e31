"""One definition per headline number the pages show: what kind of run it is (hybrid or baseline), its throughput,
its "final loss", its ETA, and the setup stages before its first step. Every page asks here, so Live, Compare and
Summary cannot disagree. Plain Python/pandas, no Streamlit: unit-tested directly.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass

import pandas as pd

from hybrid_optimization.schema import RunSummary, render_summary
from hybrid_optimization.tracking import ACTIVE_STATUSES

# The preset's window length when the run did not set one (hybrid_optimization/distill/presets.py; not imported:
# that package imports torch, and the app never does).
PRESET_SEQ_LEN = {"tiny": 64, "smollm2": 128}
FINAL_LOSS_KEY = "final_loss"
FINAL_LOSS_LABEL = "Final training loss"
# The summary's own definition (schema.RunSummary), so the page says what the number is.
FINAL_LOSS_HELP = next(f.metadata["doc"] for f in dataclasses.fields(RunSummary) if f.name == "final_loss")
FINAL_LOSS_HELP = FINAL_LOSS_HELP[0].upper() + FINAL_LOSS_HELP[1:] + " (the summary's Final Loss)."
TOKENS_LABEL = "Tokens/s (training only)"
TOKENS_HELP = ("Training tokens ÷ training time, from the first to the last step (evaluations included, setup "
               "excluded), as the run's summary computes it; while the run trains, over the steps so far.")
ELAPSED_LABEL = "Elapsed (setup + training)"
ELAPSED_HELP = ("Wall time since the run started: data, teacher, teacher logits and clustering, then training "
                "(evaluations included). Training alone is the summary's Training time.")
TRAIN_TIME_LABEL = "Training time (setup excluded)"
# Bits per weight and compression have two meanings, each with its own label: the precision PLAN's average over the
# quantized linear layers (codes only, what the planner chose) and what the packed export STORES for them (codes +
# per-group scales, so a little more bits and a little less compression).
PLANNED_BITS_LABEL = "Planned bits/weight (linear layers, codes only)"
PLANNED_COMPRESSION_LABEL = "Compression vs FP32 (planned codes only)"
STORED_BITS_LABEL = "Stored bits/weight (linear layers, codes + scales)"
STORED_COMPRESSION_LABEL = "Compression vs FP32 (linear layers, codes + scales)"
HYBRID_ONLY_CHARTS = ("LR multiplier", "Trust radius", "Constraint activation (running rate)")
# Friendly names of the summary's / final values, with their format (Summary and Compare share them).
VALUE_LABELS: dict[str, tuple[str, str]] = {
    "final_loss": (FINAL_LOSS_LABEL, "{:.4f}"),
    "final_epoch_loss": ("Training loss, last-epoch mean", "{:.4f}"),
    "val_loss": ("Validation loss", "{:.4f}"),
    "val_loss_fp": ("Validation loss (full precision)", "{:.4f}"),
    "val_ppl": ("Validation perplexity", "{:.2f}"),
    "kl_teacher": ("KL to the teacher", "{:.4f}"),
    "top1_agreement": ("Top-1 agreement", "{:.1%}"),
    "teacher_val_loss": ("Teacher's validation loss", "{:.4f}"),
    "teacher_gap": ("Gap to the teacher", "{:+.4f}"),
    "teacher_gap_ratio": ("Student ÷ teacher validation loss", "{:.3f}×"),
    "tokens_per_s": (TOKENS_LABEL, "{:,.0f}"),
    "total_steps": ("Steps", "{:,.0f}"),
    "steps_completed": ("Steps completed", "{:,.0f}"),
    "avg_lr_multiplier": ("Avg LR multiplier", "{:.2f}×"),
    "constraint_activation_rate": ("Constraint activation", "{:.1%}"),
    "final_trust_radius": ("Final trust radius", "{:.4g}"),
    "train_seconds": (TRAIN_TIME_LABEL, "duration"),
    "setup_seconds": ("Setup time", "duration"),
    "clustering_seconds": ("Clustering time", "duration"),
    "prepare_seconds": ("Data preparation", "duration"),
    "teacher_cache_seconds": ("Teacher logits time", "duration"),
    "peak_rss_mb": ("Peak memory (RSS)", "{:,.0f} MiB"),
    "train_peak_rss_mb": ("Peak memory while training", "{:,.0f} MiB"),
    "cuda_peak_mb": ("Peak GPU memory", "{:,.0f} MiB"),
    "avg_bits": (PLANNED_BITS_LABEL, "{:.2f}"),
    "planned_compression": (PLANNED_COMPRESSION_LABEL, "{:.1f}×"),
    "linear_bits_per_weight": (STORED_BITS_LABEL, "{:.2f}"),
    "file_bits_per_weight": ("Bits/weight (whole file)", "{:.2f}"),
    "compression_vs_fp32_linear": (STORED_COMPRESSION_LABEL, "{:.1f}×"),
    "compression_vs_fp32_file": ("Compression vs FP32 (whole file)", "{:.1f}×"),
    "export_bytes": ("Exported file", "bytes"),
    "skipped_steps": ("Skipped steps (NaN/Inf)", "{:,.0f}"),
    "qdiff_max": ("Max |quantized − FP logit|", "{:.4f}"),
    "qdiff_mean": ("Mean |quantized − FP logit|", "{:.4f}"),
    "teacher_tokens": ("Teacher tokens", "{:,.0f}"),
    "quantized_params": ("Quantized parameters", "{:,.0f}"),
}
# Keys that are not shown as values (per-step duplicates of a headline number, or internal).
HIDDEN_VALUES = ("final_step_loss", "loss", "optimizer")


def is_hybrid(run: dict) -> bool:
    """True for a hybrid run, False for the baseline (AdamW at constant LR). From the launcher's options, else
    the command line's --hybrid, else what the summary recorded."""
    args = run.get("args")
    if isinstance(args, dict):
        options = args.get("options")
        if isinstance(options, dict) and "hybrid" in options:
            return bool(options["hybrid"])
        argv = args.get("argv")
    else:
        argv = args
    if isinstance(argv, list) and argv:
        return "--hybrid" in [str(a) for a in argv]
    summary = run.get("summary") or {}
    return summary.get("avg_lr_multiplier") is not None


def kind_label(run: dict) -> str:
    return "hybrid optimizer" if is_hybrid(run) else "baseline: AdamW at constant LR"


def seq_len(run: dict) -> int | None:
    args = run.get("args") if isinstance(run.get("args"), dict) else {}
    options = args.get("options") if isinstance(args.get("options"), dict) else {}
    if options.get("seq_len"):
        return int(options["seq_len"])
    argv = [str(a) for a in (args.get("argv") or [])]
    if "--seq_len" in argv[:-1]:
        try:
            return int(argv[argv.index("--seq_len") + 1])
        except ValueError:
            pass
    return PRESET_SEQ_LEN.get(run.get("preset") or "tiny")


def tokens_per_step(run: dict) -> int | None:
    batch = (run.get("config") or {}).get("batch_size")
    length = seq_len(run)
    return int(batch) * int(length) if batch and length else None


def throughput(run: dict, steps: pd.DataFrame) -> float | None:
    """Tokens/s over the whole run: the summary's value once written; while training, tokens of the steps so far
    over the wall time they took (the same definition, evaluations included)."""
    summary = run.get("summary") or {}
    if summary.get("tokens_per_s"):
        return float(summary["tokens_per_s"])
    per_step = tokens_per_step(run)
    if per_step is None or steps is None or len(steps) < 2 or "wall_time" not in steps:
        return None
    first, last = steps.iloc[0], steps.iloc[-1]
    seconds = float(last.wall_time - first.wall_time)
    done = float(last.step - first.step)
    return per_step * done / seconds if seconds > 0 and done > 0 else None


def eta_seconds(run: dict, steps: pd.DataFrame, now: float | None = None) -> float | None:
    """Seconds left: the steps to go at the run's measured seconds per step (over every step so far, so
    evaluations are counted and it does not jump), counting down between new steps."""
    if run.get("status") not in ACTIVE_STATUSES or steps is None or len(steps) < 2:
        return None
    total = run.get("total_steps")
    if not total:
        return None
    first, last = steps.iloc[0], steps.iloc[-1]
    done = float(last.step - first.step)
    seconds = float(last.wall_time - first.wall_time)
    if done <= 0 or seconds <= 0:
        return None
    left = (total - float(last.step)) * seconds / done
    since_last = (now if now is not None else time.time()) - float(last.wall_time)
    return max(0.0, left - max(0.0, since_last))


def format_value(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    fmt = VALUE_LABELS.get(key, (key, "{:.4g}"))[1]
    if isinstance(value, str) or isinstance(value, bool):
        return str(value)
    if fmt == "duration":
        return format_duration(float(value))
    if fmt == "bytes":
        return f"{float(value) / 2**20:.2f} MiB" if value >= 2**20 else f"{float(value) / 1024:.1f} KiB"
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return str(value)


def format_cell(key: str, value) -> str:
    """A table cell: the same format as format_value, and an empty cell (not "—", not "None") when there is no
    value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return format_value(key, value)


def elapsed_seconds(run: dict, now: float | None = None) -> float | None:
    """Wall time from the run's start (setup included) to its end, or to now while it is active."""
    started, ended = run.get("started_at"), run.get("ended_at")
    if not started:
        return None
    return max(0.0, (ended or (time.time() if now is None else now)) - started)


def value_label(key: str) -> str:
    if key.startswith("val_loss_cluster_"):
        return f"Validation loss, cluster {key.rsplit('_', 1)[-1]}"
    return VALUE_LABELS.get(key, (key.replace("_", " ").capitalize(), ""))[0]


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs} s"


def optimizer_of(run: dict) -> str:
    """hybrid | adamw | custom: the summary's own word when it has one, else what the run was launched as."""
    summary = run.get("summary") or {}
    return summary.get("optimizer") or ("hybrid" if is_hybrid(run) else "adamw")


def summary_text(run: dict) -> str:
    """The summary block exactly as the trainer prints it (schema.render_summary, the one renderer): HYBRID
    OPTIMIZATION SUMMARY for a hybrid run, TRAINING SUMMARY (baseline: AdamW at constant LR) for the baseline."""
    return render_summary(run.get("summary") or {}, optimizer_of(run))


# -- setup stages (before the first training step) ------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    state: str               # "done", "active" or "pending"
    detail: str = ""
    fraction: float | None = None


# (stage, pattern that says it started, pattern that says it is done). Matched against the run's log lines, which
# the trainer writes as it goes; a stage a run skips (a cached teacher) is done as soon as a later one starts.
_STAGES = (
    ("Tokenizer", re.compile(r"tokenizer", re.I), re.compile(r"tokenizer .*(trained|loaded)|^Run ", re.I)),
    ("Teacher", re.compile(r"teacher", re.I),
     re.compile(r"teacher .*trained|teacher converted|teacher's top-\d+ logits|teacher logits", re.I)),
    ("Teacher logits", re.compile(r"teacher's top-\d+ logits|teacher logits", re.I),
     re.compile(r"teacher logits (cached|loaded)", re.I)),
    ("Clustering & student", re.compile(r"teacher logits (cached|loaded)", re.I), re.compile(r"^Initialized ", re.I)),
)
_LOGITS_PROGRESS = re.compile(r"teacher logits: (\d+)/(\d+)")


def setup_stages(logs: pd.DataFrame, has_steps: bool) -> list[Stage]:
    """The setup stages of a run from its log lines, each done / active / pending, the teacher logits with n/N."""
    messages = [str(m) for m in (logs.message if logs is not None and len(logs) else [])]
    stages = []
    for name, _, done_pattern in _STAGES:
        stages.append(Stage(name, "done" if has_steps or any(done_pattern.search(m) for m in messages)
                            else "pending"))
    # A later stage done means every earlier one is done (skipped or cached).
    for i in range(len(stages) - 1, -1, -1):
        if stages[i].state == "done":
            for earlier in stages[:i]:
                earlier.state = "done"
            break
    progress = [_LOGITS_PROGRESS.search(m) for m in messages]
    progress = [p for p in progress if p]
    if progress:
        done, total = int(progress[-1].group(1)), int(progress[-1].group(2))
        logits = stages[2]
        logits.detail = f"{done:,}/{total:,} windows"
        logits.fraction = done / total if total else None
    first_pending = next((s for s in stages if s.state == "pending"), None)
    if first_pending is not None and messages:
        first_pending.state = "active"
    setup_done = all(stage.state == "done" for stage in stages)
    stages.append(Stage("Training", "active" if has_steps or setup_done else "pending"))
    return stages


# The trainer's setup stages as the run store records them (RunWriter.stage / RunStore.read_stages): the name on the
# page and the unit of their n/N, in the order a first run goes through them.
STORE_STAGES = {"data": ("Reading the data", "characters"), "teacher": ("Teacher", "training steps"),
                "teacher_logits": ("Teacher logits", "windows"), "clustering": ("Clustering", "samples"),
                "student": ("Student", "")}


def store_stages(rows, has_steps: bool, now: float | None = None) -> list[Stage]:
    """The setup stages from the store's `stages` rows (dicts: stage, started_at, updated_at, ended_at, done, total,
    detail), each done / active / pending with n/N and an ETA from its own rate so far. Stages a run skipped (a
    cached teacher) are absent; the ones it has not reached yet are listed as waiting."""
    now = time.time() if now is None else now
    seen = {row["stage"]: row for row in rows}
    stages = []
    for key, (name, unit) in STORE_STAGES.items():
        row = seen.get(key)
        if row is None:
            later = any(k in seen for k in list(STORE_STAGES)[list(STORE_STAGES).index(key) + 1:])
            if later or has_steps:
                continue                      # skipped (cached, or not this kind of run): not shown
            stages.append(Stage(name, "pending"))
            continue
        state = "done" if row.get("ended_at") is not None or has_steps else "active"
        stage = Stage(name, state, detail=str(row.get("detail") or ""))
        done, total = row.get("done"), row.get("total")
        if state == "done":
            seconds = (row.get("ended_at") or now) - (row.get("started_at") or now)
            if seconds >= 0.1:        # a stage recorded after the fact (data read before the run record) has ~0
                stage.detail = stage.detail or f"took {format_duration(seconds)}"
        elif done is not None and total:
            stage.fraction = max(0.0, min(1.0, float(done) / float(total)))
            parts = [f"{_count(done)}/{_count(total)} {unit}".rstrip()]
            elapsed = (row.get("updated_at") or now) - (row.get("started_at") or now)
            if done > 0 and elapsed > 0:
                left = (float(total) - float(done)) * elapsed / float(done) - max(0.0, now - (row.get("updated_at")
                                                                                            or now))
                parts.append(f"about {format_duration(max(0.0, left))} left")
            stage.detail = " · ".join(parts + ([stage.detail] if row.get("detail") else []))
        else:
            since = now - (row.get("started_at") or now)
            stage.detail = stage.detail or f"running for {format_duration(max(0.0, since))}"
        stages.append(stage)
    for extra in rows:                          # a stage this page does not know yet: shown under its own name
        if extra["stage"] not in STORE_STAGES:
            state = "done" if extra.get("ended_at") is not None or has_steps else "active"
            stages.append(Stage(str(extra["stage"]).replace("_", " ").capitalize(), state,
                                detail=str(extra.get("detail") or "")))
    stages.append(Stage("Training", "active" if has_steps or all(s.state == "done" for s in stages) else "pending"))
    return stages


def _count(value) -> str:
    value = float(value)
    return f"{value / 1e6:.1f} M" if value >= 1e7 else f"{value:,.0f}"
