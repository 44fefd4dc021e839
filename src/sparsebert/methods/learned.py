"""What every learned-mask method shares: scores attached to the targets, a per-step update
driven by the run's position, the score penalty, which parameters train, and the exact bake.

A method subclasses `LearnedMaskMethod` and implements `update` (how its binariser's keep
ratio or threshold follows the schedule). Everything here is derived from the global step
and from state that lives in the model's state dict (scores, thresholds, keep counts), so a
run resumed from a Trainer checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from sparsebert.allocation import n_pruned
from sparsebert.learned_masks import LearnedMasks, binary_mask
from sparsebert.recipe import Recipe
from sparsebert.schedules import GradualSchedule, cubic_ramp

logger = logging.getLogger("sparsebert")

# The task head: the classifier and, for BERT-style models, the pooler in front of it (it only
# serves the [CLS] classifier; a sentence-embedding checkpoint such as all-MiniLM-L6-v2 has a
# pooler whose outputs hardly vary between inputs, so a frozen one starves the classifier).
HEAD_PATTERN = re.compile(r"^(classifier|pre_classifier|score|qa_outputs)\.|(^|\.)pooler\.")


class LearnedMaskMethod:
    """Base of movement, soft movement, SMP-L/S and mask training."""

    name = "learned"

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe):
        assert recipe.masks is not None
        self.recipe = recipe
        self.cfg = recipe.masks
        self.schedule: GradualSchedule = recipe.gradual_schedule()
        self.target_sparsity = recipe.sparsity
        self.allocation = recipe.allocation
        self.model = model
        self.masks = LearnedMasks(
            model, params, self.cfg.binarizer, self.cfg.init, self.cfg.threshold, self.initial_sparsity()
        )
        self.lambda_t = 0.0
        self.last_penalty = 0.0  # λ_t · penalty of the last training batch (for the logs)
        self.in_final_hold = False
        self.report: dict[str, Any] = {}

    # -- what trains ----------------------------------------------------------------------------------
    @property
    def weights_trained(self) -> bool:
        return self.cfg.train_weights

    def initial_sparsity(self) -> float:
        """Sparsity of the masks the scores start with (0: start dense)."""
        return 0.0

    def configure_trainable(self, model: nn.Module, head_trains: bool) -> list[str]:
        """Set requires_grad: scores always; all weights if the method trains them, else only
        the task head (pooler + classifier) when ``head_trains``. Returns the trained weights."""
        score_ids = {id(p) for p in self.masks.score_parameters()}
        trained = []
        for name, p in model.named_parameters():
            if id(p) in score_ids:
                p.requires_grad_(True)
                continue
            is_head = bool(HEAD_PATTERN.search(name))
            train = self.weights_trained or (head_trains and is_head)
            p.requires_grad_(train)
            if train:
                trained.append(name)
        return trained

    # -- per step ----------------------------------------------------------------------------------------
    def step(self, step: int, total_steps: int) -> None:
        """Called at the beginning of every optimizer step."""
        t0 = int(round(self.schedule.start * total_steps))
        t1 = int(round(self.schedule.end * total_steps))
        self.lambda_t = cubic_ramp(step, t0, t1, self.cfg.penalty.lambda_)
        hold_from = total_steps - int(round(self.cfg.final_hold * total_steps))
        if self.cfg.final_hold > 0 and step >= hold_from:
            if not self.in_final_hold:
                self.report["binarizer_sparsity_at_final_hold"] = self.masks.sparsity()
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
            return self.report
        raw = self.raw_binarizer_sparsity()
        final = self.final_masks()
        baked = self.masks.bake(final)
        self.report.update({
            "method": self.name,
            "binarizer": self.cfg.binarizer,
            "raw_binarizer_sparsity": raw,
            "forward_sparsity_before_bake": baked["binarizer_sparsity"],
            "baked_sparsity": baked["baked_sparsity"],
            "exact_by_count": all(
                int((~m).sum()) == n_pruned(m.numel(), self.target_sparsity) for m in final.values()
            ) if self.allocation == "uniform" else None,
        })
        logger.info("baked learned masks: %s", self.report)
        return self.report


def build_learned_method(
    model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe
) -> LearnedMaskMethod:
    """The learned-mask method a recipe names, attached to ``params`` of ``model``."""
    from sparsebert.methods.mask_training import MaskTraining
    from sparsebert.methods.movement import MovementPruning, SoftMovementPruning
    from sparsebert.methods.smp import StaticModelPruning

    classes = {
        "movement": MovementPruning,
        "soft-movement": SoftMovementPruning,
        "smp-l": StaticModelPruning,
        "smp-s": StaticModelPruning,
        "mask-train": MaskTraining,
    }
    return classes[recipe.method](model, params, recipe)
