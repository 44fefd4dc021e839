"""One interface for every pruning method, and the registry the recipe schema is built from.

A method attaches to the targeted parameters of a model and is driven by `SparseTrainer`
through a handful of hooks; the trainer knows nothing of its family. What a method says:

- its recipe schema: allowed allocations (the first is the default), its own recipe sections
  (``sections``, e.g. ``masks``) with method-dependent defaults, whether the LR re-warms by
  default, whether it uses a criterion, and `validate_recipe` for its rules;
- what trains (`configure_trainable`, extra optimizer groups such as mask scores);
- per-step work (`on_step_begin`, `on_pre_optimizer_step`, `on_optimizer_step`) and its
  pruning steps (for LR re-warming);
- its loss terms (a penalty), its state in checkpoints (`save` / `load`), how it finishes
  (bake learned masks), and what it reports for ``sparsebert.json``.

A new method is one file: a subclass decorated with ``@register_method`` and its module
named in `METHODS`' built-ins (or imported as a plugin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sparsebert.allocation import ALLOCATIONS
from sparsebert.config import Recipe
from sparsebert.losses import LossTerm
from sparsebert.registry import Registry


@dataclass
class MethodContext:
    """What a method may need to know beyond the model, its targets and the recipe.

    ``model_path``: where the starting model was loaded from (sparse transfer reads its
    ``masks.safetensors``); ``head_trains``: with frozen weights, whether the task head
    still trains (it does not when an MLM head with label words classifies)."""

    model_path: str | None = None
    head_trains: bool = True


class PruningMethod:
    """Base of every method; the defaults do nothing (dense fine-tuning)."""

    name: ClassVar[str] = "method"
    allocations: ClassVar[tuple[str, ...]] = ALLOCATIONS
    sections: ClassVar[dict[str, type]] = {}
    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    lr_rewarm_default: ClassVar[bool] = True
    uses_criterion: ClassVar[bool] = False
    prunes: ClassVar[bool] = True  # has a target sparsity of its own

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe,
                 context: MethodContext | None = None):
        self.model = model
        self.params = params
        self.recipe = recipe
        self.context = context or MethodContext()

    # -- recipe schema ----------------------------------------------------------------------------
    @classmethod
    def validate_recipe(cls, recipe: Recipe, source: str) -> None:
        """Raise `SparseBertError` for a recipe this method cannot run as written."""

    # -- what trains -----------------------------------------------------------------------------------
    def configure_trainable(self, model: nn.Module) -> None:
        """Set ``requires_grad`` (default: everything trains)."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups (their parameters leave the default groups)."""
        return []

    @property
    def weights_trained(self) -> bool:
        return True

    # -- the loop ------------------------------------------------------------------------------------------
    def pruning_steps(self, total_steps: int) -> list[int]:
        """Steps at which masks change in big jumps (the LR re-warms at each)."""
        return []

    def on_train_begin(self) -> None:
        pass

    def on_step_begin(
        self, step: int, total_steps: int, optimizer: torch.optim.Optimizer | None
    ) -> dict | None:
        """Before each optimizer step; a dict returned goes into the log history."""
        return None

    def on_pre_optimizer_step(self) -> None:
        """After the backward pass(es) of a step, before the optimizer (gradients are there)."""

    def on_optimizer_step(self) -> None:
        pass

    def on_train_end(self, args: Any) -> None:
        pass

    def loss_terms(self) -> list[LossTerm]:
        return []

    def log_values(self) -> dict[str, float]:
        return {}

    # -- state ------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """Write what a checkpoint needs beyond the model's state dict."""

    def load(self, folder: str) -> None:
        """Restore what `save` wrote (resume)."""

    def report(self) -> dict[str, Any]:
        """What happened, for ``sparsebert.json``."""
        return {}


METHODS: Registry[type[PruningMethod]] = Registry("pruning method", builtins=[
    "sparsebert.methods.dense",
    "sparsebert.methods.head_only",
    "sparsebert.methods.gradual",
    "sparsebert.methods.transfer",
    "sparsebert.methods.movement",
    "sparsebert.methods.smp",
    "sparsebert.methods.mask_training",
    "sparsebert.methods.imp",
    "sparsebert.methods.srnet_rewind",
])


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make a method available as ``method: <cls.name>`` in recipes."""
    METHODS.register(cls.name, cls)
    return cls


def build_method(
    model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe, context: MethodContext | None = None
) -> PruningMethod:
    """The method a recipe names, attached to ``params`` of ``model``."""
    return METHODS.get(recipe.method)(model, params, recipe, context)


__all__ = ["METHODS", "MethodContext", "PruningMethod", "build_method", "register_method"]
