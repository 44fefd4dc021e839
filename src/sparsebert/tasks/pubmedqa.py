"""PubMedQA PQA-L (reasoning-required): yes / no / maybe from a question and its abstract.

Data (folder ``pubmedqa/`` under ``--data-dir``): ``ori_pqal.json``, a JSON object PMID ->
``{"QUESTION", "CONTEXTS" (list of abstract sections, conclusion left out), "LABELS",
"MESHES", "LONG_ANSWER", "final_decision"}``, 1,000 items (yes 552 / no 338 / maybe 110);
``test_ground_truth.json``, PMID -> label for the official 500 test items (a subset of
ori_pqal; their labels agree with ``final_decision``).

Splits: ``test`` = the 500 ground-truth PMIDs, labels from ``test_ground_truth.json``; the
other 500 items are the train/dev pool (``pool``). ``validation`` = 50 pool items (10%,
BLURB's 450/50 sizes), stratified by label: within each label the pool PMIDs are ordered by
the SHA-256 of the PMID and the first k are taken, k by largest remainder of 10% of the
label's count (yes 28, no 17, maybe 5); ``train`` = the other 450. Deterministic, and
independent of file order.

Input: the question paired with the contexts joined by a space (``question [SEP] contexts``,
truncated from the end of the contexts); the long answer is not used (the
reasoning-required setting). Labels ``yes, no, maybe``. Metrics: accuracy (main) and
macro-F1 over the three labels. Evaluation sets: validation, then test. No hub copy carries
the official test PMIDs, so ``--data-dir`` is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import EvalSet, Task, register_task
from sparsebert.tasks.datafiles import find_file, open_text, take, task_dir

PQAL_FILE = ("ori_pqal.json",)
TEST_FILE = ("test_ground_truth.json",)
SPLITS = ("train", "validation", "test", "pool")


@dataclass(frozen=True)
class PubMedQATask(Task):
    name: str = "pubmedqa"
    labels: tuple[str, ...] = ("yes", "no", "maybe")
    folders: tuple[str, ...] = ("pubmedqa", "PubMedQA", "pqal")
    validation_fraction: float = 0.1
    kind: str = "sequence-classification"
    main_metric: str = "accuracy"

    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        import datasets

        if split not in SPLITS:
            raise SparseBertError(f"{self.name} has no split '{split}'; splits: {', '.join(SPLITS)}")
        if not data_dir:
            raise SparseBertError(
                f"{self.name} needs the PQA-L files (ori_pqal.json and test_ground_truth.json from the "
                "pubmedqa GitHub repository): pass --data-dir; no hub copy carries the official test PMIDs"
            )
        folder = task_dir(self.name, data_dir, self.folders, PQAL_FILE)
        items = _read_json_object(find_file(folder, PQAL_FILE, self.name, split))
        test = _read_json_object(find_file(folder, TEST_FILE, self.name, "test"))
        missing = [pmid for pmid in test if pmid not in items]
        if missing:
            raise SparseBertError(
                f"{os.path.join(folder, TEST_FILE[0])}: {len(missing)} test PMIDs (e.g. {missing[0]}) "
                f"are not in {PQAL_FILE[0]}; the two files must come from the same PubMedQA release"
            )
        ids = self.split_ids(items, test)[split]
        cols: dict[str, list] = {"pubid": [], "question": [], "context": [], "label": []}
        for pmid in ids:
            item = items[pmid]
            for key in ("QUESTION", "CONTEXTS", "final_decision"):
                if key not in item:
                    raise SparseBertError(f"{PQAL_FILE[0]}: item {pmid} has no '{key}' field")
            label = test[pmid] if split == "test" else item["final_decision"]
            if label not in self.labels:
                raise SparseBertError(f"{self.name} item {pmid}: label {label!r} is not yes, no or maybe")
            contexts = item["CONTEXTS"]
            cols["pubid"].append(pmid)
            cols["question"].append(item["QUESTION"])
            cols["context"].append(" ".join(contexts) if isinstance(contexts, list) else str(contexts))
            cols["label"].append(self.labels.index(label))
        return take(datasets.Dataset.from_dict(cols), max_samples)

    def split_ids(self, items: dict, test: dict) -> dict[str, list[str]]:
        """PMIDs of each split (see the module docstring for the rule)."""
        pool = [pmid for pmid in items if pmid not in test]
        by_label: dict[str, list[str]] = {}
        for pmid in pool:
            by_label.setdefault(items[pmid].get("final_decision"), []).append(pmid)
        for ids in by_label.values():
            ids.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
        quotas = _largest_remainder({k: len(v) for k, v in by_label.items()},
                                    round(self.validation_fraction * len(pool)))
        validation = {p for label, ids in by_label.items() for p in ids[: quotas[label]]}
        return {
            "train": [p for p in pool if p not in validation],
            "validation": [p for p in pool if p in validation],
            "test": list(test),
            "pool": pool,
        }

    def encode(self, ds, tokenizer, max_seq_length: int):
        def fn(batch):
            enc = tokenizer(
                batch["question"], batch["context"], truncation="longest_first", max_length=max_seq_length
            )
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(fn, batched=True, remove_columns=["pubid", "question", "context"],
                      desc=f"tokenising {self.name}")

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet("validation", "validation"), EvalSet("test", "test")]

    def metrics(self, predictions, label_ids, eval_set: EvalSet) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score

        preds, gold = np.asarray(predictions), np.asarray(label_ids)
        return {
            "accuracy": float(accuracy_score(gold, preds)),
            "macro_f1": float(f1_score(gold, preds, average="macro", labels=list(range(len(self.labels))),
                                       zero_division=0)),
        }


def _read_json_object(path: str) -> dict:
    try:
        with open_text(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SparseBertError(f"'{path}' is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SparseBertError(f"'{path}' must hold a JSON object PMID -> item (PubMedQA format)")
    return data


def _largest_remainder(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over ``counts`` in proportion, rounding by largest remainder (ties: by name)."""
    n = sum(counts.values())
    if n == 0:
        return {k: 0 for k in counts}
    exact = {k: total * c / n for k, c in counts.items()}
    quotas = {k: int(v) for k, v in exact.items()}
    rest = total - sum(quotas.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - quotas[k]), str(k)))[:rest]:
        quotas[k] += 1
    return quotas


PUBMEDQA = register_task(PubMedQATask(), aliases=("pubmedqa_pqal", "pqal"))

__all__ = ["PUBMEDQA", "PubMedQATask"]
