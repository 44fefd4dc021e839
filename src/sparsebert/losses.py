"""Training losses: knowledge distillation (GMP*, Sparse*BERT, movement, SMP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    hardness: float = 1.0,
    temperature: float = 2.0,
) -> torch.Tensor:
    """L = (1 - h) CE(y, z_s) + h T^2 KL(softmax(z_t/T) || softmax(z_s/T)).

    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al.).
    The KL is averaged over examples ("batchmean"), matching the per-example CE.
    For a regression head (one output), both terms are mean squared errors.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)}: teacher and student need the same task head"
        )
    teacher_logits = teacher_logits.detach()
    if student_logits.shape[-1] == 1:  # regression (STS-B)
        soft = F.mse_loss(student_logits.float(), teacher_logits.float())
        hard = F.mse_loss(student_logits.squeeze(-1).float(), labels.float()) if labels is not None else 0.0
        return (1.0 - hardness) * hard + hardness * soft
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    if hardness >= 1.0 or labels is None:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels)
    return (1.0 - hardness) * hard + hardness * soft
