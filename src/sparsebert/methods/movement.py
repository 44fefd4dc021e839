"""Movement pruning (Sanh, Wolf & Rush 2020): weights and scores train together.

Hard movement: M = TopK(S, v_t) per matrix, v_t = 1 - s_t from the cubic schedule of
`schedules.GradualSchedule` (dense until ``schedule.start``, the target at ``schedule.end``,
held after). With the straight-through gradient dL/dS = dL/d(W⊙M) ⊙ W, S accumulates
-W · dL/dW: weights moving away from zero gain score, so the kept set is the one the
fine-tuning is pushing outwards, not the one that happened to start large.

Soft movement: M = 1[σ(S) > τ_t] with the L1 penalty λ_t · mean σ(S); τ_t and λ_t ramp
cubically from 0 to their final values over [start, end]. The sparsity this reaches is set
by λ, not by a count; the run ends with an exact top-k of the learned scores at the target
(during ``masks.final_hold``, the last fraction of training, so the weights adapt to the
exact mask; the raw σ(S) > τ sparsity is reported next to it).
"""

from __future__ import annotations

from sparsebert.methods.base import register_method
from sparsebert.methods.learned import LearnedMaskMethod
from sparsebert.schedules import cubic_ramp


@register_method
class MovementPruning(LearnedMaskMethod):
    """Hard movement pruning: TopK on the scores, keep ratio on the cubic schedule."""

    name = "movement"
    allocations = ("uniform", "global")
    binarizers = ("topk",)
    section_defaults = {"masks": {"binarizer": "topk", "train_weights": True}}

    def keep_ratio(self, step: int, total_steps: int) -> float:
        """v_t = 1 - s_t, s_t from the recipe's GradualSchedule (0 before its first step)."""
        return 1.0 - self.schedule.sparsity_at(step, total_steps)

    def update(self, step: int, total_steps: int) -> None:
        self.masks.set_keep_ratio(self.keep_ratio(step, total_steps), self.allocation,
                                  self.cfg.realloc_temperature)

    def final_masks(self):
        # TopK's own masks at the target are already exact by count: use them as trained
        self.masks.set_keep_ratio(1.0 - self.target_sparsity, self.allocation, self.cfg.realloc_temperature)
        return self.masks.current_masks()


@register_method
class SoftMovementPruning(LearnedMaskMethod):
    """Soft movement pruning: σ(S) > τ_t with the L1 penalty on σ(S)."""

    name = "soft-movement"
    allocations = ("uniform",)
    binarizers = ("sigmoid-threshold",)
    section_defaults = {"masks": {"binarizer": "sigmoid-threshold", "threshold": 0.1, "train_weights": True}}

    def tau(self, step: int, total_steps: int) -> float:
        t0 = int(round(self.schedule.start * total_steps))
        t1 = int(round(self.schedule.end * total_steps))
        return cubic_ramp(step, t0, t1, self.cfg.threshold)

    def update(self, step: int, total_steps: int) -> None:
        self.masks.set_threshold(self.tau(step, total_steps))

    def raw_binarizer_sparsity(self) -> float:
        self.masks.set_threshold(self.cfg.threshold)  # the final τ, whatever phase we are in
        return super().raw_binarizer_sparsity()

    def log_values(self) -> dict[str, float]:
        out = super().log_values()
        first = next(iter(self.masks.masks.values()), None)
        if first is not None:
            out["mask_tau"] = round(first.threshold, 5)
        return out
