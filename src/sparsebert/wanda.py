"""Wanda (Sun, Liu, Bair & Kolter 2023): prune by weight magnitude times input-feature norm.

The score of weight W_ij (output i, input feature j) is |W_ij| · ||X_j||_2, where X_j is the
j-th input feature of the linear over every calibration token (padding left out,
`sparsebert.activations`). Wanda compares scores within each output row, so the criterion
asks for the ``per-row`` allocation: `sparsebert oneshot` uses it unless told otherwise; a
gradual recipe uses its own ``allocation`` (``--set allocation=per-row`` for Wanda's).

Statistics are collected by forward hooks on each targeted linear's input from `attach` on.
In a gradual run each pruning step uses the activations seen since the previous one (the
weights, and so the activations, have moved since); the sums of squares are all-reduced
across processes before scoring, so every rank of a distributed run scores the same
statistics. Memory: one float per input feature per targeted linear.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparsebert.activations import MaskFromModelInputs, all_reduce_sum, linears_of, tokens
from sparsebert.criteria import CRITERIA, Criterion
from sparsebert.errors import SparseBertError


class Wanda(Criterion):
    """|W_ij| · ||X_j||_2, compared per output row."""

    name = "wanda"
    needs = frozenset({"activations"})
    allocation = "per-row"

    def __init__(self) -> None:
        self.sq: dict[str, torch.Tensor] = {}  # sum over tokens of x_j^2, per target
        self.count: dict[str, int] = {}
        self._stale: set[str] = set()
        self._handles: list = []
        self._mask_hooks: MaskFromModelInputs | None = None

    def attach(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        self.detach()
        for name, module in linears_of(model, params, self.name).items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        self._mask_hooks = MaskFromModelInputs(model)

    def _hook(self, name: str):
        def hook(module, args, output):
            x = tokens(args[0])
            if name in self._stale or name not in self.sq:
                self._stale.discard(name)
                self.sq[name] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                self.count[name] = 0
            self.sq[name] += x.pow(2).sum(dim=0, dtype=torch.float64)
            self.count[name] += x.shape[0]

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._mask_hooks is not None:
            self._mask_hooks.remove()
            self._mask_hooks = None
        self.sq, self.count, self._stale = {}, {}, set()

    def feature_norms(self, name: str) -> torch.Tensor:
        """||X_j||_2 of the inputs of target ``name`` seen so far (all processes)."""
        if name not in self.sq:
            raise SparseBertError(
                f"criterion wanda has seen no input of '{name}' yet: it needs forward passes "
                "(calibration batches, or training steps before the first pruning step) after attach"
            )
        return all_reduce_sum(self.sq[name]).sqrt()

    def scores(self, params, masks):
        out = {}
        for name, p in params.items():
            norms = self.feature_norms(name).to(device=p.device, dtype=torch.float32)
            out[name] = p.detach().abs().float() * norms.unsqueeze(0)
        self._stale = set(self.sq)  # the next forward pass starts new statistics
        return out


CRITERIA.register("wanda", Wanda)

__all__ = ["Wanda"]
