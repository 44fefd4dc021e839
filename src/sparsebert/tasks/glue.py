"""The eight GLUE tasks: files in GLUE format (or the quirky copies in ../shared/data), or
the Hugging Face hub by name, with the official metric of each task.

Local layouts handled: GLUE's own (``SST-2/train.tsv``, ``dev.tsv``), the ALPS re-split of
SST-2 (train = alps_train + alps_dev, dev = alps_test), CoLA's header-less raw files,
MRPC's UTF-8 BOM, and the derived MNLI dev file (premise/hypothesis/label columns).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import EvalSet, Task, register_task

csv.field_size_limit(sys.maxsize)

# Role -> column names that may hold it, in order of preference.
_TEXT_A = ("sentence1", "premise", "#1 String", "question1", "question", "sentence")
_TEXT_B = ("sentence2", "hypothesis", "#2 String", "question2", "sentence")
_LABEL = ("label", "gold_label", "Quality", "is_duplicate", "score")


@dataclass(frozen=True)
class GlueTask(Task):
    """What a GLUE task is: its inputs, label space, metric and where its files may be."""

    name: str
    pair: bool
    labels: tuple[str, ...] | None  # None: regression
    main_metric: str
    folders: tuple[str, ...]
    split_files: dict[str, tuple[tuple[str, ...], ...]]  # split -> alternative file groups
    headerless_columns: tuple[str, ...] | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    extra_eval_sets: tuple[EvalSet, ...] = ()
    kind: str = "sequence-classification"

    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        return load_split(self, split, data_dir, max_samples=max_samples)

    def encode(self, ds, tokenizer, max_seq_length: int):
        return tokenize(ds, tokenizer, self, max_seq_length)

    def encode_prompt(self, ds, tokenizer, max_seq_length: int):
        from sparsebert.tasks.prompts import tokenize_with_prompt

        return tokenize_with_prompt(ds, tokenizer, self, max_seq_length)

    def prompt(self):
        from sparsebert.tasks.prompts import PROMPTS

        return PROMPTS.get(self.name)

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet("validation", "validation"), *self.extra_eval_sets]

    def metrics(self, predictions, label_ids, eval_set: EvalSet) -> dict[str, float]:
        return glue_metrics(self, predictions, label_ids)


def _splits(train, validation, test=(("test.tsv",),), **extra):
    return {"train": train, "validation": validation, "test": test, **extra}


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        "cola", False, ("unacceptable", "acceptable"), "matthews_correlation", ("cola", "CoLA"),
        _splits((("train.tsv",), ("in_domain_train.tsv",)),
                (("dev.tsv",), ("in_domain_dev.tsv",))),
        headerless_columns=("source", "label", "original_label", "sentence"),
    ),
    "sst2": GlueTask(
        "sst2", False, ("negative", "positive"), "accuracy", ("sst2", "SST-2", "sst-2"),
        _splits((("train.tsv",), ("alps_train.tsv", "alps_dev.tsv")),
                (("dev.tsv",), ("alps_test.tsv",))),
    ),
    "mrpc": GlueTask(
        "mrpc", True, ("not_equivalent", "equivalent"), "f1", ("mrpc", "MRPC"),
        _splits((("train.tsv",),), (("dev.tsv",),), (("msr_paraphrase_test.txt",),)),
    ),
    "stsb": GlueTask(
        "stsb", True, None, "pearson", ("stsb", "STS-B", "sts-b"),
        _splits((("train.tsv",),), (("dev.tsv",),)),
    ),
    "qqp": GlueTask(
        "qqp", True, ("not_duplicate", "duplicate"), "f1", ("qqp", "QQP"),
        _splits((("train.tsv",),), (("dev.tsv",),)),
    ),
    "mnli": GlueTask(
        "mnli", True, ("entailment", "neutral", "contradiction"), "accuracy", ("mnli", "MNLI"),
        _splits((("train.tsv",),), (("dev_matched.tsv",), ("mnli_dev_matched_derived.tsv",)),
                (("test_matched.tsv",),),
                validation_mismatched=(("dev_mismatched.tsv",),)),
        hub_splits={"validation": "validation_matched", "test": "test_matched"},
        extra_eval_sets=(EvalSet("validation_mismatched", "validation_mismatched", optional=True),),
    ),
    "qnli": GlueTask(
        "qnli", True, ("entailment", "not_entailment"), "accuracy", ("qnli", "QNLI"),
        _splits((("train.tsv",),), (("dev.tsv",),)),
    ),
    "rte": GlueTask(
        "rte", True, ("entailment", "not_entailment"), "accuracy", ("rte", "RTE"),
        _splits((("train.tsv",),), (("dev.tsv",),)),
    ),
}
_ALIASES = {"sst2": ("sst-2",), "stsb": ("sts-b",), "mnli": ("mnli-m", "mnli_matched")}
for _task in GLUE_TASKS.values():
    register_task(_task, aliases=_ALIASES.get(_task.name, ()))


def tokenize(ds, tokenizer, task: GlueTask, max_seq_length: int):
    """Tokenise text_a [, text_b] and add a `length` column for length-grouped batching."""

    def fn(batch):
        texts = (batch["text_a"], batch["text_b"]) if task.pair else (batch["text_a"],)
        enc = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    drop = [c for c in ds.column_names if c.startswith("text_")]
    return ds.map(fn, batched=True, remove_columns=drop, desc=f"tokenising {task.name}")


def _task_dir(task: GlueTask, data_dir: str) -> str:
    """The folder holding the task's files: ``data_dir`` itself or one of its task subfolders."""
    if not os.path.isdir(data_dir):
        raise SparseBertError(f"data directory '{data_dir}' does not exist")
    all_files = {f for groups in task.split_files.values() for g in groups for f in g}
    if any(os.path.isfile(os.path.join(data_dir, f)) for f in all_files) and not any(
        os.path.isdir(os.path.join(data_dir, d)) for d in task.folders
    ):
        return data_dir
    for folder in task.folders:
        path = os.path.join(data_dir, folder)
        if os.path.isdir(path):
            return path
    raise SparseBertError(
        f"no {task.name} data in '{data_dir}': expected a subfolder named "
        f"{' or '.join(task.folders)} holding GLUE-format files (train.tsv, dev.tsv)"
    )


