"""What every learned-mask method shares: scores attached to the targets, a per-step update
driven by the run's position, the score penalty, which parameters train, and the exact bake.

A method subclasses `LearnedMaskMethod` and implements `update` (how its binariser's keep
ratio or threshold follows the schedule); its recipe rules (binariser, whether weights
train, allocations, score init) and the defaults of its ``masks`` section live on the class.
Everything here is derived from the global step and from state that lives in the model's
state dict (scores, thresholds, keep counts), so a run resumed from a Trainer checkpoint
continues exactly where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sparsebert.allocation import n_pruned
from sparsebert.config import Recipe
from sparsebert.errors import SparseBertError
from sparsebert.heads import is_task_head
from sparsebert.learned_masks import BINARIZERS, SCORE_INITS, LearnedMasks, binary_mask
from sparsebert.losses import LossBatch, LossTerm
from sparsebert.methods.base import MethodContext, PruningMethod
from sparsebert.schedules import GradualSchedule, cubic_ramp

logger = logging.getLogger("sparsebert")

HEADS = ("classifier", "auto", "prompt")


@dataclass
class PenaltyConfig:
    """λ_t · mean over matrices of ||σ(S)||_1 / numel, λ_t ramping cubically from 0 to ``lambda``
    over the schedule's [start, end] (SMP, soft movement). YAML key: ``lambda``."""

    lambda_: float = field(default=0.0, metadata={"key": "lambda"})


@dataclass
class MasksConfig:
    """The ``masks`` section of the learned-mask methods."""

    owners: ClassVar[str] = "learned-mask methods"  # how a misplaced section's error names them

    binarizer: str = "topk"  # topk | threshold | sigmoid-threshold
    init: str = "zeros"  # zeros | magnitude | magnitude-hard | magnitude-soft
    threshold: float = 0.0  # φ (threshold) or the final τ (sigmoid-threshold)
    score_lr: float = 1e-2
    train_weights: bool = True
    train_head: bool = True  # with frozen weights: does the classification head train?
    head: str = "classifier"  # classifier | auto (MLM head + prompt if there is one) | prompt
    realloc_temperature: float = 1.0  # SMP-S: p in σ(S/p)
    final_hold: float = 0.0  # last fraction of training with the exact top-k mask at the target
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)


class MaskPenalty(LossTerm):
    """The method's score penalty λ_t · mean σ(S) as a loss term (training only)."""

    name = "mask_penalty"

    def __init__(self, method: LearnedMaskMethod):
        super().__init__(1.0)
        self.method = method

    def __call__(self, batch: LossBatch) -> torch.Tensor | None:
        return self.method.penalty()


