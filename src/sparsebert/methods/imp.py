"""Iterative magnitude pruning (IMP; Frankle & Carbin 2019; Chen et al. 2020 for BERT; the
SRNets study), as a fixed-mask method: prune, retrain, prune again, within one run.

Rounds: R pruning rounds reach the target sparsity s. ``imp.spacing: linear`` prunes
``rate`` of *all* targeted weights per round (s_r = min(r·rate, s): 10%, 20%, ... 90%, the
SRNets reference); ``geometric`` prunes ``rate`` of the weights *remaining* (s_r =
min(1 - (1 - rate)^r, s), Frankle & Carbin); the last round is exactly s. ``imp.rounds: R``
instead fixes the number of rounds (linear: s_r = s·r/R; geometric: s_r = 1 - (1 - s)^(r/R)).
`imp_sparsities` is the formula.

Training is cut into equal segments, one per round, and each round prunes (magnitude,
exact by count, already pruned weights first, so masks only shrink) at the start of its
segment. ``imp.dense_first: false`` (default, a fine-tuned starting model: SRNets setting 1)
prunes at step 0; ``true`` trains one dense segment first (a pretrained starting model
must learn the task before magnitudes mean anything). The learning rate re-warms at each
round (``lr.rewarm``), and the optimizer state is reset (``imp.reset_optimizer``), as the
reference rebuilds its optimizer every round.

Rewinding (lottery tickets): ``imp.rewind: start`` saves the weights at the start of
training, ``step`` at optimizer step ``imp.rewind_step``; after every later pruning the
weights are restored to that point: the kept weights of the pruned matrices (the pruned
ones stay zero) and every other parameter except the task head (which, as in the SRNets
reference, keeps training). With ``rewind: start``, ``dense_first: true`` and a pretrained
model this is SRNets setting 2 in one run: the mask is found by IMP and the last segment
fine-tunes the rewound subnetwork with its mask locked. The saved point is kept in every
checkpoint (``imp_rewind.safetensors``), so a resumed run rewinds to the same weights.

The report (``sparsebert.json``, ``method``) lists every round: step, target and measured
sparsity, and whether it rewound.
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
from sparsebert.criteria import Magnitude
from sparsebert.errors import SparseBertError
from sparsebert.heads import is_task_head
from sparsebert.methods.base import MethodContext, register_method
from sparsebert.methods.fixed import FixedMaskMethod
from sparsebert.methods.gradual import GradualPruner

logger = logging.getLogger("sparsebert")

REWIND_FILE = "imp_rewind.safetensors"
STATE_FILE = "imp_state.json"
SPACINGS = ("linear", "geometric")
REWINDS = ("none", "start", "step")
_TOL = 1e-6


@dataclass
class ImpConfig:
    """The ``imp`` section of the ``imp`` method."""

    owners: ClassVar[str] = "iterative magnitude pruning"

    rate: float = 0.1  # fraction pruned per round (of all weights: linear; of the remaining: geometric)
    spacing: str = "linear"  # linear | geometric
    rounds: int = 0  # 0: as many as `rate` needs to reach the target; > 0: exactly this many
    dense_first: bool = False  # train one dense segment before the first round (pretrained start)
    rewind: str = "none"  # none | start | step
    rewind_step: int = 0  # with rewind: step, the optimizer step whose weights are the rewind point
    reset_optimizer: bool = True  # clear the optimizer state (Adam moments) at every round


def imp_sparsities(target: float, rate: float = 0.1, spacing: str = "linear", rounds: int = 0) -> list[float]:
    """Sparsity after each round; the last is exactly ``target`` (empty for a target of 0)."""
    if spacing not in SPACINGS:
        raise SparseBertError(f"imp.spacing must be {' or '.join(SPACINGS)}, got {spacing!r}")
    if target <= 0.0:
        return []
    if rounds:
        if spacing == "linear":
            return [target * r / rounds for r in range(1, rounds)] + [target]
        return [1.0 - (1.0 - target) ** (r / rounds) for r in range(1, rounds)] + [target]
    if not 0.0 < rate < 1.0:
        raise SparseBertError(f"imp.rate must be in (0, 1), got {rate}")
    out = []
    r = 1
    while True:
        s = r * rate if spacing == "linear" else 1.0 - (1.0 - rate) ** r
        if s >= target - _TOL:
            return out + [target]
        out.append(s)
        r += 1


@register_method
class IterativeMagnitudePruning(FixedMaskMethod):
    """IMP: rounds of magnitude pruning with retraining (and optional rewinding) in between."""

    name = "imp"
    allocations = ("uniform", "global")  # uniform: per matrix, as the SRNets reference
    sections = {"imp": ImpConfig}
    lr_rewarm_default = True

    @classmethod
    def validate_recipe(cls, recipe: Recipe, source: str) -> None:
        cfg: ImpConfig = recipe.sections["imp"]
        if cfg.spacing not in SPACINGS:
            raise SparseBertError(f"{source}: imp.spacing must be {' or '.join(SPACINGS)}, "
                                  f"got {cfg.spacing!r}")
        if cfg.rewind not in REWINDS:
            raise SparseBertError(f"{source}: imp.rewind must be one of {', '.join(REWINDS)}, "
                                  f"got {cfg.rewind!r}")
        for key in ("rounds", "rewind_step"):
            value = getattr(cfg, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SparseBertError(f"{source}: imp.{key} must be a whole number >= 0, got {value!r}")
        if not cfg.rounds and not 0.0 < cfg.rate < 1.0:
            raise SparseBertError(f"{source}: imp.rate must be in (0, 1), got {cfg.rate}")
        if recipe.sparsity <= 0.0:
            raise SparseBertError(f"{source}: IMP needs a target sparsity > 0 (--sparsity)")

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], recipe: Recipe,
                 context: MethodContext | None = None):
        super().__init__(model, params, recipe, context)
        self.cfg: ImpConfig = recipe.sections["imp"]
        self.sparsities = imp_sparsities(recipe.sparsity, self.cfg.rate, self.cfg.spacing, self.cfg.rounds)
        self.pruner = GradualPruner(params, recipe.gradual_schedule(), recipe.allocation, Magnitude(),
                                    masks=self.masks)
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.snapshot_step: int | None = None
        self.history: list[dict[str, Any]] = []

    # -- when ---------------------------------------------------------------------------------------------
    def round_steps(self, total_steps: int) -> list[int]:
        """The optimizer step at which each round prunes: the start of its training segment."""
        first = 1 if self.cfg.dense_first else 0
        segments = len(self.sparsities) + first
        steps = [int(round(k * total_steps / segments)) for k in range(first, segments)]
        if len(set(steps)) != len(steps) or (steps and steps[-1] >= total_steps):
            raise SparseBertError(
                f"IMP with {len(self.sparsities)} rounds{' after a dense segment' if first else ''} needs at "
                f"least {segments} training steps, the run has {total_steps}: train longer or use fewer "
                "rounds (imp.rate, imp.rounds)"
            )
        return steps

    def pruning_steps(self, total_steps: int) -> list[int]:
        return self.round_steps(total_steps)

    # -- rewinding -----------------------------------------------------------------------------------------
    def _rewound_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter but the task head's (the pooler is rewound: it is pretrained)."""
        return {n: p for n, p in self.model.named_parameters() if not is_task_head(n, with_pooler=False)}

    @torch.no_grad()
    def take_snapshot(self, step: int) -> None:
        self.snapshot = {n: p.detach().cpu().clone() for n, p in self._rewound_parameters().items()}
        self.snapshot_step = step
        logger.info("IMP: rewind point saved at step %d (%d tensors)", step, len(self.snapshot))

    @torch.no_grad()
    def rewind_weights(self) -> None:
        """Restore the saved weights (kept positions of the pruned matrices; all of the others)."""
        if self.snapshot is None:
            return
        for name, p in self._rewound_parameters().items():
            saved = self.snapshot.get(name)
            if saved is not None:
                p.copy_(saved.to(device=p.device, dtype=p.dtype))
        self.masks.apply_()

    # -- the loop ------------------------------------------------------------------------------------------
    def on_train_begin(self) -> None:
        super().on_train_begin()
        if self.cfg.rewind == "start" and self.snapshot is None:
            self.take_snapshot(0)

    def on_step_begin(self, step: int, total_steps: int, optimizer) -> dict | None:
        if self.cfg.rewind == "step" and step == self.cfg.rewind_step and self.snapshot is None:
            self.take_snapshot(step)
        steps = self.round_steps(total_steps)
        if step not in steps:
            return None
        r = steps.index(step)
        if any(h["round"] == r + 1 for h in self.history):  # already done (resumed at this step)
            return None
        target = self.sparsities[r]
        self.pruner.prune_to(target, optimizer)
        rewound = self.snapshot is not None
        self.rewind_weights()
        if self.cfg.reset_optimizer and optimizer is not None:
            optimizer.state.clear()
        entry = {"round": r + 1, "step": step, "target_sparsity": target,
                 "measured_sparsity": self.masks.sparsity(), "rewound": rewound}
        self.history.append(entry)
        note = f", rewound to step {self.snapshot_step}" if rewound else ""
        logger.info("IMP round %d/%d at step %d: %.2f%% sparse%s", r + 1, len(self.sparsities), step,
                    100 * entry["measured_sparsity"], note)
        return {"imp_round": r + 1, "pruned_to_sparsity": target}

    # -- state -----------------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        super().save(folder)
        if self.snapshot is not None:
            from safetensors.torch import save_file

            tensors = {n: t.contiguous() for n, t in self.snapshot.items()}
            save_file(tensors, os.path.join(folder, REWIND_FILE))
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"history": self.history, "snapshot_step": self.snapshot_step}, f)

    def load(self, folder: str) -> None:
        super().load(folder)
        self.pruner.current_sparsity = self.masks.sparsity()
        state_path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(state_path):
            with open(state_path) as f:
                state = json.load(f)
            self.history = list(state.get("history", []))
            self.snapshot_step = state.get("snapshot_step")
        rewind_path = os.path.join(folder, REWIND_FILE)
        if os.path.isfile(rewind_path):
            from safetensors.torch import load_file

            self.snapshot = load_file(rewind_path)
        elif self.cfg.rewind != "none" and self.snapshot_step is not None:
            raise SparseBertError(f"checkpoint '{folder}' has no {REWIND_FILE}: cannot rewind after resuming")

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "per_round_sparsity": [round(s, 6) for s in self.sparsities],
            "rounds": self.history,
            "spacing": "rounds" if self.cfg.rounds else self.cfg.spacing,
            "rewind": self.cfg.rewind if self.cfg.rewind != "step" else f"step {self.cfg.rewind_step}",
            "dense_first": self.cfg.dense_first,
        }


__all__ = ["ImpConfig", "IterativeMagnitudePruning", "imp_sparsities"]
