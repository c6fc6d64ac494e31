"""After the loop: `summarize(state, plan, ...)` → RunSummary (schema.py; the guide's summary block), the metrics
CSV, and the export of the trained student (checked: the file reloads to exactly the student's logits)."""
from __future__ import annotations

import csv
import math
import resource
from pathlib import Path
from typing import Any, Callable

import torch

from ..schema import RunSummary, metrics_csv_header
from .loop import TrainState
from .plan import RunPlan


def summarize(state: TrainState, plan: RunPlan, timings: dict | None = None, final_eval: dict | None = None,
              teacher_val_loss: float | None = None) -> RunSummary:
    """The run's final numbers from its history (resumed segments included) and last evaluation; with the
    teacher's held-out loss on the same windows (Prepared.teacher_val_loss), the student's gap to it."""
    rows = state.history
    final_eval = final_eval if final_eval is not None else (state.evals[-1] if state.evals else {})
    finite = [h.loss for h in rows if math.isfinite(h.loss)]
    last_epoch = [h.loss for h in rows if rows and h.epoch == rows[-1].epoch and math.isfinite(h.loss)]
    taken = [h for h in rows if not h.skipped]
    multipliers = [h.lr_multiplier for h in taken if h.lr_multiplier is not None]
    active = [h.constraint_active for h in taken if h.constraint_active is not None]
    radius = next((h.trust_radius for h in reversed(rows) if h.trust_radius is not None), None)
    train_tokens = state.step * plan.batch_size * plan.seq_len
    extra: dict[str, Any] = dict(timings or {})
    extra.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, train_peak_rss_mb=peak_rss_mb(),
                 avg_bits=state.plan.avg_bits if state.plan is not None else (plan.bits if plan.bits < 16 else 32.0))
    if state.device.type == "cuda":
        extra["cuda_peak_mb"] = torch.cuda.max_memory_allocated(state.device) / 2 ** 20
    named = {k: v for k, v in final_eval.items() if k in ("val_loss", "val_ppl", "top1_agreement", "kl_teacher")}
    extra.update({k: v for k, v in final_eval.items() if k not in named and k != "step"})
    return RunSummary(
        steps_completed=state.step, final_loss=finite[-1] if finite else None,
        avg_lr_multiplier=sum(multipliers) / len(multipliers) if multipliers else None,
        constraint_activation_rate=sum(active) / len(active) if active else None,
        final_trust_radius=radius, optimizer=plan.optimizer,
        final_epoch_loss=sum(last_epoch) / len(last_epoch) if last_epoch else None,
        final_step_loss=rows[-1].loss if rows else None, skipped_steps=sum(1 for h in rows if h.skipped),
        tokens_per_s=train_tokens / state.train_seconds if state.train_seconds > 0 else 0.0,
        train_seconds=state.train_seconds, teacher_val_loss=teacher_val_loss, **named, extra=extra)


def write_metrics_csv(state: TrainState, path: Path) -> Path:
    """One row per step: its metrics, and the evaluation's where one was made at that step."""
    evals_at = {e["step"]: e for e in state.evals}
    columns = metrics_csv_header([k for e in state.evals for k in e])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for h in state.history:
            row = {**evals_at.get(h.step, {}), **h.as_dict()}
            writer.writerow([_csv(row.get(c)) for c in columns])
    return path


def export_trained(state: TrainState, plan: RunPlan, prepared, run_id: str, run_dir: Path, recorder,
                   say: Callable[[str], None]):
    """The packed student (and the run's --export format made from it) in the run folder; its ExportReport."""
    from .export import export_student, load_exported_student
    student = state.model
    path = run_dir / "student.safetensors"
    report, manifest = export_student(
        student, path, prepared.dataset.vocab,
        extra={"preset": plan.options.preset, "run_id": run_id, "teacher": prepared.teacher_description,
               "tokenizer_dir": str(prepared.teacher_directory), "seq_len": plan.seq_len})
    # Check the claim "loading the export reproduces the quantized student's logits exactly".
    loaded, _ = load_exported_student(path)
    probe = prepared.dataset.val.tokens[:4, :-1]
    student.eval()
    with torch.no_grad():
        same = torch.equal(loaded(probe), student.cpu()(probe))
    student.to(state.device).train()
    say(f"Exported the student to {path} ({report.file_bytes / 1024:.1f} KiB; manifest {manifest.name}): "
        f"linear layers {report.linear_bits_per_weight:.2f} bits/weight = {report.compression_vs_fp32_linear:.1f}× "
        f"smaller than FP32; whole file {report.file_bits_per_weight:.2f} bits/weight = "
        f"{report.compression_vs_fp32_file:.1f}× smaller; reloaded logits identical: {same}")
    recorder.set_artifact("export", path)
    recorder.set_artifact("export_manifest", manifest)
    if not same:
        raise RuntimeError(f"the exported student {path} does not reproduce the trained student's logits")
    fmt = plan.options.export_format
    if fmt != "packed":                   # gguf / hf are made from the packed student (run_export.py)
        from .run_export import export_packed_student
        result = export_packed_student(path, fmt)
        say(result.line)
        recorder.set_artifact(f"export_{fmt}", result.path)
    return report


def reset_peak_rss() -> None:
    """Linux: writing "5" to clear_refs resets the peak RSS (VmHWM), so a training loop's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """The process's peak RSS (VmHWM) since start or the last reset_peak_rss(); None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _csv(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    return value
