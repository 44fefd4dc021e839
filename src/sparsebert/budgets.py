"""Training budgets that grow with the target sparsity (GMP*'s first guideline).

The GMP* paper's point is that a higher target needs a longer run with pruning steps further
apart: recovering from removing 90% of the weights takes longer than from removing 50%. A
recipe that gives every target the same budget under-trains the high ones (measured here:
MiniLM on SST-2, GMP* to 90% from the README's quick-start teacher, 61.7% after one epoch,
77.6% after three: `bench/results/gmp_sst2.md` and the issue that asked for this).

The rule (``budget.scale: sparsity``): the budget the user gives (``num_train_epochs``, or
``max_steps`` when set) is the budget of the reference sparsity s_ref (0.5 by default), and a
target s gets

    factor(s) = log(1 - s) / log(1 - s_ref),   clamped to [1, max_factor],

i.e. the same number of steps for every halving of the kept weights: 50% -> 1x, 80% -> 2.3x,
90% -> 3.3x, 95% -> 4.3x, 97% -> 5.1x. It never shortens a run below what the user asked
for, and for a base of ~3 epochs at 50% (a usual dense fine-tuning budget) it reaches the
order of the papers' budgets at 90-97% (oBERT: 30 epochs at 80/90/97%, METHODS.md) only
with a larger base: the user picks the base, the rule keeps the targets consistent. The
pruning schedule is given in fractions of training (``schedule.start/end/frequency``), so the
spacing of pruning steps in steps grows by the same factor: both of GMP*'s knobs move
together.
"""

from __future__ import annotations

import math
from typing import Any

from sparsebert.errors import SparseBertError

SCALES = ("none", "sparsity")


def budget_factor(sparsity: float, reference_sparsity: float = 0.5, max_factor: float = 8.0) -> float:
    """log(1 - s) / log(1 - s_ref), clamped to [1, max_factor]."""
    if not 0.0 < reference_sparsity < 1.0:
        raise SparseBertError(f"budget.reference_sparsity must be in (0, 1), got {reference_sparsity}")
    if sparsity <= 0.0:
        return 1.0
    if sparsity >= 1.0:
        return max_factor
    return min(max(math.log(1.0 - sparsity) / math.log(1.0 - reference_sparsity), 1.0), max_factor)


def check_budget(recipe: Any, method: Any, source: str) -> None:
    """Recipe validation of the ``budget`` section."""
    b = recipe.budget
    if b.scale not in SCALES:
        raise SparseBertError(f"{source}: budget.scale must be one of {', '.join(SCALES)}, got '{b.scale}'")
    if not 0.0 < b.reference_sparsity < 1.0:
        raise SparseBertError(
            f"{source}: budget.reference_sparsity must be in (0, 1), got {b.reference_sparsity}"
        )
    if b.max_factor < 1.0:
        raise SparseBertError(f"{source}: budget.max_factor must be >= 1, got {b.max_factor}")
    if b.scale == "sparsity" and not method.prunes:
        raise SparseBertError(
            f"{source}: budget.scale: sparsity scales the budget with the target sparsity, and method "
            f"'{recipe.method}' has none (it keeps the starting model's zeros); drop it"
        )


def scale_training(kwargs: dict[str, Any], recipe: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """TrainingArguments keywords with the budget scaled, and what was done (for the report);
    unchanged, with ``None``, when the recipe does not scale."""
    b = getattr(recipe, "budget", None)
    if b is None or b.scale == "none":
        return kwargs, None
    factor = budget_factor(recipe.sparsity, b.reference_sparsity, b.max_factor)
    out = dict(kwargs)
    steps = int(out.get("max_steps", -1) or -1)
    if steps > 0:
        out["max_steps"] = int(math.ceil(steps * factor))
        what = {"base_max_steps": steps, "max_steps": out["max_steps"]}
    else:
        epochs = float(out.get("num_train_epochs", 3.0))
        out["num_train_epochs"] = epochs * factor
        what = {"base_epochs": epochs, "epochs": out["num_train_epochs"]}
    info = {"scale": b.scale, "reference_sparsity": b.reference_sparsity, "target_sparsity": recipe.sparsity,
            "factor": round(factor, 4), **what}
    return out, info


__all__ = ["SCALES", "budget_factor", "check_budget", "scale_training"]
