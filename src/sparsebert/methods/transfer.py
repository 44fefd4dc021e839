"""Sparse transfer: fine-tune a sparse model with its mask locked (Sparse*BERT).

The mask is the starting model's ``masks.safetensors`` where it has one (a checkpoint of a
pruning run), otherwise its zeros: every targeted weight that is zero stays exactly zero
(gradients masked, Adam state never created for it, masks re-applied after each step), so
the fine-tuned model has the same zero positions and sparsity as the one it started from.
No pruning hyper-parameters: no schedule, no target sparsity of its own.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from sparsebert.config import Recipe
from sparsebert.masks import MASKS_FILE, FixedMasks
from sparsebert.methods.base import MethodContext, register_method
from sparsebert.methods.fixed import FixedMaskMethod

logger = logging.getLogger("sparsebert")


@register_method
class LockedMaskTransfer(FixedMaskMethod):
    name = "transfer"
    prunes = False
    lr_rewarm_default = False

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe,
                 context: MethodContext | None = None):
        context = context or MethodContext()
        stored = os.path.join(context.model_path, MASKS_FILE) if context.model_path else None
        if stored and os.path.isfile(stored):
            masks = FixedMasks(params)
            masks.load(context.model_path)
            self.source = stored
        else:
            masks = FixedMasks.from_zeros(params)
            self.source = "zeros of the starting model"
        super().__init__(model, params, recipe, context, masks)
        logger.info("sparse transfer: mask locked at %.2f%% sparsity (from the %s)",
                    100 * self.masks.sparsity(), self.source)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "locked_from": self.source}
