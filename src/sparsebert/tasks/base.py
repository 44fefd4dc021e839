"""What a task is, for every part of sparsebert that is not the task itself.

The pipeline, the model loader, the teacher check, distillation and `evaluate` only talk to
this interface, so a new task family (token classification, extractive QA, masked LM, NLI
with out-of-distribution sets) is one new file that subclasses `Task` and registers itself
(``TASKS.register(...)``), not a second pipeline. A task says:

- ``kind``: which model class it needs (`MODEL_KINDS`), hence which head and which
  ``Auto*`` class loads it;
- how its examples are read (`load_split`, local files or a hub dataset) and encoded
  (`encode`), and its collator;
- its evaluation sets (`eval_sets`): the in-distribution one plus any number of extra sets,
  each with its own data, label mapping (e.g. 3-way NLI predictions scored 2-way on HANS)
  and metric; `score` may post-process predictions that are not an argmax (QA spans);
- which outputs distillation compares (`distillation_logits`): sequence logits; token
  logits where ``labels != -100``; start/end logits; masked positions only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsebert.registry import Registry

MODEL_KINDS = ("sequence-classification", "token-classification", "question-answering", "masked-lm")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set of a task.

    ``split``: what the task's loader is asked for; ``label_map``: predicted class id ->
    this set's label id, applied to argmax predictions before the metric (None: the task's
    own labels); ``labels``: this set's label names when they differ from the task's;
    ``optional``: a set whose data may be absent (skipped with a log line, e.g. MNLI
    mismatched in a local copy that only has matched).
    """

    name: str
    split: str
    label_map: Mapping[int, int] | None = None
    labels: tuple[str, ...] | None = None
    optional: bool = False


class Task:
    """Base of every task. Subclasses set ``name``, ``kind``, ``labels`` and ``main_metric`` and
    implement `load_split` and `encode`; the rest has defaults by ``kind``."""

    name: str
    kind: str = "sequence-classification"
    labels: tuple[str, ...] | None  # None: regression (sequence tasks) or no label space
    main_metric: str

    # -- label space --------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.kind == "sequence-classification" and self.labels is None

    @property
    def has_label_space(self) -> bool:
        """Whether the model's head has one output per label (not MLM, not QA spans)."""
        return self.kind in ("sequence-classification", "token-classification")

    # -- data ---------------------------------------------------------------------------------------
    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        """The raw examples of ``split`` as a `datasets.Dataset` (local files or the hub)."""
        raise NotImplementedError

    def encode(self, ds, tokenizer, max_seq_length: int):
        """Tokenised features the model takes (plus a ``length`` column for length grouping)."""
        raise NotImplementedError

    def encode_eval(self, ds, tokenizer, max_seq_length: int):
        """Features of an evaluation set; the same as `encode` unless a task needs more (QA keeps
        offsets and example ids for post-processing; MLM masks deterministically)."""
        return self.encode(ds, tokenizer, max_seq_length)

    def encode_prompt(self, ds, tokenizer, max_seq_length: int):
        """Prompt-filled features for a masked-LM head with label words (SMP); tasks without a
        prompt template raise."""
        from sparsebert.errors import SparseBertError

        raise SparseBertError(
            f"task {self.name} has no prompt template for an MLM head; use masks.head: classifier"
        )

    def prompt(self) -> Any | None:
        """The task's prompt (template + label words) for an MLM head, or None."""
        return None

    def collator(self, tokenizer):
        """Batches of encoded examples, padded."""
        from transformers import (
            DataCollatorForLanguageModeling,
            DataCollatorForTokenClassification,
            DataCollatorWithPadding,
        )

        if self.kind == "token-classification":
            return DataCollatorForTokenClassification(tokenizer)
        if self.kind == "masked-lm":
            return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        return DataCollatorWithPadding(tokenizer)

    # -- evaluation ---------------------------------------------------------------------------------
    def eval_sets(self) -> list[EvalSet]:
        """The in-distribution evaluation set first, then any extra (e.g. out-of-distribution)."""
        return [EvalSet("validation", "validation")]

    def load_eval_set(self, eval_set: EvalSet, data_dir: str | None, max_samples: int | None = None):
        return self.load_split(eval_set.split, data_dir, max_samples)

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        """Per evaluation batch, before predictions are gathered (the Trainer's
        ``preprocess_logits_for_metrics``): MLM keeps the argmax, not vocabulary-size logits."""
        return logits

    def metrics(self, predictions: np.ndarray, label_ids: np.ndarray, eval_set: EvalSet) -> dict[str, float]:
        """The official metric(s) from argmax (or regression) predictions, after label mapping."""
        raise NotImplementedError

    def score(
        self, eval_set: EvalSet, predictions: Any, label_ids: Any, features=None, examples=None
    ) -> dict[str, float]:
        """Metrics of one evaluation set from the model's raw outputs. The default takes the
        argmax over classes (or the regression value), maps it with ``eval_set.label_map`` and
        calls `metrics`; tasks whose predictions are not an argmax (QA spans) override this
        and may use the encoded ``features`` and raw ``examples``."""
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        logits = np.asarray(logits)
        if self.is_regression:
            preds = np.squeeze(logits, -1) if logits.ndim > 1 else logits
        else:
            preds = np.argmax(logits, axis=-1)
            if eval_set.label_map is not None:
                lookup = np.vectorize(lambda i: eval_set.label_map.get(int(i), int(i)), otypes=[np.int64])
                preds = lookup(preds)
        return self.metrics(preds, np.asarray(label_ids), eval_set)

    # -- distillation -------------------------------------------------------------------------------
    def distillation_logits(self, outputs: Any, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The logits distillation compares, as (N, C) rows: one row per sequence, per labelled
        token (``labels != -100``), per masked position, or the start and end logits of QA.
        Student and teacher see the same positions (the selection uses the student's labels)."""
        return distillation_logits(self.kind, outputs, inputs)


def distillation_logits(kind: str, outputs: Any, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """`Task.distillation_logits` by model kind."""
    if kind == "question-answering":
        return [outputs.start_logits, outputs.end_logits]
    logits = outputs.logits
    if kind in ("token-classification", "masked-lm"):
        labels = inputs.get("labels")
        if labels is None:
            return [logits.reshape(-1, logits.shape[-1])]
        return [logits[labels != -100]]
    return [logits]


TASKS: Registry[Task] = Registry(
    "task",
    builtins=[
        "sparsebert.tasks.glue",
        "sparsebert.tasks.ner",
        "sparsebert.tasks.squad",
        "sparsebert.tasks.mlm",
        "sparsebert.tasks.chemprot",
        "sparsebert.tasks.pubmedqa",
        "sparsebert.tasks.robust",
    ],
)


def register_task(task: Task, aliases: Sequence[str] = ()) -> Task:
    """Make ``task`` available by its name (``--task NAME``)."""
    return TASKS.register(task.name, task, aliases=aliases)


def get_task(name: str) -> Task:
    return TASKS.get(name)


__all__ = ["MODEL_KINDS", "TASKS", "EvalSet", "Task", "distillation_logits", "get_task", "register_task"]
