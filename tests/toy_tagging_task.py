"""A toy token-classification task, in one small file: the example of how a new task plugs
in (subclass `Task`, implement loading and encoding, register it).

Each word is tagged POS, NEG or O by a fixed word list, so a model can learn it; data is
generated, so the task needs no files. Metric: word-level tag accuracy.
"""

from __future__ import annotations

import random

import numpy as np

from sparsebert.tasks.base import EvalSet, Task, register_task

POS = ["good", "great", "lovely", "wonderful", "fine"]
NEG = ["bad", "awful", "boring", "terrible", "dull"]
OTHER = ["the", "film", "was", "a", "plot", "and"]


class ToyTagging(Task):
    name = "toy-tags"
    kind = "token-classification"
    labels = ("O", "POS", "NEG")
    main_metric = "accuracy"

    def load_split(self, split, data_dir, max_samples=None):
        import datasets

        rng = random.Random({"train": 1, "validation": 2}[split])
        rows = {"words": [], "tags": []}
        for _ in range(max_samples or 64):
            words = [rng.choice(POS + NEG + OTHER) for _ in range(rng.randint(3, 8))]
            rows["words"].append(words)
            rows["tags"].append([1 if w in POS else 2 if w in NEG else 0 for w in words])
        return datasets.Dataset.from_dict(rows)

    def encode(self, ds, tokenizer, max_seq_length):
        def fn(batch):
            enc = tokenizer(
                batch["words"], is_split_into_words=True, truncation=True, max_length=max_seq_length
            )
            labels = []
            for i, tags in enumerate(batch["tags"]):
                previous, row = None, []
                for word in enc.word_ids(i):
                    row.append(-100 if word is None or word == previous else tags[word])
                    previous = word
                labels.append(row)
            enc["labels"] = labels
            return enc

        return ds.map(fn, batched=True, remove_columns=ds.column_names)

    def eval_sets(self):
        return [EvalSet("validation", "validation")]

    def score(self, eval_set, predictions, label_ids, features=None, examples=None):
        preds = np.argmax(predictions, axis=-1)
        keep = label_ids != -100
        return {"accuracy": float((preds[keep] == label_ids[keep]).mean())}


register_task(ToyTagging())
