"""Validation of the (quantized) student against the data and the teacher.

Metrics (keys as stored in the run store's evals table):
- val_loss, val_ppl        cross-entropy on the next token (nats) of the quantized student and exp of it
- val_loss_fp              the same with full-precision latent weights (the gap to val_loss is the QAT cost)
- kl_teacher               KL(teacher top-k ‖ student) at T = 1, per position
- top1_agreement           fraction of positions where the student's argmax is the teacher's argmax
- qdiff_max, qdiff_mean    the guide's quantization diff: max / mean |logits_fp − logits_q|
- val_loss_cluster_<k>     val_loss over the validation windows of data cluster k

The student's reference is not evaluated here: the teacher's own cross-entropy on the same windows needs its full
logits, so it is computed once in the teacher's logits pass and cached with them (teacher.TeacherLogits.val_loss,
Prepared.teacher_val_loss); the summary's teacher_gap is val_loss minus it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..quantization.qlinear import QuantLinear
from .losses import topk_kl


@contextlib.contextmanager
def full_precision(model: torch.nn.Module):
    """Temporarily run every QuantLinear with its latent full-precision weights."""
    saved = []
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.is_quantized:
            saved.append((module, module.bits, module.fixed_scale))
            module.bits = 32
    try:
        yield
    finally:
        for module, bits, fixed_scale in saved:
            module.bits = bits
            module.fixed_scale = fixed_scale


def is_quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) and m.is_quantized for m in model.modules())


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, teacher_values: torch.Tensor,
             teacher_indices: torch.Tensor, clusters: torch.Tensor | None = None, batch_size: int = 32,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Metrics over `windows` (student ids [n, L+1]) with the teacher's cached top-k logits for them."""
    was_training = model.training
    model.eval()
    quantized = is_quantized(model)
    n = windows.shape[0]
    ce_sum = torch.zeros(n, dtype=torch.float64)           # per-window summed CE (for per-cluster losses)
    ce_fp_total = kl_total = agree_total = qdiff_sum = 0.0
    qdiff_max = 0.0
    positions = 0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        values = teacher_values[start:start + batch_size].to(device)
        indices = teacher_indices[start:start + batch_size].to(device)
        logits = model(inputs).float()
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")       # [b, L]
        ce_sum[start:start + len(batch)] = ce.sum(1).double().cpu()
        count = targets.numel()
        kl_total += float(topk_kl(logits, values, indices, 1.0)) * count
        teacher_top1 = indices.gather(-1, values.argmax(-1, keepdim=True)).squeeze(-1).long()
        agree_total += float((logits.argmax(-1) == teacher_top1).sum())
        if quantized:
            with full_precision(model):
                logits_fp = model(inputs).float()
            ce_fp_total += float(F.cross_entropy(logits_fp.transpose(1, 2), targets, reduction="sum"))
            diff = (logits_fp - logits).abs()
            qdiff_max = max(qdiff_max, float(diff.max()))
            qdiff_sum += float(diff.mean()) * count
        positions += count
    model.train(was_training)
    length = windows.shape[1] - 1
    val_loss = float(ce_sum.sum()) / positions
    metrics = {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_loss_fp": ce_fp_total / positions if quantized else val_loss,
        "kl_teacher": kl_total / positions,
        "top1_agreement": agree_total / positions,
        "qdiff_max": qdiff_max,
        "qdiff_mean": qdiff_sum / positions,
    }
    if clusters is not None:
        for cluster in torch.unique(clusters).tolist():
            mask = clusters == cluster
            metrics[f"val_loss_cluster_{int(cluster)}"] = float(ce_sum[mask].sum()) / (int(mask.sum()) * length)
    return metrics
