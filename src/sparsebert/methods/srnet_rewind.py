"""SRNets setting 2, second step: fine-tune a subnetwork in isolation, rewound to the
pretrained weights, with its mask locked (lottery-ticket style; Liu et al. 2022, Chen et
al. 2020).

Step 1 finds the mask on the *pretrained* model (``sparsebert prune --recipe imp --set
imp.dense_first=true`` or ``--recipe mask-train-pretrained``); step 2 is this method,
started from step 1's output folder (``--model runs/find``): the mask is that folder's
``masks.safetensors`` if it has one, otherwise its zeros (over the recipe's targets, which
must be the ones step 1 pruned); every weight is then replaced by the pretrained model's
(``rewind.to``; empty: the model step 1 started from, read from its ``sparsebert.json``):
the kept weights of the pruned matrices equal the pretrained ones, the pruned ones are zero,
everything else is pretrained too, and the task head is the pretrained checkpoint's if it
has one, else a new one (seeded), as the reference re-loads the pretrained model and applies
the mask. Training then keeps the mask locked exactly as ``transfer`` does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sparsebert.config import Recipe
from sparsebert.errors import SparseBertError
from sparsebert.methods.base import MethodContext, register_method
from sparsebert.methods.transfer import LockedMaskTransfer

logger = logging.getLogger("sparsebert")


@dataclass
class RewindConfig:
    """The ``rewind`` section of ``srnet-rewind``."""

    owners: ClassVar[str] = "srnet-rewind"

    to: str = ""  # the pretrained model (path or hub name); empty: the model the mask run started from


def pretrained_source(model_path: str | None, configured: str = "") -> str:
    """Where the rewind weights come from: ``configured``, else the ``model`` recorded in the
    mask run's sparsebert.json."""
    from sparsebert.models import RUN_INFO_FILE, resolve_model_path

    if configured:
        return resolve_model_path(configured)
    info = os.path.join(model_path or "", RUN_INFO_FILE)
    if not model_path or not os.path.isfile(info):
        raise SparseBertError(
            f"srnet-rewind needs the pretrained weights: '{model_path}' has no {RUN_INFO_FILE} naming the "
            "model its mask was found on; pass --set rewind.to=PRETRAINED"
        )
    with open(info, encoding="utf-8") as f:
        start = json.load(f).get("model")
    if not start:
        raise SparseBertError(f"{info} names no starting model; pass --set rewind.to=PRETRAINED")
    return resolve_model_path(start)


@torch.no_grad()
def rewind_to_pretrained(model: nn.Module, pretrained: str) -> None:
    """Load ``pretrained`` into ``model`` in place (same class and config: base weights from the
    checkpoint, a head it lacks newly initialised)."""
    import copy

    from sparsebert.safe_load import check_model_folder

    if os.path.isdir(pretrained):
        check_model_folder(pretrained, "pretrained model")
    config = copy.deepcopy(model.config)
    try:
        fresh = type(model).from_pretrained(pretrained, config=config, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise SparseBertError(f"could not load the pretrained weights '{pretrained}': {err}") from None
    state = fresh.state_dict()
    mine = model.state_dict()
    wrong = [k for k in mine if k in state and state[k].shape != mine[k].shape]
    if wrong or set(state) != set(mine):
        raise SparseBertError(
            f"'{pretrained}' is not the architecture of the masked model (differing: "
            f"{(wrong or sorted(set(state) ^ set(mine)))[:3]}): rewind to the model the mask was found on"
        )
    model.load_state_dict(state)
    del fresh


@register_method
class SrnetRewind(LockedMaskTransfer):
    """Locked-mask fine-tuning of a mask found on the pretrained model, from the pretrained weights."""

    name = "srnet-rewind"
    sections = {"rewind": RewindConfig}

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe,
                 context: MethodContext | None = None):
        super().__init__(model, params, recipe, context)  # the mask: masks.safetensors or the zeros
        self.pretrained = pretrained_source(self.context.model_path, recipe.sections["rewind"].to)
        rewind_to_pretrained(model, self.pretrained)
        self.masks.apply_()
        logger.info("srnet-rewind: weights rewound to '%s', mask (%.2f%% sparse) locked",
                    self.pretrained, 100 * self.masks.sparsity())

    def report(self) -> dict[str, Any]:
        return {**super().report(), "rewound_to": self.pretrained}


__all__ = ["RewindConfig", "SrnetRewind", "pretrained_source", "rewind_to_pretrained"]
