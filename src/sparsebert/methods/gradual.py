"""Gradual pruning with fixed in-place masks: a criterion, an allocation and a schedule.

`GradualPruner` is the engine: at each step of the schedule it scores the weights with its
criterion (magnitude for GMP and GMP*), gives already pruned weights -inf (so masks only
ever shrink and ties never revive one), keeps the top of the allocation exactly by count,
installs the masks in place, zeroes the optimizer state of newly pruned weights and lets
the criterion correct the weights that stay (OBS-style criteria). In a distributed run rank
0's masks are broadcast so that every rank prunes exactly the same weights.

`GradualPruning` is the method ``gmp`` (with ``criterion:`` any registered criterion)
driven by the trainer through the `PruningMethod` hooks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsebert.allocation import masks_from_scores
from sparsebert.config import Recipe
from sparsebert.criteria import Criterion, Magnitude, get_criterion
from sparsebert.masks import FixedMasks
from sparsebert.methods.base import MethodContext, register_method
from sparsebert.methods.fixed import FixedMaskMethod
from sparsebert.schedules import GradualSchedule


def ranked_scores(masks: FixedMasks, criterion: Criterion | None = None) -> dict[str, torch.Tensor]:
    """The criterion's scores (magnitude by default) with pruned positions at -inf, so that
    they are pruned first and never revived by ties."""
    raw = (criterion or Magnitude()).scores(masks.params, masks.masks)
    return {n: raw[n].float().masked_fill(~masks.masks[n], float("-inf")) for n in masks.params}


class GradualPruner:
    """Holds the masks of a gradual run and prunes on its schedule."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        schedule: GradualSchedule,
        allocation: str,
        criterion: Criterion | None = None,
        masks: FixedMasks | None = None,
    ):
        self.masks = masks if masks is not None else FixedMasks(params)
        self.schedule = schedule
        self.allocation = allocation
        self.criterion = criterion if criterion is not None else Magnitude()
        self.current_sparsity = 0.0

    def prune_to(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Prune (exactly, by count) to ``sparsity`` by the criterion."""
        new = masks_from_scores(ranked_scores(self.masks, self.criterion), sparsity, self.allocation)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for name in sorted(new):
                m = new[name].to(torch.uint8)
                if dist.get_backend() == "nccl":
                    m = m.cuda()
                dist.broadcast(m, src=0)
                new[name] = m.bool().to(self.masks.params[name].device)
        self.masks.set_masks(new, optimizer)
        self.criterion.update_weights(self.masks.params, self.masks.masks)
        self.masks.apply_()
        self.current_sparsity = sparsity

    def maybe_prune(self, step: int, total_steps: int, optimizer=None) -> bool:
        """Prune if ``step`` is one of the schedule's pruning steps; return whether it did."""
        steps = self.schedule.pruning_steps(total_steps)
        if step not in steps:
            return False
        target = self.schedule.sparsity_at(step, total_steps)
        if target > self.current_sparsity or step == steps[-1]:
            self.prune_to(max(target, self.current_sparsity), optimizer)
        return True


@register_method
class GradualPruning(FixedMaskMethod):
    """GMP / GMP*: gradual pruning by a criterion while fine-tuning (magnitude by default)."""

    name = "gmp"
    uses_criterion = True

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe,
                 context: MethodContext | None = None):
        super().__init__(model, params, recipe, context)
        self.pruner = GradualPruner(params, recipe.gradual_schedule(), recipe.allocation,
                                    get_criterion(recipe.criterion), masks=self.masks)

    def pruning_steps(self, total_steps: int) -> list[int]:
        return self.pruner.schedule.pruning_steps(total_steps)

    def on_train_begin(self) -> None:
        super().on_train_begin()
        self.pruner.criterion.attach(self.model, self.params)

    def on_step_begin(self, step, total_steps, optimizer) -> dict | None:
        if self.pruner.maybe_prune(step, total_steps, optimizer):
            return {"pruned_to_sparsity": self.pruner.current_sparsity}
        return None

    def on_pre_optimizer_step(self) -> None:
        if "gradients" in self.pruner.criterion.needs:
            self.pruner.criterion.observe_gradients(self.params)

    def on_train_end(self, args: Any) -> None:
        self.pruner.criterion.detach()
        super().on_train_end(args)

    def load(self, folder: str) -> None:
        super().load(folder)
        self.pruner.current_sparsity = self.masks.sparsity()

    def report(self) -> dict[str, Any]:
        return {**super().report(), "criterion": self.pruner.criterion.name}
