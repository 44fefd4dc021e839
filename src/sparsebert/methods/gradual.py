"""Gradual pruning with fixed in-place masks: a criterion, an allocation and a schedule.

`GradualPruner` is the engine: at each step of the schedule it scores the weights with its
criterion (magnitude for GMP and GMP*), gives already pruned weights -inf (so masks only
ever shrink and ties never revive one), keeps the top of the allocation exactly by count,
installs the masks in place, zeroes the optimizer state of newly pruned weights and lets
the criterion correct the weights that stay (OBS-style criteria). In a distributed run rank
0's masks (and a weight-updating criterion's corrected weights) are broadcast so that every
rank prunes exactly the same weights. With a ``pattern`` N:M (recipe key ``pattern: "2:4"``,
which fixes the target sparsity at 1 - N/M) each step keeps the N best of every M
consecutive weights and prunes among the rest, so the schedule ramps and its last step is
exactly N:M.

A criterion that observes (activations, gradients) needs observations before its first
pruning step, so its recipe needs ``schedule.start > 0``; a criterion with an
``observation_window`` (oBERT's ``num_grads``, SparseGPT's ``calibration_steps``) is given the
gradients, or (through its ``observe`` switch) the forward passes, of only that many optimizer
steps before each pruning step. A criterion with ``solve_masks`` (SparseGPT) chooses the masks
itself, with its weight update, instead of being ranked by the allocation.

`GradualPruning` is the method ``gmp`` (with ``criterion:`` any registered criterion)
driven by the trainer through the `PruningMethod` hooks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsebert.allocation import check_pattern_shape, masks_from_scores, parse_pattern
from sparsebert.config import Recipe
from sparsebert.criteria import CRITERIA, Criterion, Magnitude, get_criterion
from sparsebert.errors import SparseBertError
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
        pattern: str | tuple[int, int] | None = None,
    ):
        self.masks = masks if masks is not None else FixedMasks(params)
        self.schedule = schedule
        self.allocation = allocation
        self.criterion = criterion if criterion is not None else Magnitude()
        self.pattern = parse_pattern(pattern)
        if self.pattern is not None:
            for name, p in self.masks.params.items():
                check_pattern_shape(name, p.shape, *self.pattern)
        self.current_sparsity = 0.0

    def prune_to(self, sparsity: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Prune (exactly, by count) to ``sparsity`` by the criterion."""
        solve = getattr(self.criterion, "solve_masks", None)
        if solve is not None:  # a solver (SparseGPT) chooses masks and updates weights together
            new = solve(self.masks.params, self.masks.masks, sparsity, self.allocation, self.pattern)
        else:
            new = masks_from_scores(ranked_scores(self.masks, self.criterion), sparsity, self.allocation,
                                    pattern=self.pattern)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            for name in sorted(new):
                m = new[name].to(torch.uint8)
                if dist.get_backend() == "nccl":
                    m = m.cuda()
                dist.broadcast(m, src=0)
                new[name] = m.bool().to(self.masks.params[name].device)
        self.masks.set_masks(new, optimizer)
        self.criterion.update_weights(self.masks.params, self.masks.masks)
        if distributed and self.criterion.updates_weights:
            # every rank computed the same update from the same all-reduced gradients; rank 0's
            # weights are broadcast anyway so that floating-point differences cannot creep in
            with torch.no_grad():
                for name in sorted(self.masks.params):
                    p = self.masks.params[name]
                    buf = p.data.cuda() if dist.get_backend() == "nccl" and not p.is_cuda else p.data
                    dist.broadcast(buf, src=0)
                    if buf is not p.data:
                        p.data.copy_(buf)
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
        criterion = get_criterion(recipe.criterion, recipe.criterion_options)
        self.pruner = GradualPruner(params, recipe.gradual_schedule(), recipe.allocation, criterion,
                                    masks=self.masks, pattern=recipe.pattern)
        self._step = 0
        self._total = 0

    @classmethod
    def validate_recipe(cls, recipe: Recipe, source: str) -> None:
        criterion = CRITERIA.get(recipe.criterion)
        check = getattr(criterion, "validate_recipe", None)
        if check is not None:  # what the criterion itself cannot do (SparseGPT: uniform, no N:M)
            check(recipe, source)
        needs = criterion.needs
        if needs and recipe.schedule.start <= 0.0:
            raise SparseBertError(
                f"{source}: criterion {recipe.criterion} needs {' and '.join(sorted(needs))} observed "
                "during training before its first pruning step, which schedule.start = 0 puts at the "
                "very first step: set schedule.start > 0 (e.g. --set schedule.start=0.05)"
            )

    def pruning_steps(self, total_steps: int) -> list[int]:
        return self.pruner.schedule.pruning_steps(total_steps)

    def _next_pruning_step(self, step: int, total_steps: int) -> int | None:
        """The next step (after ``step``) at which the schedule prunes more (or its last step)."""
        schedule = self.pruner.schedule
        steps = schedule.pruning_steps(total_steps)
        previous = 0.0
        for s in steps:
            target = schedule.sparsity_at(s, total_steps)
            if s > step and (target > previous or s == steps[-1]):
                return s
            previous = max(previous, target)
        return None

    def on_train_begin(self) -> None:
        super().on_train_begin()
        self.pruner.criterion.attach(self.model, self.params)

    def on_step_begin(self, step, total_steps, optimizer) -> dict | None:
        self._step, self._total = step, total_steps
        pruned = self.pruner.maybe_prune(step, total_steps, optimizer)
        criterion = self.pruner.criterion
        observe = getattr(criterion, "observe", None)
        if observe is not None:
            # an activation criterion with a window sees only the forward passes of the
            # `observation_window` steps before the next pruning step
            upcoming = self._next_pruning_step(step, total_steps)
            window = criterion.observation_window
            observe(upcoming is not None and (window is None or upcoming - step <= window))
        if pruned:
            return {"pruned_to_sparsity": self.pruner.current_sparsity}
        return None

    def on_pre_optimizer_step(self) -> None:
        """Gradients here are final (accumulated, all-reduced under DDP, clipped): every rank
        observes the same ones. Only the window before the next pruning step is observed."""
        criterion = self.pruner.criterion
        if "gradients" not in criterion.needs:
            return
        if self._total:
            upcoming = self._next_pruning_step(self._step, self._total)
            if upcoming is None:
                return
            window = criterion.observation_window
            if window is not None and upcoming - self._step > window:
                return
        criterion.observe_gradients(self.params)

    def on_train_end(self, args: Any) -> None:
        self.pruner.criterion.detach()
        super().on_train_end(args)

    def load(self, folder: str) -> None:
        super().load(folder)
        self.pruner.current_sparsity = self.masks.sparsity()

    def report(self) -> dict[str, Any]:
        out = {**super().report(), "criterion": self.pruner.criterion.name}
        if self.pruner.pattern is not None:
            out["pattern"] = "{}:{}".format(*self.pruner.pattern)
        return out