Rows = list[tuple[int, list[str]]]


def _read_rows(path: str, headerless: tuple[str, ...] | None) -> tuple[list[str], Rows]:
    """The header and the (line number, cells) of every non-empty row; every row must have a
    cell for every column (a trailing empty one aside)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(i + 1, r) for i, r in enumerate(reader) if r]
    except UnicodeDecodeError as err:
        with open(path, "rb") as f:
            line = f.read()[: err.start].count(b"\n") + 1
        raise SparseBertError(
            f"{path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start}); "
            "re-save the file as UTF-8"
        ) from None
    if not rows:
        raise SparseBertError(f"data file '{path}' is empty")
    first = [c.strip() for c in rows[0][1]]
    has_header = any(c in _LABEL or c in _TEXT_A for c in first)
    if has_header:
        header, body = first, rows[1:]
    elif headerless is not None:
        header, body = list(headerless), rows
    else:
        raise SparseBertError(
            f"data file '{path}' has no header row naming its columns; expected e.g. "
            f"'sentence<TAB>label' or 'sentence1<TAB>sentence2<TAB>label'"
        )
    if not body:
        raise SparseBertError(f"data file '{path}' has a header ({', '.join(header)}) but no rows")
    for line, r in body:
        if len(r) < len(header) - 1:
            raise SparseBertError(
                f"{path}, line {line}: {len(r)} tab-separated cells, the header names {len(header)} "
                f"({', '.join(header)}); fix the row (a tab inside a text breaks it)"
            )
    return header, body


def _pick(columns: list[str], candidates: tuple[str, ...], exclude: str | None = None) -> str | None:
    for c in candidates:
        if c in columns and c != exclude:
            return c
    return None


STSB_RANGE = (0.0, 5.0)


def _label_id(task: GlueTask, raw: str, where: str) -> float | int:
    raw = raw.strip()
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise SparseBertError(f"{where}: label '{raw}' is not a number ({task.name} scores)") from None
        lo, hi = STSB_RANGE
        if not lo <= value <= hi:
            raise SparseBertError(f"{where}: score {value:g} is outside {task.name}'s range [{lo:g}, {hi:g}]")
        return value
    if raw in task.labels:
        return task.labels.index(raw)
    try:
        value = int(raw)
    except ValueError:
        raise SparseBertError(
            f"{where}: label '{raw}' is not one of {task.name}'s labels {list(task.labels)}"
        ) from None
    if not 0 <= value < task.num_labels:
        raise SparseBertError(
            f"{where}: label {value} out of range for {task.name} (0..{task.num_labels - 1})"
        )
    return value


NO_CONSENSUS = "-"
"""MNLI's gold label for pairs whose annotators did not agree: GLUE leaves them out."""