class LearnedMaskMethod(PruningMethod):
    """Base of movement, soft movement, SMP-L/S and mask training."""

    name = "learned"
    sections = {"masks": MasksConfig}
    lr_rewarm_default = False  # masks change every step: nothing to re-warm at
    # what the method fixes; a recipe that contradicts it is no longer that paper's method
    binarizers: ClassVar[tuple[str, ...]] = BINARIZERS
    trains_weights: ClassVar[bool] = True
    score_inits: ClassVar[tuple[str, ...]] = SCORE_INITS

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe,
                 context: MethodContext | None = None):
        super().__init__(model, params, recipe, context)
        assert recipe.masks is not None
        self.cfg: MasksConfig = recipe.masks
        self.schedule: GradualSchedule = recipe.gradual_schedule()
        self.target_sparsity = recipe.sparsity
        self.allocation = recipe.allocation
        self.masks = LearnedMasks(
            model, params, self.cfg.binarizer, self.cfg.init, self.cfg.threshold, self.initial_sparsity()
        )
        self.lambda_t = 0.0
        self.last_penalty = 0.0  # λ_t · penalty of the last training batch (for the logs)
        self.in_final_hold = False
        self.finish_report: dict[str, Any] = {}

    # -- recipe schema -------------------------------------------------------------------------------
    @classmethod
    def validate_recipe(cls, r: Recipe, source: str) -> None:
        """Validate the ``masks`` section against the method and the allowed values."""
        m, where = r.masks, f"{source}: masks"
        if m.binarizer not in BINARIZERS:
            raise SparseBertError(
                f"{where}.binarizer: unknown '{m.binarizer}'; use one of {', '.join(BINARIZERS)}"
            )
        if m.init not in SCORE_INITS:
            raise SparseBertError(f"{where}.init: unknown '{m.init}'; use one of {', '.join(SCORE_INITS)}")
        if m.head not in HEADS:
            raise SparseBertError(f"{where}.head: unknown '{m.head}'; use one of {', '.join(HEADS)}")
        if m.score_lr <= 0:
            raise SparseBertError(f"{where}.score_lr must be > 0, got {m.score_lr:g}")
        if m.realloc_temperature <= 0:
            raise SparseBertError(f"{where}.realloc_temperature must be > 0, got {m.realloc_temperature:g}")
        if not 0.0 <= m.final_hold < 1.0:
            raise SparseBertError(f"{where}.final_hold must be a fraction of training in [0, 1)")
        if m.penalty.lambda_ < 0:
            raise SparseBertError(f"{where}.penalty.lambda must be >= 0, got {m.penalty.lambda_:g}")
        if m.binarizer == "sigmoid-threshold" and not 0.0 < m.threshold < 1.0:
            raise SparseBertError(f"{where}.threshold: τ of the sigmoid threshold must be in (0, 1)")
        if m.init == "magnitude-hard" and m.threshold <= 0:
            raise SparseBertError(f"{where}.threshold: magnitude-hard init needs φ > 0 (e.g. 0.01)")
        if m.binarizer not in cls.binarizers:
            raise SparseBertError(
                f"{where}.binarizer: method '{r.method}' uses {' or '.join(cls.binarizers)}, "
                f"not '{m.binarizer}'"
            )
        if m.train_weights != cls.trains_weights:
            what = "trains the weights" if cls.trains_weights else "freezes the weights (only scores learn)"
            raise SparseBertError(
                f"{where}.train_weights: method '{r.method}' {what}; set train_weights: "
                f"{str(cls.trains_weights).lower()}"
            )
        if m.init not in cls.score_inits:
            raise SparseBertError(f"{where}.init: method '{r.method}' uses {' or '.join(cls.score_inits)}")
        if r.lr.rewarm:
            raise SparseBertError(
                f"{source}: lr.rewarm re-warms the LR at GMP's pruning steps; learned-mask methods "
                "change their masks every step, set lr.rewarm: false"
            )

    # -- what trains ----------------------------------------------------------------------------------
    @property
    def weights_trained(self) -> bool:
        return self.cfg.train_weights

    def initial_sparsity(self) -> float:
        """Sparsity of the masks the scores start with (0: start dense)."""
        return 0.0

    def configure_trainable(self, model: nn.Module) -> list[str]:
        """Set requires_grad: scores always; all weights if the method trains them, else only
        the task head (pooler + classifier) when the context says the head trains. Returns the
        trained weights."""
        score_ids = {id(p) for p in self.masks.score_parameters()}
        trained = []
        for name, p in model.named_parameters():
            if id(p) in score_ids:
                p.requires_grad_(True)
                continue
            train = self.weights_trained or (self.context.head_trains and is_task_head(name))
            p.requires_grad_(train)
            if train:
                trained.append(name)
        return trained

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The scores: their own learning rate (masks.score_lr), no weight decay."""
        scores = [p for p in self.masks.score_parameters() if p.requires_grad]
        return [{"params": scores, "weight_decay": 0.0, "lr": self.cfg.score_lr}] if scores else []

    # -- per step ----------------------------------------------------------------------------------------
    def on_step_begin(self, step, total_steps, optimizer) -> dict | None:
        self.step(step, total_steps)
        return None

    def on_optimizer_step(self) -> None:
        self.masks.invalidate()  # the scores moved: recompute the masks at the next forward

    def on_train_end(self, args: Any) -> None:
        self.finish()

    def loss_terms(self) -> list[LossTerm]:
        return [MaskPenalty(self)]

    def report(self) -> dict[str, Any]:
        return self.finish_report

    def step(self, step: int, total_steps: int) -> None:
        """Called at the beginning of every optimizer step."""
        t0 = int(round(self.schedule.start * total_steps))
        t1 = int(round(self.schedule.end * total_steps))
        self.lambda_t = cubic_ramp(step, t0, t1, self.cfg.penalty.lambda_)
        hold_from = total_steps - int(round(self.cfg.final_hold * total_steps))
        if self.cfg.final_hold > 0 and step >= hold_from:
            if not self.in_final_hold:
                self.finish_report["binarizer_sparsity_at_final_hold"] = self.masks.sparsity()
                logger.info("final hold from step %d: exact top-k masks at %.2f%% sparsity",
                            step, 100 * self.target_sparsity)
            self.in_final_hold = True
            self.masks.set_binarizer("topk")
            self.masks.set_keep_ratio(1.0 - self.target_sparsity, "uniform")
            return
        self.update(step, total_steps)

    def update(self, step: int, total_steps: int) -> None:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | None:
        """λ_t · mean over matrices of ||σ(S)||_1 / numel, or None while λ_t is 0."""
        if self.lambda_t <= 0:
            self.last_penalty = 0.0
            return None
        penalty = self.lambda_t * self.masks.penalty()
        self.last_penalty = float(penalty.detach())
        return penalty

    def log_values(self) -> dict[str, float]:
        """Mask state for the training log (``loss`` includes ``mask_penalty``)."""
        if self.masks.baked:
            return {}
        return {"mask_sparsity": round(self.masks.sparsity(), 6), "mask_lambda": round(self.lambda_t, 4),
                "mask_penalty": round(self.last_penalty, 4)}

    # -- the end ----------------------------------------------------------------------------------------
    def raw_binarizer_sparsity(self) -> float:
        """What the method's own binariser (its configured threshold) gives on the final scores."""
        total = kept = 0
        for m in self.masks.masks.values():
            b = binary_mask(m.scores, self.cfg.binarizer, m.keep, m.threshold)
            total, kept = total + m.numel, kept + int(b.sum())
        return 1.0 - kept / total if total else 0.0

    def final_masks(self) -> dict[str, torch.Tensor]:
        """Exact masks at the target: top-k of the learned scores, round(s·n) pruned per matrix."""
        return self.masks.exact_masks(self.target_sparsity)

    def finish(self) -> dict[str, Any]:
        """Bake exact masks into the weights; return what happened (for sparsebert.json)."""
        if self.masks.baked:
            return self.finish_report
        raw = self.raw_binarizer_sparsity()
        final = self.final_masks()
        baked = self.masks.bake(final)
        self.finish_report.update({
            "method": self.name,
            "binarizer": self.cfg.binarizer,
            "raw_binarizer_sparsity": raw,
            "forward_sparsity_before_bake": baked["binarizer_sparsity"],
            "baked_sparsity": baked["baked_sparsity"],
            "exact_by_count": all(
                int((~m).sum()) == n_pruned(m.numel(), self.target_sparsity) for m in final.values()
            ) if self.allocation == "uniform" else None,
        })
        logger.info("baked learned masks: %s", self.finish_report)
        return self.finish_report

