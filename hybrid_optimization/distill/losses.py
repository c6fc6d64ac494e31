"""The distillation loss: α · CE(student, data) + (1 − α) · T² · KL(teacher ‖ student) at temperature T.

The teacher is given by its cached top-k logits (values and student-vocabulary indices). Its distribution at
temperature T is the softmax over those k logits (the tail beyond the top k is dropped and the rest renormalised,
the usual sparse-KD approximation; with k = 32 the tail is small). The student's log-probabilities come from a
softmax over its whole (reduced) vocabulary, gathered at the teacher's k indices, so

    KL = Σ_i p_i (log p_i − log q_i)     over the teacher's top-k support,

which is ≥ 0 and is zero only when the student puts exactly the teacher's mass on those tokens. The T² factor keeps
the gradient scale of the soft term independent of T (Hinton et al., 2015).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_values: torch.Tensor,
                      teacher_indices: torch.Tensor, alpha: float = 0.5, temperature: float = 2.0
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """student_logits [B, L, V]; targets [B, L]; teacher_values/indices [B, L, k]. Returns (loss, parts)."""
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, vocab).float(), targets.reshape(-1))
    if alpha >= 1.0:
        return ce, {"ce": ce.detach(), "kl": torch.zeros(())}
    kl = topk_kl(student_logits, teacher_values, teacher_indices, temperature)
    loss = alpha * ce + (1.0 - alpha) * temperature ** 2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def topk_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher_topk ‖ student) at temperature T."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices.long())
    log_p = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
