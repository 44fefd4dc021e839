"""The training loss as a sum of composable terms: task loss, distillation, a method's penalty.

``loss = Σ weight_i · term_i(batch)``. A new loss (a debiasing loss, hidden-state
distillation) is one `LossTerm` subclass registered in `LOSS_TERMS`, not a branch in the
trainer. A term may read extra per-example columns (``columns``, e.g. a bias model's
probabilities): the trainer keeps them through the Trainer's column removal, takes them out
of the model's inputs and hands them to the terms in ``batch.extras``.

Every term is a mean over the examples (or labelled positions) of its micro-batch; the
Trainer divides by the gradient-accumulation steps and DDP averages over ranks, so the
gradient is the same for 4 x 8 as for 1 x 32 examples, on one process or many.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sparsebert.registry import Registry


def soft_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(z_t/T) || softmax(z_s/T)), averaged over rows; MSE for one output
    (regression). Rows are examples, labelled tokens or masked positions."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)}: teacher and student need the same task head"
        )
    teacher_logits = teacher_logits.detach()
    if student_logits.shape[-1] == 1:  # regression (STS-B)
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    hardness: float = 1.0,
    temperature: float = 2.0,
) -> torch.Tensor:
    """L = (1 - h) CE(y, z_s) + h T^2 KL(softmax(z_t/T) || softmax(z_s/T)) for sequence logits.

    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al.).
    The KL is averaged over examples ("batchmean"), matching the per-example CE.
    For a regression head (one output), both terms are mean squared errors.
    The trainer composes the same sum from `TaskLoss` and `Distillation` terms.
    """
    soft = soft_kd(student_logits, teacher_logits, temperature)
    if hardness >= 1.0 or labels is None:
        return soft
    if student_logits.shape[-1] == 1:
        hard = F.mse_loss(student_logits.squeeze(-1).float(), labels.float())
    else:
        hard = F.cross_entropy(student_logits.float(), labels)
    return (1.0 - hardness) * hard + hardness * soft


@dataclass
class LossBatch:
    """What a term sees: the student's outputs and inputs (labels included), the extra
    per-example columns, the task (which outputs distillation compares) and, lazily, the
    teacher's outputs on the teacher's own inputs."""

    outputs: Any
    inputs: Mapping[str, torch.Tensor]
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    task: Any = None
    teacher_fn: Callable[[], Any] | None = None
    _teacher: Any = None

    @property
    def teacher_outputs(self) -> Any:
        if self._teacher is None:
            if self.teacher_fn is None:
                raise ValueError("this loss term needs a teacher, and the run has none")
            self._teacher = self.teacher_fn()
        return self._teacher


class LossTerm:
    """One weighted term of the training loss."""

    name = "term"
    columns: tuple[str, ...] = ()  # extra per-example columns this term reads
    needs_teacher = False
    model_kwargs: Mapping[str, Any] = {}  # extra forward arguments (e.g. output_hidden_states)
    needs_eager_attention = False  # attention maps: SDPA does not return them

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def __call__(self, batch: LossBatch) -> torch.Tensor | None:
        raise NotImplementedError


class TaskLoss(LossTerm):
    """The model's own loss on the labels (CE, MSE for regression, token CE where labels != -100,
    start/end CE for QA, masked-token CE for MLM)."""

    name = "task_loss"

    def __call__(self, batch: LossBatch) -> torch.Tensor | None:
        loss = getattr(batch.outputs, "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss: the batch has no labels")
        return loss


class Distillation(LossTerm):
    """T^2 KL between teacher and student over the outputs the task names (sequence logits,
    labelled tokens, masked positions, QA start and end), averaged over those outputs."""

    name = "kd_loss"
    needs_teacher = True

    def __init__(self, weight: float = 1.0, temperature: float = 2.0):
        super().__init__(weight)
        self.temperature = float(temperature)

    def __call__(self, batch: LossBatch) -> torch.Tensor:
        student = batch.task.distillation_logits(batch.outputs, batch.inputs)
        teacher = batch.task.distillation_logits(batch.teacher_outputs, batch.inputs)
        terms = [soft_kd(s, t.to(s.device), self.temperature) for s, t in zip(student, teacher, strict=True)]
        return torch.stack(terms).mean()


LOSS_TERMS: Registry[type[LossTerm]] = Registry(
    "loss term", builtins=["sparsebert.debias", "sparsebert.layer_distillation"]
)
LOSS_TERMS.register("task", TaskLoss)
LOSS_TERMS.register("kd", Distillation)


def distillation_terms(hardness: float, temperature: float, with_teacher: bool,
                       hidden: float = 0.0, attention: float = 0.0) -> list[LossTerm]:
    """Task loss and KD as the recipe's distillation section mixes them:
    (1 - h) task + h KD with a teacher, the task loss alone without; plus the layer-wise
    terms (`layer_distillation`) with weights ``hidden`` and ``attention`` when > 0."""
    if not with_teacher:
        return [TaskLoss()]
    terms: list[LossTerm] = []
    if hardness < 1.0:
        terms.append(TaskLoss(1.0 - hardness))
    if hardness > 0.0:
        terms.append(Distillation(hardness, temperature))
    if hidden > 0.0:
        terms.append(LOSS_TERMS.get("hidden-kd")(hidden))
    if attention > 0.0:
        terms.append(LOSS_TERMS.get("attention-kd")(attention))
    return terms


__all__ = [
    "LOSS_TERMS",
    "Distillation",
    "LossBatch",
    "LossTerm",
    "TaskLoss",
    "distillation_terms",
    "kd_loss",
    "soft_kd",
]
