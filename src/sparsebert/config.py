"""The recipe as data: the sections every method shares, plus the sections a method adds.

Kept apart from `recipe.py` (which reads, validates and assembles recipes from what is
registered) so that pruning methods can take a `Recipe` without importing the loader: the
loader imports the method registry, the methods import only this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sparsebert.schedules import GradualSchedule


@dataclass
class ScheduleConfig:
    init_sparsity: float = 0.7
    start: float = 0.0
    end: float = 0.7
    frequency: float = 0.1


@dataclass
class LRConfig:
    rewarm: bool = True
    final_ratio: float = 0.1


@dataclass
class DistillationConfig:
    enabled: bool = True
    hardness: float = 1.0
    temperature: float = 2.0
    hidden: float = 0.0  # weight of layer-wise hidden-state KD (layer_distillation), 0 = off
    attention: float = 0.0  # weight of layer-wise attention KD, 0 = off


@dataclass
class BudgetConfig:
    """How the training budget grows with the target sparsity (`budgets.py`). ``scale: none``
    trains for what ``training`` says; ``scale: sparsity`` multiplies it by
    log(1 - s) / log(1 - reference_sparsity), at least 1 and at most ``max_factor``."""

    scale: str = "none"
    reference_sparsity: float = 0.5
    max_factor: float = 8.0


@dataclass
class Recipe:
    """A validated recipe. ``sections`` holds the method's own sections (e.g. ``masks`` of the
    learned-mask methods), keyed by their YAML name."""

    name: str = "custom"
    method: str = "gmp"
    targets: list[str] = field(default_factory=lambda: ["encoder-linears"])
    allocation: str = "global"
    sparsity: float = 0.9
    criterion: str = "magnitude"
    criterion_options: Any = None  # the criterion's Options dataclass, when the recipe sets any
    pattern: str | None = None  # "N:M" semi-structured sparsity (fixes sparsity at 1 - N/M)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    training: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def masks(self) -> Any | None:
        """The learned-mask section (None for methods without one)."""
        return self.sections.get("masks")

    @property
    def learned(self) -> bool:
        """Whether masks are learned in the forward pass (the method has a ``masks`` section)."""
        return "masks" in self.sections

    def gradual_schedule(self) -> GradualSchedule:
        return GradualSchedule(final_sparsity=self.sparsity, **dataclasses.asdict(self.schedule))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
        for key, section in self.sections.items():
            out[key] = section_to_dict(section)
        return out


def section_to_dict(section: Any) -> dict[str, Any]:
    """A section dataclass as its YAML mapping (field metadata ``key`` renames, nested too)."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        nested = dataclasses.is_dataclass(value)
        out[f.metadata.get("key", f.name)] = section_to_dict(value) if nested else value
    return out


__all__ = ["BudgetConfig", "DistillationConfig", "LRConfig", "Recipe", "ScheduleConfig", "section_to_dict"]
