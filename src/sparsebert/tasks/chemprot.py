"""ChemProt chemical-protein relation classification, SciBERT's version.

Data: ``chemprot_scibert/{train,dev,test}.txt`` (dev = validation), JSON lines
``{"text", "label", "metadata"}``; the two entities are marked in the text, ``<< chemical >>``
and ``[[ protein ]]`` (the markers are kept: the model sees them as ordinary tokens, as in
SciBERT). 4,169 / 2,427 / 3,469 sentences. This is SciBERT's 13-way fine-grained label set
(INHIBITOR, SUBSTRATE, ...), **not** BLUE's 5-class CPR version, and it has **no negative
("false") class**: every pair in these files carries a relation. The label order is fixed
here (sorted names); a label outside it is an error naming the file and line.

Metric as SciBERT reports it: micro-F1 over the positive relation labels (sklearn
``f1_score(average="micro", labels=<positive ids>)``), ``main_metric = "micro_f1"``, plus
accuracy and macro-F1 over the positive labels. A label named ``false`` would be left out of
the positive set; as this copy has none, micro-F1 over all 13 labels equals accuracy here.
The test split is a second, optional evaluation set. There is no hub copy of this split:
``--data-dir`` is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import EvalSet, Task, register_task
from sparsebert.tasks.datafiles import check_split, load_hub, open_text, split_path, take

CHEMPROT_LABELS = (
    "ACTIVATOR", "AGONIST", "AGONIST-ACTIVATOR", "AGONIST-INHIBITOR", "ANTAGONIST", "DOWNREGULATOR",
    "INDIRECT-DOWNREGULATOR", "INDIRECT-UPREGULATOR", "INHIBITOR", "PRODUCT-OF", "SUBSTRATE",
    "SUBSTRATE_PRODUCT-OF", "UPREGULATOR",
)
SPLIT_FILES = {
    "train": ("train.txt", "train.jsonl"),
    "validation": ("dev.txt", "dev.jsonl"),
    "test": ("test.txt", "test.jsonl"),
}


@dataclass(frozen=True)
class ChemProtTask(Task):
    name: str = "chemprot"
    labels: tuple[str, ...] = CHEMPROT_LABELS
    negative_labels: tuple[str, ...] = ("false",)
    folders: tuple[str, ...] = ("chemprot_scibert", "chemprot")
    hub_name: str | None = None
    kind: str = "sequence-classification"
    main_metric: str = "micro_f1"

    @property
    def positive_ids(self) -> list[int]:
        return [i for i, name in enumerate(self.labels) if name not in self.negative_labels]

    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        import datasets

        check_split(self.name, split, SPLIT_FILES)
        if data_dir:
            cols = read_jsonl(split_path(self.name, split, data_dir, self.folders, SPLIT_FILES), self.labels)
        else:
            ds = load_hub(self.name, self.hub_name, split)
            labels = [self._label_id(x, self.hub_name, 0) for x in ds["label"]]
            cols = {"text": list(ds["text"]), "label": labels}
        if not cols["text"]:
            raise SparseBertError(f"{self.name} '{split}' has no examples")
        return take(datasets.Dataset.from_dict(cols), max_samples)

    def _label_id(self, value, source: str, line_no: int) -> int:
        if isinstance(value, int) and 0 <= value < len(self.labels):
            return value
        if value in self.labels:
            return self.labels.index(value)
        raise SparseBertError(
            f"{source}, line {line_no}: label {value!r} is not one of ChemProt's 13 SciBERT labels "
            f"{list(self.labels)}"
        )

    def encode(self, ds, tokenizer, max_seq_length: int):
        def fn(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=max_seq_length)
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(fn, batched=True, remove_columns=["text"], desc=f"tokenising {self.name}")

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet("validation", "validation"), EvalSet("test", "test", optional=True)]

    def metrics(self, predictions, label_ids, eval_set: EvalSet) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score

        preds, gold = np.asarray(predictions), np.asarray(label_ids)
        positive = self.positive_ids
        return {
            "micro_f1": float(f1_score(gold, preds, average="micro", labels=positive, zero_division=0)),
            "macro_f1": float(f1_score(gold, preds, average="macro", labels=positive, zero_division=0)),
            "accuracy": float(accuracy_score(gold, preds)),
        }


def read_jsonl(path: str, labels: tuple[str, ...]) -> dict[str, list]:
    """``text`` and ``label`` (ids) of a SciBERT-format JSONL file."""
    task = ChemProtTask(labels=labels)
    cols: dict[str, list] = {"text": [], "label": []}
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SparseBertError(
                    f"{path}, line {line_no}: not JSON ({err}); expected one "
                    '{"text": ..., "label": ...} object per line (SciBERT format)'
                ) from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise SparseBertError(
                    f"{path}, line {line_no}: expected an object with 'text' and 'label' fields, "
                    f"got keys {list(row) if isinstance(row, dict) else type(row).__name__}"
                )
            cols["text"].append(row["text"])
            cols["label"].append(task._label_id(row["label"], path, line_no))
    return cols


CHEMPROT = register_task(ChemProtTask(), aliases=("chemprot_scibert",))

__all__ = ["CHEMPROT", "CHEMPROT_LABELS", "ChemProtTask", "read_jsonl"]
