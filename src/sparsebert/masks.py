"""Fixed masks applied in place: the mechanism of GMP, oBERT, IMP and locked-mask transfer.

A pruned weight is zero in the tensor itself, its gradient is zeroed by a hook before the
optimizer sees it, and its optimizer state (Adam moments) is zeroed when it is pruned, so
AdamW's update (and decoupled weight decay) keep it at exactly zero. After every optimizer
step the masks are applied again as a cheap safety net (e.g. against optimizers with
momentum that was not zeroed). The checkpoint is then an ordinary Hugging Face model whose
zeros are the mask; `masks.safetensors` is written beside it so that resuming does not
have to guess the mask from the zeros.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsebert.errors import SparseBertError

MASKS_FILE = "masks.safetensors"


class FixedMasks:
    """Binary masks over a set of named parameters, kept applied in place."""

    def __init__(self, params: Mapping[str, nn.Parameter]):
        self.params = dict(params)
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_zeros(cls, params: Mapping[str, nn.Parameter]) -> FixedMasks:
        """Masks that lock the current zeros of ``params`` (sparse transfer of a pruned model)."""
        fm = cls(params)
        fm.masks = {n: p.detach() != 0 for n, p in fm.params.items()}
        return fm

    # -- applying -------------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked-out weight in place."""
        for name, p in self.params.items():
            p.masked_fill_(~self.masks[name].to(p.device), 0.0)

    def set_masks(
        self, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Install new masks, apply them, and zero the optimizer state of pruned weights."""
        for name, m in masks.items():
            if name not in self.params:
                raise SparseBertError(f"mask for unknown parameter '{name}'")
            if m.shape != self.params[name].shape:
                raise SparseBertError(
                    f"mask for '{name}' has shape {tuple(m.shape)}, "
                    f"parameter has {tuple(self.params[name].shape)}"
                )
            self.masks[name] = m.to(device=self.params[name].device, dtype=torch.bool)
        self.apply_()
        if optimizer is not None:
            self.zero_optimizer_state(optimizer)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero per-weight optimizer state (e.g. Adam's moments) at pruned positions."""
        for name, p in self.params.items():
            state = optimizer.state.get(p)
            if not state:
                continue
            keep = self.masks[name]
            for value in state.values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.masked_fill_(~keep.to(value.device), 0.0)

    def register_grad_hooks(self) -> None:
        """Zero gradients of pruned weights as they are computed (before DDP's all-reduce)."""
        self.remove_grad_hooks()
        for name, p in self.params.items():
            self._hooks.append(p.register_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(~self.masks[name].to(grad.device), 0.0)

        return hook

    def remove_grad_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- reading ----------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Fraction of masked-out weights over all masked parameters."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def digest(self) -> str:
        """SHA-256 of all masks, in name order: equal digests mean identical masks."""
        h = hashlib.sha256()
        for name in sorted(self.masks):
            h.update(name.encode())
            h.update(self.masks[name].cpu().numpy().tobytes())
        return h.hexdigest()

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        path = os.path.join(directory, MASKS_FILE)
        save_file({n: m.to(torch.uint8).cpu().contiguous() for n, m in self.masks.items()}, path)
        return path

    def load(self, directory: str) -> None:
        """Load masks saved by `save` (raises if the file or a parameter is missing)."""
        path = os.path.join(directory, MASKS_FILE)
        if not os.path.isfile(path):
            parent = os.path.dirname(os.path.abspath(directory))
            with_masks = sorted(
                d for d in os.listdir(parent)
                if os.path.isfile(os.path.join(parent, d, MASKS_FILE))
                and os.path.isfile(os.path.join(parent, d, "checksums.json"))
            ) if os.path.isdir(parent) else []
            hint = (f"complete checkpoints with masks in {parent}: {', '.join(with_masks)}" if with_masks
                    else "no checkpoint beside it has masks either (was it saved by a run without pruning?)")
            raise SparseBertError(
                f"no {MASKS_FILE} in checkpoint '{directory}': cannot restore masks; {hint}"
            )
        stored = load_file(path)
        missing = set(self.params) - set(stored)
        if missing:
            raise SparseBertError(
                f"{path} has no mask for {sorted(missing)[:3]}: the checkpoint was made with "
                "other pruning targets than this run's recipe"
            )
        self.set_masks({n: stored[n].bool() for n in self.params})
