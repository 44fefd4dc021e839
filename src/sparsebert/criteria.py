"""Criteria: how important is each weight. One of the four choices of a pruning method.

A criterion only scores; which weights go is the allocation's job (global, uniform or per-row exact
top-k) and when is the schedule's. So the same criterion serves a gradual pruner during
training (`methods.gradual.GradualPruner`) and a one-shot pass over calibration batches
(`oneshot.prune_oneshot`), and a new one — oBERT (gradients), Wanda (activations),
SparseGPT-style reconstruction (activations + a weight update) — is one small class
registered in `CRITERIA`:

- ``needs``: what it observes besides the weights (``"activations"`` via forward hooks it
  installs in `attach`, ``"gradients"`` via `observe_gradients`, called after every backward
  pass and before the optimizer step);
- `scores`: one tensor per parameter, higher = more important;
- `update_weights`: an optional correction of the weights that stay, after pruning (OBS);
- optional class attributes: ``allocation`` (the allocation its scores are meant for: Wanda
  compares within output rows, so one-shot uses ``per-row`` for it unless told otherwise),
  ``Options`` (a dataclass of its settings, given as ``criterion_options:`` in a recipe or
  ``--option key=value`` to `sparsebert oneshot`), ``observation_window`` (how many optimizer
  steps before a pruning step it needs to observe; the gradual pruner skips the others) and
  ``updates_weights``.

A criterion may instead choose the masks itself (``solve_masks(params, masks, sparsity,
allocation, pattern)``, the new masks with the weights updated): SparseGPT, whose masks are
made together with its reconstruction.

Built in: ``magnitude`` (here), ``wanda`` (`sparsebert.wanda`), ``obert``
(`sparsebert.obert`), ``sparsegpt`` in gradual recipes (`sparsebert.gradual_sparsegpt`; one-shot
``sparsegpt`` is the sequential layer-wise solver `sparsebert.sparsegpt`, used by
`sparsebert.oneshot`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparsebert.registry import Registry


class Criterion:
    """Base criterion: weights only, no observation, no weight update."""

    name = "criterion"
    needs: frozenset[str] = frozenset()
    allocation: str | None = None
    Options: type | None = None
    observation_window: int | None = None
    updates_weights: bool = False

    def attach(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        """Install whatever the criterion observes (forward hooks for activations)."""

    def detach(self) -> None:
        """Remove what `attach` installed and drop the statistics."""

    def observe_gradients(self, params: Mapping[str, nn.Parameter]) -> None:
        """Called after each backward pass (gradients in ``p.grad``), before the optimizer."""

    def scores(
        self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Importance per weight (higher = keep); ``masks`` are the masks in force."""
        raise NotImplementedError

    def update_weights(
        self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]
    ) -> None:
        """Adjust the kept weights after the masks changed (no-op unless the criterion is OBS-like)."""


class Magnitude(Criterion):
    """|W|: the criterion of GMP and GMP*."""

    name = "magnitude"

    def scores(self, params, masks):
        return {n: p.detach().abs().float() for n, p in params.items()}


CRITERIA: Registry[type[Criterion]] = Registry(
    "criterion", builtins=["sparsebert.wanda", "sparsebert.obert", "sparsebert.gradual_sparsegpt"]
)
CRITERIA.register("magnitude", Magnitude)


def get_criterion(name: str, options: object | None = None) -> Criterion:
    """A fresh instance of the criterion registered as ``name`` (with its ``Options``, if given)."""
    cls = CRITERIA.get(name)
    return cls() if options is None else cls(options=options)


__all__ = ["CRITERIA", "Criterion", "Magnitude", "get_criterion"]
