"""Debiasing losses (SRNets; Clark et al. 2019, Utama et al. 2020), as loss terms.

Each reads the bias-only model's probabilities p_b of the example (the extra per-example
column ``bias_probs``, one value per label, from `sparsebert.bias_models`) and replaces
the task-loss term of a run; distillation, where the recipe has it, stays.

- ``poe`` (product of experts): CE(log_softmax(z) + log p_b, y). The bias and the model are
  multiplied and renormalised; only the model is trained, so it need not learn what p_b
  already explains: on an example the bias gets right the gradient on the label logit is
  smaller than with plain CE.
- ``reweight`` (example reweighting): w = 1 - p_b(y), loss Σ w·CE(z, y) / Σ w over the batch.
- ``conf-reg`` (confidence regularisation, needs a teacher fine-tuned with plain CE): the
  teacher's probabilities t are scaled to t_j^(1 - p_b(y)) and renormalised; the loss is the
  cross-entropy of the student against them, -Σ_j t̃_j log softmax(z)_j, averaged.

Every term is a mean over its micro-batch, like the other terms (the reweighted loss is the
weighted mean of its micro-batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsebert.errors import SparseBertError
from sparsebert.losses import LOSS_TERMS, LossBatch, LossTerm, TaskLoss

logger = logging.getLogger("sparsebert")

BIAS_COLUMN = "bias_probs"
DEBIAS_METHODS = ("poe", "reweight", "conf-reg")
_EPS = 1e-12


# -- the formulas -----------------------------------------------------------------------------------
def poe_loss(logits: torch.Tensor, bias_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Product of experts: CE(log_softmax(z) + log p_b, y), mean over examples."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_b = torch.log(bias_probs.float().clamp_min(_EPS)).to(log_p.device)
    return F.cross_entropy(log_p + log_b, labels)


def reweight_loss(logits: torch.Tensor, bias_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Example reweighting: w = 1 - p_b(y); Σ w·CE / Σ w."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    w = 1.0 - bias_probs.float().to(ce.device).gather(1, labels.view(-1, 1)).squeeze(1)
    return (w * ce).sum() / w.sum().clamp_min(_EPS)


def scaled_teacher_probs(teacher_probs: torch.Tensor, bias_probs: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """Confidence regularisation's targets: t_j^(1 - p_b(y)), renormalised over j."""
    exponent = 1.0 - bias_probs.float().gather(1, labels.view(-1, 1))
    scaled = teacher_probs.float().clamp_min(_EPS) ** exponent
    return scaled / scaled.sum(dim=-1, keepdim=True)


