"""SMP: Static Model Pruning (Jiang et al. 2023). The weights are frozen bit for bit; only the
mask scores learn (init 0, score LR ~1e-2), through TopK with the straight-through gradient.

Objective: task loss (or KD) + λ_t · mean over matrices of ||σ(S)||_1 / numel, λ_t ramping
cubically from 0 to the final λ (400 in the reference) while the keep ratio follows the
cubic schedule from 1 to v. SMP-L keeps the same fraction v of every matrix. SMP-S
redistributes it per matrix type (Q, K, V, AO, FFN-in, FFN-out): layer i keeps
v_i = v · L · mean σ(S_i/p) / Σ_j mean σ(S_j/p), the type's average staying exactly v
(`learned_masks.smp_s_keep_ratios`, recomputed from the current scores every step as in
the reference). The penalty is what makes σ(S) differ between layers: layers whose scores
the task gradient pushes up resist it and get a larger share.

With a masked-LM head, classification goes through it with label words at [MASK]
(`prompt_head.PromptClassifier`), so nothing but masks is learned; without one, the
classifier head is trained and the run says so.
"""

from __future__ import annotations

from sparsebert.methods.base import register_method
from sparsebert.methods.movement import MovementPruning


class StaticModelPruning(MovementPruning):
    """TopK on frozen weights; SMP-L and SMP-S differ in their allocation only."""

    trains_weights = False
    section_defaults = {"masks": {"binarizer": "topk", "train_weights": False, "head": "auto"}}


@register_method
class StaticModelPruningL(StaticModelPruning):
    """SMP-L: every matrix keeps the same fraction v."""

    name = "smp-l"
    allocations = ("uniform",)


@register_method
class StaticModelPruningS(StaticModelPruning):
    """SMP-S: the keep ratio redistributed per matrix type by the learned scores."""

    name = "smp-s"
    allocations = ("smp-s",)
