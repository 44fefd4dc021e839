"""What every method with fixed in-place masks shares (GMP, transfer; later oBERT, IMP):
gradients of pruned weights zeroed by hooks before the optimizer (and DDP's all-reduce),
masks re-applied after every optimizer step, saved in every checkpoint and restored on
resume; in a distributed run each rank writes a digest of its masks at the end, so that
a test (or a user) can check that all ranks pruned the same weights."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from sparsebert.config import Recipe
from sparsebert.masks import FixedMasks
from sparsebert.methods.base import MethodContext, PruningMethod


class FixedMaskMethod(PruningMethod):
    """A method whose masks live in the weights (zeros) and in a `FixedMasks`."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe,
                 context: MethodContext | None = None, masks: FixedMasks | None = None):
        super().__init__(model, params, recipe, context)
        self.masks = masks if masks is not None else FixedMasks(params)

    def on_train_begin(self) -> None:
        self.masks.register_grad_hooks()

    def on_optimizer_step(self) -> None:
        self.masks.apply_()

    def on_train_end(self, args: Any) -> None:
        self.masks.apply_()
        self.masks.remove_grad_hooks()
        if getattr(args, "world_size", 1) > 1:
            rank = args.process_index
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, f"mask_digest_rank{rank}.json"), "w") as f:
                json.dump({"rank": rank, "digest": self.masks.digest(), "sparsity": self.masks.sparsity()}, f)

    def save(self, folder: str) -> None:
        self.masks.save(folder)

    def load(self, folder: str) -> None:
        self.masks.load(folder)

    def report(self) -> dict[str, Any]:
        return {"mask_sparsity": self.masks.sparsity(), "mask_digest": self.masks.digest()}
