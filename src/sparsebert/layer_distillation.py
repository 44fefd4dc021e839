"""Layer-wise distillation: the student's hidden states and attention maps follow the teacher's.

Logit KD tells a pruned student what to answer; layer-wise KD also tells every layer what
to compute, which is what recovers accuracy when most weights are gone (TinyBERT, MiniLM;
oBERT and the GMP* paper distil logits only). Here the teacher is normally the dense model
the student was pruned from, so layers match one to one; with a shallower student, student
layer i (1-based) follows teacher layer round(i * L_t / L_s) (uniform mapping).

Two loss terms, usable with every method (recipe keys ``distillation.hidden`` and
``distillation.attention`` are their weights; 0 = off):

- ``hidden-kd``: mean over layers l = 0..L (0 = embedding output) of the mean squared error
  between student and teacher hidden states, over the real (non-padding) tokens:
  ``(1/(L+1)) Σ_l Σ_{tokens} ||h_s - h_t||² / (n_tokens · d)``.
- ``attention-kd``: mean over layers and heads of KL(A_t || A_s) per query row, over the real
  query tokens: ``(1/L) Σ_l (1/(H·n_tokens)) Σ_{h, i} Σ_j A_t[h,i,j] log(A_t[h,i,j] / A_s[h,i,j])``
  (MiniLM's self-attention distribution transfer, at every layer).

Attention maps need the eager attention implementation (SDPA does not return them): the
trainer switches student and teacher to it when ``attention-kd`` is on (slower, same math).
"""

from __future__ import annotations

import torch

from sparsebert.losses import LOSS_TERMS, LossBatch, LossTerm


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based, 0 = embeddings) that student layer i follows, for i = 1..L_s."""
    if student_layers > teacher_layers:
        raise ValueError(
            f"layer-wise distillation: the student has {student_layers} layers, more than the "
            f"teacher's {teacher_layers}; use a teacher at least as deep, or logit KD only"
        )
    return [round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)]


def _token_mask(batch: LossBatch, length: int, device) -> torch.Tensor:
    mask = batch.inputs.get("attention_mask")
    if mask is None:
        return torch.ones(1, length, dtype=torch.bool, device=device)
    if mask.shape[-1] != length:
        raise ValueError(
            "layer-wise distillation needs the teacher to read the student's inputs (the same "
            "tokens); this run gives the teacher its own encoding (a prompt or another tokenizer)"
        )
    return mask.to(device).bool()


def _outputs(batch: LossBatch, key: str, what: str) -> tuple[tuple[torch.Tensor, ...], ...]:
    student = getattr(batch.outputs, key, None)
    teacher = getattr(batch.teacher_outputs, key, None)
    if not student or not teacher:
        who = "student" if not student else "teacher"
        raise ValueError(
            f"layer-wise distillation: the {who} returned no {what} ({key}); this model class "
            "does not expose them, use logit KD only (distillation.hidden / attention = 0)"
        )
    return tuple(student), tuple(teacher)


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                      mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers (embeddings included) of the per-token MSE over real tokens."""
    pairs = [(0, 0)] + list(zip(range(1, len(student)), layer_map(len(student) - 1, len(teacher) - 1),
                                strict=True))
    weight = mask.unsqueeze(-1).float()
    count = weight.sum().clamp_min(1.0)
    losses = []
    for s, t in pairs:
        hs, ht = student[s].float(), teacher[t].detach().float().to(student[s].device)
        if hs.shape != ht.shape:
            raise ValueError(
                f"layer-wise distillation: student hidden states {tuple(hs.shape)} and teacher's "
                f"{tuple(ht.shape)} differ (hidden size?); use logit KD only"
            )
        losses.append((((hs - ht) ** 2) * weight).sum() / (count * hs.shape[-1]))
    return torch.stack(losses).mean()


def attention_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                   mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of KL(A_t || A_s) per (head, real query row)."""
    losses = []
    rows = mask.unsqueeze(1).float()  # (batch, 1, query)
    for s, t in zip(range(len(student)), layer_map(len(student), len(teacher)), strict=True):
        a_s, a_t = student[s].float(), teacher[t - 1].detach().float().to(student[s].device)
        if a_s.shape != a_t.shape:
            raise ValueError(
                f"layer-wise distillation: student attention {tuple(a_s.shape)} and teacher's "
                f"{tuple(a_t.shape)} differ (number of heads?); use distillation.attention = 0"
            )
        eps = 1e-12
        kl = (a_t * ((a_t + eps).log() - (a_s + eps).log())).sum(-1)  # (batch, heads, query)
        count = (rows.sum() * a_s.shape[1]).clamp_min(1.0)
        losses.append((kl * rows).sum() / count)
    return torch.stack(losses).mean()


class HiddenStateDistillation(LossTerm):
    """MSE between student and teacher hidden states, layer by layer."""

    name = "hidden_kd"
    needs_teacher = True
    model_kwargs = {"output_hidden_states": True}

    def __call__(self, batch: LossBatch) -> torch.Tensor:
        student, teacher = _outputs(batch, "hidden_states", "hidden states")
        return hidden_state_loss(student, teacher, _token_mask(batch, student[0].shape[1], student[0].device))


class AttentionDistillation(LossTerm):
    """KL between teacher and student attention distributions, layer by layer."""

    name = "attention_kd"
    needs_teacher = True
    model_kwargs = {"output_attentions": True}
    needs_eager_attention = True

    def __call__(self, batch: LossBatch) -> torch.Tensor:
        student, teacher = _outputs(batch, "attentions", "attention maps")
        return attention_loss(student, teacher, _token_mask(batch, student[0].shape[-1], student[0].device))


LOSS_TERMS.register("hidden-kd", HiddenStateDistillation)
LOSS_TERMS.register("attention-kd", AttentionDistillation)

__all__ = [
    "AttentionDistillation", "HiddenStateDistillation", "attention_loss", "hidden_state_loss", "layer_map",
]