def conf_reg_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, bias_probs: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Confidence regularisation: CE of the student against the scaled teacher probabilities."""
    target = scaled_teacher_probs(F.softmax(teacher_logits.detach().float(), dim=-1),
                                  bias_probs.to(teacher_logits.device), labels.to(teacher_logits.device))
    return -(target.to(logits.device) * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


# -- the loss terms -------------------------------------------------------------------------------------
class DebiasTerm(LossTerm):
    """Base: reads ``bias_probs`` (and the labels) of the micro-batch."""

    columns = (BIAS_COLUMN,)

    def _parts(self, batch: LossBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if BIAS_COLUMN not in batch.extras:
            raise ValueError(f"the {self.name} loss needs the '{BIAS_COLUMN}' column in the training set")
        labels = batch.inputs.get("labels")
        if labels is None:
            raise ValueError(f"the {self.name} loss needs labels")
        logits = batch.outputs.logits
        if logits.dim() != 2 or logits.shape[-1] < 2:
            raise ValueError(f"the {self.name} loss is for classification logits, got {tuple(logits.shape)}")
        bias = batch.extras[BIAS_COLUMN].to(logits.device)
        if bias.shape != logits.shape:
            raise ValueError(f"bias probabilities {tuple(bias.shape)} do not match logits "
                             f"{tuple(logits.shape)}")
        return logits, bias, labels.to(logits.device)


class ProductOfExperts(DebiasTerm):
    name = "poe_loss"

    def __call__(self, batch: LossBatch) -> torch.Tensor:
        return poe_loss(*self._parts(batch))


class ExampleReweighting(DebiasTerm):
    name = "reweight_loss"

    def __call__(self, batch: LossBatch) -> torch.Tensor:
        return reweight_loss(*self._parts(batch))


class ConfidenceRegularisation(DebiasTerm):
    name = "conf_reg_loss"
    needs_teacher = True

    def __call__(self, batch: LossBatch) -> torch.Tensor:
        logits, bias, labels = self._parts(batch)
        teacher = batch.task.distillation_logits(batch.teacher_outputs, batch.inputs)[0] \
            if batch.task is not None else batch.teacher_outputs.logits
        return conf_reg_loss(logits, teacher.to(logits.device), bias, labels)


DEBIAS_TERMS: dict[str, type[DebiasTerm]] = {
    "poe": ProductOfExperts,
    "reweight": ExampleReweighting,
    "conf-reg": ConfidenceRegularisation,
}
for _name, _cls in DEBIAS_TERMS.items():
    LOSS_TERMS.register(_name, _cls)


# -- wiring into a run ------------------------------------------------------------------------------------
@dataclass
class DebiasOptions:
    """``--debias METHOD --bias-probs FILE``."""

    method: str
    bias_probs: str

    def __post_init__(self) -> None:
        if self.method not in DEBIAS_METHODS:
            raise SparseBertError(f"unknown --debias '{self.method}': one of {', '.join(DEBIAS_METHODS)}")
        if not self.bias_probs:
            raise SparseBertError(f"--debias {self.method} needs --bias-probs FILE (made by "
                                  "`sparsebert bias-model`)")

    @property
    def needs_teacher(self) -> bool:
        return DEBIAS_TERMS[self.method].needs_teacher


def check_teacher(debias: DebiasOptions | None, teacher_path: str | None) -> None:
    if debias is not None and debias.needs_teacher and teacher_path is None:
        raise SparseBertError(
            f"--debias {debias.method} needs --teacher: a model fine-tuned on the task with plain "
            "cross-entropy, whose scaled probabilities are the targets"
        )


def apply_debias(debias: DebiasOptions, task: Any, raw_train: Any, train_ds: Any,
                 terms: list[LossTerm]) -> tuple[Any, list[LossTerm], dict[str, Any]]:
    """The training set with its ``bias_probs`` column (checked against the examples by hash)
    and the loss terms with the debias term in place of the task-loss term."""
    from sparsebert.bias_models import load_bias_probs

    if task.kind != "sequence-classification" or task.is_regression:
        raise SparseBertError(f"--debias is for classification tasks; {task.name} is {task.kind}")
    bias = load_bias_probs(debias.bias_probs)
    bias.check(raw_train, task.num_labels, f"bias probabilities '{debias.bias_probs}'")
    if len(train_ds) != len(bias.probs):
        raise SparseBertError(
            f"the encoded training set has {len(train_ds)} rows, the bias probabilities {len(bias.probs)}"
        )
    if bias.meta.get("labels") not in (None, list(task.labels)):
        raise SparseBertError(
            f"bias probabilities are over the labels {bias.meta['labels']}, {task.name}'s are "
            f"{list(task.labels)}"
        )
    task_terms = [t for t in terms if isinstance(t, TaskLoss)]
    if not task_terms:
        raise SparseBertError(
            "--debias replaces the task-loss term, and this run has none: the recipe distils with "
            "distillation.hardness 1.0 from the teacher. Use --set distillation.hardness=0.5 (task "
            "loss and KD), or --set distillation.enabled=false (the debiasing loss alone)"
        )
    term_cls = DEBIAS_TERMS[debias.method]
    new_terms = [term_cls(t.weight) if isinstance(t, TaskLoss) else t for t in terms]
    train_ds = train_ds.add_column(BIAS_COLUMN, [[float(v) for v in row] for row in bias.probs])
    info = {"method": debias.method, "bias_probs": debias.bias_probs, "bias_kind": bias.meta.get("kind"),
            "examples_hash": bias.examples_hash, "term": term_cls.name}
    logger.info("debiasing with %s: %s replaces the task loss (bias model %s, %d examples, hash %s)",
                debias.method, term_cls.name, bias.meta.get("kind"), len(bias.probs), bias.examples_hash[:12])
    return train_ds, new_terms, info


def debias_from_cli(ns: Any) -> tuple[DebiasOptions | None, list[str]]:
    """`DebiasOptions` from ``--debias`` / ``--bias-probs`` (None without them), and the recipe
    overrides they imply: `finetune` never distils, so its ``--teacher`` (allowed only as the
    teacher of ``--debias conf-reg``) does not turn on the recipe's distillation."""
    method, path = getattr(ns, "debias", None), getattr(ns, "bias_probs", None)
    finetune_teacher = getattr(ns, "command", None) == "finetune" and getattr(ns, "teacher", None)
    if method is None:
        if path:
            raise SparseBertError(f"--bias-probs is used with --debias {'|'.join(DEBIAS_METHODS)}")
        if finetune_teacher:
            raise SparseBertError("finetune does not distil: its --teacher is the teacher of --debias "
                                  "conf-reg (for distillation use `sparsebert prune` with a recipe)")
        return None, []
    options = DebiasOptions(method, path)
    if finetune_teacher and not options.needs_teacher:
        raise SparseBertError(f"finetune --debias {method} uses no teacher: drop --teacher")
    return options, (["distillation.enabled=false"] if getattr(ns, "command", None) == "finetune" else [])


__all__ = [
    "BIAS_COLUMN", "DEBIAS_METHODS", "DEBIAS_TERMS", "ConfidenceRegularisation", "DebiasOptions",
    "ExampleReweighting", "ProductOfExperts", "apply_debias", "check_teacher", "conf_reg_loss",
    "debias_from_cli", "poe_loss", "reweight_loss", "scaled_teacher_probs",
]
