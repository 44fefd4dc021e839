"""SRNets mask training (Liu et al. 2022): frozen weights, a real-valued mask m̂ per weight,
binary mask m = 1[m̂ > φ] with the straight-through gradient.

Init ``magnitude-hard``: m̂ = 2φ where the magnitude mask keeps and 0 elsewhere (φ = 0.01),
so training starts from the magnitude subnetwork with a margin φ either side; init
``magnitude-soft``: m̂ = |W| and φ = the k-th smallest magnitude of the matrix. Sparsity is
per matrix. Gradual sparsity (``schedule.init_sparsity`` 0.7 -> the target, cubic): the
masks start at the first sparsity and at every step of the schedule φ is re-set per matrix
to the k-th smallest m̂ of the new sparsity (the reference resets its thresholds the same
way). With ``init_sparsity`` >= the target it is one-shot at the target.

A threshold does not count, so the run ends with an exact top-k of m̂ at the target (a 90%
target is 90.0%); what m̂ > φ alone would have given is reported beside it.
"""

from __future__ import annotations

from sparsebert.methods.base import register_method
from sparsebert.methods.learned import LearnedMaskMethod


@register_method
class MaskTraining(LearnedMaskMethod):
    """Threshold-binarised mask training on frozen weights, with SRNets' gradual sparsity."""

    name = "mask-train"
    allocations = ("uniform",)
    binarizers = ("threshold",)
    trains_weights = False
    score_inits = ("magnitude-hard", "magnitude-soft")
    section_defaults = {"masks": {"binarizer": "threshold", "init": "magnitude-hard", "threshold": 0.01,
                                  "train_weights": False}}

    def initial_sparsity(self) -> float:
        return self.schedule.first_sparsity

    def update(self, step: int, total_steps: int) -> None:
        steps = self.schedule.pruning_steps(total_steps)
        if step in steps and step != steps[0]:
            self.masks.recalibrate_thresholds(self.schedule.sparsity_at(step, total_steps))
