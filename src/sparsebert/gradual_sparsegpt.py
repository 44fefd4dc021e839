"""SparseGPT as a criterion of the gradual pruner: OBS reconstruction at every pruning step.

One-shot SparseGPT (`sparsebert.sparsegpt`) prunes a fine-tuned model layer by layer so that
each linear's outputs on calibration inputs change as little as possible, updating the weights
that stay. Measured on SST-2 (bench/results/accuracy.md), a SparseGPT start at 70% followed by
GMP*+KD beats GMP*+KD from the dense model by 1.6 points at 80% on the same budget: magnitude
throws away what the reconstruction keeps; with this criterion on top, 80% ends 2.6-4.8
points above GMP*+KD at each of three seeds (gains on MRPC and RTE, a loss on STS-B, where
one-shot SparseGPT itself is poor). This criterion (``criterion: sparsegpt`` in a
gradual recipe, e.g. ``recipes/sparsegpt-gmp.yaml``) makes every pruning step such a
reconstruction:

- during the ``calibration_steps`` optimizer steps before each pruning step, forward hooks sum
  X Xᵀ of each targeted linear's inputs over the training batches (padding left out; Q, K and
  V share one product; nothing is computed on the other steps);
- at the pruning step every linear is pruned to the step's sparsity by SparseGPT from
  H = 2 X Xᵀ / tokens (summed over the processes of a distributed run), with the weights
  earlier steps pruned kept pruned, and the weights that stay updated;
- then training (with KD) goes on from the reconstructed weights until the next step.

Differences from one-shot use, and why: the layers are reconstructed independently from the
inputs of the model as it was before the step (not sequentially on already-pruned layers),
because the training steps that follow repair the drift a sequential pass would avoid, and a
sequential pass would need its own calibration batches kept in memory. SparseGPT gives every
matrix the same sparsity, so the recipe's allocation must be ``uniform``. An N:M pattern is
not supported gradually (prune to it with `sparsebert oneshot --pattern`). Memory: one
in x in float32 matrix per distinct linear input (MiniLM: 12 MB per layer; bert-base: 48 MB).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsebert.activations import MaskFromModelInputs, linears_of
from sparsebert.criteria import CRITERIA, Criterion
from sparsebert.errors import SparseBertError
from sparsebert.sparsegpt import HessianHooks, SparseGPTOptions, sparsegpt_prune_

logger = logging.getLogger("sparsebert")


_UNIFORM = "criterion sparsegpt prunes every matrix to the same sparsity: set allocation: uniform"
_NO_PATTERN = ("criterion sparsegpt does not prune to an N:M pattern gradually: use `sparsebert oneshot "
               "--criterion sparsegpt --pattern N:M`, or the magnitude / wanda / obert criterion")


@dataclass
class GradualSparseGPTOptions(SparseGPTOptions):
    """SparseGPT's settings plus how many optimizer steps of inputs each pruning step uses
    (4 steps of 32 sequences = the 128 calibration examples of one-shot SparseGPT)."""

    calibration_steps: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        steps = self.calibration_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SparseBertError(
                f"sparsegpt option calibration_steps must be a positive integer, got {steps!r}"
            )


class GradualSparseGPT(Criterion):
    """Chooses the masks itself (`solve_masks`) instead of scoring: SparseGPT's masks are made
    column block by column block together with the weight update."""

    name = "sparsegpt"
    needs = frozenset({"activations"})
    allocation = "uniform"
    Options = GradualSparseGPTOptions
    updates_weights = True

    def __init__(self, options: GradualSparseGPTOptions | None = None) -> None:
        self.options = options or GradualSparseGPTOptions()
        self.observation_window = self.options.calibration_steps
        self._hooks: HessianHooks | None = None
        self._mask_hooks: MaskFromModelInputs | None = None

    def attach(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        self.detach()
        self._hooks = HessianHooks(linears_of(model, params, self.name), model=model)
        self._mask_hooks = MaskFromModelInputs(model)

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._mask_hooks is not None:
            self._mask_hooks.remove()
            self._mask_hooks = None

    @classmethod
    def validate_recipe(cls, recipe, source: str) -> None:
        """Refuse, before training, what `solve_masks` cannot do."""
        if recipe.allocation != "uniform":
            raise SparseBertError(f"{source}: {_UNIFORM} (got {recipe.allocation})")
        if recipe.pattern is not None:
            raise SparseBertError(f"{source}: {_NO_PATTERN}")

    def observe(self, active: bool) -> None:
        """Whether the coming forward passes are calibration passes (the gradual pruner turns
        this on for the ``calibration_steps`` steps before each pruning step)."""
        if self._hooks is not None:
            self._hooks.active = active

    def scores(self, params, masks):
        raise SparseBertError(
            "criterion sparsegpt chooses masks by layer-wise reconstruction, not by scores: use it "
            "in a gradual recipe (allocation: uniform) or with `sparsebert oneshot`"
        )

    @torch.no_grad()
    def solve_masks(
        self,
        params: Mapping[str, nn.Parameter],
        masks: Mapping[str, torch.Tensor],
        sparsity: float,
        allocation: str,
        pattern: tuple[int, int] | None,
    ) -> dict[str, torch.Tensor]:
        """Prune every target to ``sparsity`` in place by SparseGPT (earlier pruned weights stay
        pruned); return the new masks (True = kept)."""
        if allocation != "uniform":
            raise SparseBertError(f"{_UNIFORM} (got {allocation})")
        if pattern is not None:
            raise SparseBertError(_NO_PATTERN)
        if self._hooks is None:
            raise SparseBertError("criterion sparsegpt: attach it to the model before pruning")
        out = {}
        for name, p in params.items():
            options = self.options
            count = self._hooks.observed(name)
            if count:
                hessian = self._hooks.hessian(name, count)
            else:
                # nothing observed: a run resumed at this very step. H = I makes SparseGPT
                # magnitude pruning without an update, instead of failing the resumed run
                logger.warning("sparsegpt: no inputs of '%s' seen before this pruning step (resumed "
                               "run?): pruning it by magnitude this step", name)
                hessian = torch.eye(p.shape[1], dtype=torch.float32, device=p.device)
                options = dataclasses.replace(options, block_size=p.shape[1])  # one block: whole-matrix top-k
            out[name] = sparsegpt_prune_(p.data, hessian, sparsity, None, options,
                                         pruned=~masks[name].to(p.device))
        self._hooks.reset()
        return out


CRITERIA.register("sparsegpt", GradualSparseGPT)

__all__ = ["GradualSparseGPT", "GradualSparseGPTOptions"]