def read_glue_file(task: GlueTask, path: str) -> dict[str, list]:
    """Read one GLUE-format file into columns ``text_a`` [, ``text_b``], ``label``.

    Every row needs a label: an empty one is an error naming the line (only MNLI's
    no-consensus ``-`` is left out, as GLUE does)."""
    header, body = _read_rows(path, task.headerless_columns)
    a = _pick(header, ("sentence",) if not task.pair else _TEXT_A)
    b = _pick(header, _TEXT_B, exclude=a) if task.pair else None
    y = _pick(header, _LABEL)
    expected = "text column(s) and a label column"
    for role, col in (("first text", a), ("second text", b if task.pair else "-"), ("label", y)):
        if col is None:
            raise SparseBertError(
                f"data file '{path}' has no {role} column for {task.name} (columns: {header}); "
                f"a GLUE-format file needs {expected}"
            )
    out: dict[str, list] = {"text_a": [], "label": []}
    if task.pair:
        out["text_b"] = []
    for line, cells in body:
        r = dict(zip(header, cells, strict=False))
        raw = (r.get(y) or "").strip()
        if raw == NO_CONSENSUS and task.name == "mnli":
            continue
        if not raw:
            raise SparseBertError(
                f"{path}, line {line}: empty {y} for a labelled {task.name} split; fill it in or remove "
                "the row"
            )
        out["text_a"].append(r[a].strip())
        if task.pair:
            out["text_b"].append((r.get(b) or "").strip())
        out["label"].append(_label_id(task, raw, f"{path}, line {line}"))
    return out


def _load_local(task: GlueTask, data_dir: str, split: str) -> dict[str, list]:
    folder = _task_dir(task, data_dir)
    groups = task.split_files.get(split)
    if groups is None:
        raise SparseBertError(f"{task.name} has no split '{split}'; splits: {', '.join(task.split_files)}")
    for group in groups:
        paths = [os.path.join(folder, f) for f in group]
        if all(os.path.isfile(p) for p in paths):
            merged: dict[str, list] = {}
            for p in paths:
                for k, v in read_glue_file(task, p).items():
                    merged.setdefault(k, []).extend(v)
            return merged
    wanted = " or ".join("+".join(g) for g in groups)
    present = ", ".join(sorted(os.listdir(folder))) or "nothing"
    raise SparseBertError(
        f"{task.name} has no '{split}' split in '{folder}': expected {wanted}, found {present}. "
        f"Point --data-dir at a folder that has it, or load the task from the hub"
    )


def _load_hub(task: GlueTask, hub_name: str, split: str) -> dict[str, list]:
    from sparsebert.tasks.datafiles import load_hub

    ds = load_hub(task.name, hub_name, task.hub_splits.get(split, split), config=task.name)
    cols = ds.column_names
    a = _pick(cols, ("sentence",) if not task.pair else _TEXT_A)
    b = _pick(cols, _TEXT_B, exclude=a) if task.pair else None
    out = {"text_a": list(ds[a]), "label": list(ds["label"])}
    if b:
        out["text_b"] = list(ds[b])
    return out


def load_split(
    task: GlueTask | str,
    split: str,
    data_dir: str | None = None,
    hub_name: str = "nyu-mll/glue",
    max_samples: int | None = None,
):
    """Load one split as a `datasets.Dataset` with text_a [, text_b], label.

    ``max_samples`` keeps the first N rows (a deterministic proxy subset).
    """
    import datasets

    from sparsebert.tasks.base import get_task

    task = get_task(task) if isinstance(task, str) else task
    cols = _load_local(task, data_dir, split) if data_dir else _load_hub(task, hub_name, split)
    if not cols["label"]:
        raise SparseBertError(f"{task.name} '{split}' has no labelled rows")
    ds = datasets.Dataset.from_dict(cols)
    if max_samples is not None:
        if max_samples <= 0:
            raise SparseBertError(f"max samples must be positive, got {max_samples}")
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def glue_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The official GLUE metric(s) of ``task`` from argmax (or regression) predictions."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.is_regression:
        return {"pearson": float(pearsonr(predictions, labels)[0]),
                "spearmanr": float(spearmanr(predictions, labels)[0])}
    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if task.name == "cola":
        out["matthews_correlation"] = float(matthews_corrcoef(labels, predictions))
    if task.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, predictions))
    return out


def compute_metrics_fn(task: GlueTask) -> Callable:
    """The official GLUE metric(s) of ``task`` for a transformers `EvalPrediction`."""

    def compute(pred) -> dict[str, float]:
        return task.score(task.eval_sets()[0], pred.predictions, pred.label_ids)

    return compute
