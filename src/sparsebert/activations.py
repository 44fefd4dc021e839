"""Inputs of the targeted linears, as criteria and one-shot solvers see them.

Activation statistics (Wanda's feature norms, SparseGPT's X Xᵀ) are sums over *tokens*; in
a padded batch the padding positions are not tokens, so they are left out: the attention
mask in force is set by `token_mask` (the one-shot layer-wise pass) or taken from the
``attention_mask`` keyword of the model's own forward (`MaskFromModelInputs`, used while
training), and `tokens` keeps the rows it marks when the input's leading shape is the
mask's (batch x sequence); any other input (already unpadded) is used whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from sparsebert.errors import SparseBertError

_MASK: list[torch.Tensor | None] = [None]


@contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `tokens` keeps the positions where ``mask`` (batch x sequence) is set."""
    previous = _MASK[0]
    _MASK[0] = mask
    try:
        yield
    finally:
        _MASK[0] = previous


def tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., features) as rows of real tokens (padding left out), float32."""
    mask = _MASK[0]
    x = x.detach()
    if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
        return x[mask.to(device=x.device, dtype=torch.bool)].float()
    return x.reshape(-1, x.shape[-1]).float()


class MaskFromModelInputs:
    """Hooks on a whole model that set the token mask from its ``attention_mask`` keyword for
    the duration of each forward pass (how the Trainer calls a model)."""

    def __init__(self, model: nn.Module):
        self._saved: list[torch.Tensor | None] = []
        self._handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._saved.append(_MASK[0])
        _MASK[0] = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def _exit(self, module, args, output):
        if self._saved:
            _MASK[0] = self._saved.pop()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes of a distributed run (``t`` itself otherwise), so that
    every rank prunes from the same statistics."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    moved = t.cuda() if dist.get_backend() == "nccl" and not t.is_cuda else t.clone()
    dist.all_reduce(moved)
    return moved.to(t.device)


def linear_of(model: nn.Module, param_name: str, criterion: str) -> nn.Linear:
    """The `nn.Linear` whose ``weight`` is ``param_name`` (activation criteria score linears only)."""
    module_name, _, leaf = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear) or leaf != "weight":
        raise SparseBertError(
            f"criterion {criterion} scores the weights of linear layers from their inputs; target "
            f"'{param_name}' is a {type(module).__name__ if module is not None else 'parameter'} "
            "weight: use targets made of linears (e.g. encoder-linears)"
        )
    return module


def linears_of(model: nn.Module, params: Mapping[str, nn.Parameter], criterion: str) -> dict[str, nn.Linear]:
    """`linear_of` for every targeted parameter, checking that the weight is the module's."""
    out = {}
    for name, p in params.items():
        module = linear_of(model, name, criterion)
        if module.weight is not p:
            raise SparseBertError(f"'{name}' is not the weight of module '{name.rpartition('.')[0]}'")
        out[name] = module
    return out


__all__ = ["MaskFromModelInputs", "all_reduce_sum", "linear_of", "linears_of", "token_mask", "tokens"]
