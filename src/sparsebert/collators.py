"""Batching of the columns a task's collator does not know: the teacher's own inputs
(``teacher_input_ids`` ..., padded with the tokenizer like the student's) and the loss
terms' per-example extra columns (stacked as tensors), so that neither breaks padding nor
is dropped on the way to `SparseTrainer.compute_loss`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

TEACHER_PREFIX = "teacher_"


def with_extra_columns(base: Callable, tokenizer, extra_columns: Sequence[str] = ()) -> Callable:
    """Wrap ``base`` (the task's collator); a no-op wrapper when there is nothing extra."""
    extra = tuple(extra_columns)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        teacher_keys = [k for k in features[0] if k.startswith(TEACHER_PREFIX)]
        present = [c for c in extra if c in features[0]]
        if not teacher_keys and not present:
            return base(features)
        teacher = [{k[len(TEACHER_PREFIX):]: f.pop(k) for k in teacher_keys} for f in features]
        columns = {c: [f.pop(c) for f in features] for c in present}
        batch = base(features)
        if teacher_keys:
            padded = tokenizer.pad(teacher, return_tensors="pt")
            for k, v in padded.items():
                batch[TEACHER_PREFIX + k] = v
        for c, values in columns.items():
            batch[c] = torch.as_tensor(values)
        return batch

    return collate


__all__ = ["TEACHER_PREFIX", "with_extra_columns"]
