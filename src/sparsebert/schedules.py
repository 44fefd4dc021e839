"""When to prune how much, and what the learning rate does meanwhile.

All positions are fractions of the run (``start``, ``end``, ``frequency``), so one recipe
scales with the length of training; the cubic shape with a large first step makes the
schedule scale with the target sparsity (GMP*: Kurtic, Hoefler & Alistarh 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsebert.errors import SparseBertError, check_sparsity


def cubic_sparsity(t: float, t0: float, t1: float, s_i: float, s_f: float) -> float:
    """Zhu & Gupta's cubic schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0)/(t1 - t0))^3."""
    if t <= t0:
        return s_i
    if t >= t1:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t1 - t0)) ** 3


@dataclass(frozen=True)
class GradualSchedule:
    """A cubic sparsity schedule with a first step, fixed pruning interval and final hold.

    Pruning happens at ``start`` (to ``init_sparsity``), then every ``frequency`` of
    training until ``end`` (where the target is reached); from ``end`` to the end of
    training the sparsity is held (the "cool-down" in which accuracy recovers).
    """

    final_sparsity: float
    init_sparsity: float = 0.7
    start: float = 0.0
    end: float = 0.7
    frequency: float = 0.1

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "target sparsity")
        check_sparsity(self.init_sparsity, "schedule.init_sparsity")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise SparseBertError(
                f"schedule needs 0 <= start <= end <= 1 (fractions of training), "
                f"got start={self.start}, end={self.end}"
            )
        if not 0.0 < self.frequency <= 1.0:
            raise SparseBertError(f"schedule.frequency must be in (0, 1], got {self.frequency}")

    @property
    def first_sparsity(self) -> float:
        """The first step never overshoots the target (a 50% target starts at 50%)."""
        return min(self.init_sparsity, self.final_sparsity)

    def pruning_steps(self, total_steps: int) -> list[int]:
        """Optimizer steps (0-based) at whose beginning masks are recomputed."""
        if total_steps <= 0:
            raise SparseBertError("training has no steps: check epochs / max_steps / data size")
        first = min(int(round(self.start * total_steps)), total_steps - 1)
        last = min(int(round(self.end * total_steps)), total_steps - 1)
        interval = max(1, int(round(self.frequency * total_steps)))
        steps = list(range(first, last, interval))
        if not steps or steps[-1] != last:
            steps.append(last)
        return steps

    def sparsity_at(self, step: int, total_steps: int) -> float:
        """Sparsity in force at optimizer step ``step``: cubic at each pruning step, held between."""
        steps = self.pruning_steps(total_steps)
        done = [s for s in steps if s <= step]
        if not done:
            return 0.0
        if len(steps) == 1:
            return self.final_sparsity
        return cubic_sparsity(done[-1], steps[0], steps[-1], self.first_sparsity, self.final_sparsity)


def rewarm_lr_lambda(
    pruning_steps: list[int], total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.1
):
    """LR multiplier with re-warming: back to the peak at every pruning step, then linear decay.

    Each segment between consecutive pruning steps (the first one from step 0, the last one
    to the end of training) decays linearly from 1 to ``final_ratio``. During the first
    ``warmup_steps`` steps the multiplier is additionally scaled by a linear warmup.
    """
    boundaries = sorted(set(pruning_steps))

    def factor(step: int) -> float:
        seg_start, seg_end = 0, total_steps
        for b in boundaries:
            if b <= step:
                seg_start = b
            else:
                seg_end = b
                break
        frac = min(1.0, (step - seg_start) / max(1, seg_end - seg_start))
        value = 1.0 - (1.0 - final_ratio) * frac
        if step < warmup_steps:
            value *= (step + 1) / warmup_steps
        return value

    return factor


def linear_lr_lambda(total_steps: int, warmup_steps: int = 0):
    """Plain warmup + linear decay to zero (the dense fine-tuning default)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def cubic_ramp(t: float, t0: float, t1: float, final: float) -> float:
    """A value ramping cubically from 0 at t0 to ``final`` at t1 (SMP's λ schedule)."""
    if t <= t0:
        return 0.0
    if t >= t1:
        return final
    return final * (1.0 - (1.0 - (t - t0) / (t1 - t0)) ** 3)


__all__ = [
    "GradualSchedule",
    "cubic_ramp",
    "cubic_sparsity",
    "linear_lr_lambda",
    "rewarm_lr_lambda",
]
