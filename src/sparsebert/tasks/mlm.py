"""Masked-language modelling on raw text: packed blocks, 15% dynamic masking for training,
fixed masking for evaluation, masked-token accuracy and perplexity.

Corpora (paths under the ``--data-dir`` root, e.g. ``../shared/data``):

- ``mlm-general``: ``general_english_nltk/brown_untagged_sentences.txt.gz`` (the Brown corpus
  with its POS tags stripped: 57,340 sentences, one a line, 1.16M tokens) followed by the
  Wikipedia paragraphs (``context``, each paragraph once) of the SQuAD v1.1 **train** JSON
  (``squad_v1.1/squad_v1.1_train_from_explorer_html.json.gz``, 18,896 paragraphs). Every
  article of the SQuAD **dev** JSON is kept out: a train paragraph whose title or text is
  that of a dev article is dropped (in the shared copy the two sets are already disjoint,
  48 dev vs 442 train titles; the guard matters with other copies). QNLI is built from
  SQuAD: its train sentences are in these paragraphs, its dev sentences are not (9 of the
  5,429 longer than 40 characters occur verbatim, as sentences repeated across articles).
- ``mlm-pubmed``: column ``text`` of ``pubmed_text/pubmed_unlabeled_derived.tsv.gz`` (TSV
  ``source, id, text``, 12,336 documents, ~0.8M words), derived locally from: 1,852
  Hallmarks-of-Cancer abstracts (``hoc``; HoC is itself a downstream task), the contexts of
  the 500 PubMedQA PQA-L items **not** in its test set (``pubmedqa_pqal_nontest``: the
  contexts of our PubMedQA train and validation items), 5,424 NCBI-disease
  **train** sentences and 4,560 BC5CDR **train** sentences. Nothing is excluded: no test
  text of those tasks is in it, but adapting on it before fine-tuning on PubMedQA/HoC sees
  their unlabelled train/validation text.
- ``mlm-text``: any text at ``--data-dir`` itself: a file or a folder of files; ``*.txt``
  (and anything else) is one passage per line, ``*.tsv``/``*.csv`` needs a ``text`` column,
  ``*.json`` is read as SQuAD-format contexts; each may be gzipped (``.gz``).
- `text_mlm_task` builds (and registers) a task for a given file, folder or hub dataset name
  (``datasets.load_dataset(name, config)``, column ``text``; the hub's ``validation`` split
  is used when it has one, else the held-out rule below on its ``train``).

Held-out split: a line (passage) belongs to ``validation`` iff the BLAKE2b hash of its text is
0 modulo 50 (~2% of lines), else to ``train``. A hash rather than a position, so the split
does not depend on file order or on which files are combined, and duplicate lines (Brown
has many short ones) always fall on the same side: no validation text is ever in train.
Empty lines are skipped. ``max_samples`` keeps the first N lines of a split, in file order
(for ``mlm-general``: Brown comes first).

Packing (``encode``): lines are tokenised without special tokens and concatenated with
[SEP] between them; the stream is cut into blocks of ``max_seq_length - 2`` tokens, each
wrapped as ``[CLS] block [SEP]``, so every block has exactly ``max_seq_length`` tokens. The
short remainder of each 1,000-line chunk is dropped (as HF's ``run_mlm``), unless it is the
chunk's only block.

Masking. Training: `MlmCollator` masks each batch afresh with
`DataCollatorForLanguageModeling` (15% of non-special tokens; 80% [MASK], 10% random token,
10% unchanged). Evaluation must not depend on the batch order or on the RNG state, so
``encode_eval`` masks each block once, with the same 15% / 80-10-10 rule and a NumPy
generator seeded by ``(eval_seed, block index)``, and stores the corrupted ``input_ids``
and the ``labels`` (original ids at masked positions, -100 elsewhere). Design: one collator
serves both, and a batch whose features already carry ``labels`` is only padded (labels
with -100), never re-masked; batches without ``labels`` (training) are masked dynamically.
So the Trainer's single ``data_collator`` is right for training and evaluation alike.

Metrics: ``preprocess_logits`` turns each batch's vocabulary-size logits into a small
``(batch, 3)`` float tensor: per sequence, the sum of the masked-token cross-entropy, the
number of correct argmax predictions and the number of masked tokens. `score` sums them:
``accuracy`` (masked-token accuracy; the ``main_metric``, higher is better), ``perplexity``
= exp(mean masked-token CE) and ``cross_entropy`` (that mean; lower is better for both).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import EvalSet, Task, register_task
from sparsebert.tasks.datafiles import load_hub, open_text, take

csv.field_size_limit(sys.maxsize)

HELDOUT_EVERY = 50
_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "labels")


@dataclass(frozen=True)
class TextSource:
    """One local text file: ``lines`` (one passage per line), ``tsv`` (a column of a TSV/CSV with
    a header) or ``squad`` (the contexts of a SQuAD-format JSON, minus ``exclude_squad``'s articles)."""

    path: str  # relative to the --data-dir root, or absolute
    format: str = "lines"
    column: str = "text"
    exclude_squad: str | None = None


def is_heldout(text: str, every: int = HELDOUT_EVERY) -> bool:
    """Whether a passage belongs to the held-out (validation) split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % every == 0


def _resolve(path: str, data_dir: str) -> str:
    candidates = [path if os.path.isabs(path) else os.path.join(data_dir, path),
                  os.path.join(data_dir, os.path.basename(path))]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise SparseBertError(
        f"text file '{path}' not found under '{data_dir}' (tried {', '.join(candidates)}); "
        "point --data-dir at the shared data root"
    )


def _format_of(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".tsv", ".csv")):
        return "tsv"
    if name.endswith(".json"):
        return "squad"
    return "lines"


def _read_lines(path: str) -> Iterable[str]:
    with open_text(path) as f:
        yield from f


def _read_column(path: str, column: str) -> Iterable[str]:
    name = path[:-3] if path.endswith(".gz") else path
    delimiter = "," if name.endswith(".csv") else "\t"
    with open_text(path) as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise SparseBertError(f"text file '{path}' is empty")
        header = [h.strip() for h in header]
        if column not in header:
            raise SparseBertError(
                f"'{path}' has no '{column}' column (header: {header}); expected a header row "
                f"naming a '{column}' column with one passage per row"
            )
        index = header.index(column)
        for line_no, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) <= index:
                raise SparseBertError(f"'{path}', line {line_no}: {len(row)} fields, no '{column}' field")
            yield row[index]


def _squad_articles(path: str) -> list[dict]:
    try:
        with open_text(path) as f:
            data = json.load(f)
        return list(data["data"])
    except (json.JSONDecodeError, KeyError, TypeError, OSError) as err:
        raise SparseBertError(f"'{path}' is not SQuAD-format JSON with a 'data' list: {err}") from None


def _read_squad_contexts(path: str, exclude: str | None) -> Iterable[str]:
    banned_titles: set[str] = set()
    banned_contexts: set[str] = set()
    if exclude is not None:
        for article in _squad_articles(exclude):
            banned_titles.add(article.get("title", ""))
            banned_contexts.update(p["context"] for p in article.get("paragraphs", []))
        banned_titles.discard("")
    for article in _squad_articles(path):
        if article.get("title", "") in banned_titles:
            continue
        for p in article.get("paragraphs", []):
            if p["context"] not in banned_contexts:
                yield p["context"]


def read_source(source: TextSource, data_dir: str) -> list[str]:
    """The non-empty passages of one source, whitespace-stripped, in file order."""
    path = _resolve(source.path, data_dir)
    if source.format == "lines":
        raw = _read_lines(path)
    elif source.format == "tsv":
        raw = _read_column(path, source.column)
    elif source.format == "squad":
        exclude = _resolve(source.exclude_squad, data_dir) if source.exclude_squad else None
        raw = _read_squad_contexts(path, exclude)
    else:
        raise SparseBertError(f"unknown text source format '{source.format}' (lines, tsv or squad)")
    return [t for t in (x.strip() for x in raw) if t]


def split_lines(lines: Iterable[str], split: str, every: int = HELDOUT_EVERY) -> list[str]:
    if split == "train":
        return [t for t in lines if not is_heldout(t, every)]
    if split == "validation":
        return [t for t in lines if is_heldout(t, every)]
    raise SparseBertError(f"a masked-LM task has splits train and validation, not '{split}'")


def mask_block(input_ids: list[int], rng: np.random.Generator, special_ids: np.ndarray, mask_id: int,
               vocab_size: int, mlm_probability: float = 0.15) -> tuple[list[int], list[int]]:
    """BERT's corruption of one block: ``mlm_probability`` of the non-special tokens are chosen;
    80% of them become [MASK], 10% a random token, 10% stay. Returns (inputs, labels)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    chosen = (rng.random(ids.shape) < mlm_probability) & ~np.isin(ids, special_ids)
    labels = np.where(chosen, ids, -100)
    r = rng.random(ids.shape)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = rng.integers(0, vocab_size, size=ids.shape)
    out = np.where(to_mask, mask_id, np.where(to_random, random_ids, ids))
    return out.tolist(), labels.tolist()


class MlmCollator:
    """Pads pre-masked evaluation features (those with ``labels``) as they are, and masks
    training features (without ``labels``) with `DataCollatorForLanguageModeling`."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, seed: int | None = None):
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token is None:
            raise SparseBertError("masked-LM needs a tokenizer with a mask token ([MASK])")
        self.tokenizer = tokenizer
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)

    def __call__(self, features):
        features = [{k: f[k] for k in _KEYS if k in f} for f in features]
        with_labels = sum("labels" in f for f in features)
        if with_labels == 0:
            return self.masker(features)
        if with_labels != len(features):
            raise SparseBertError("a masked-LM batch mixes pre-masked (evaluation) and unmasked features")
        labels = [list(f.pop("labels")) for f in features]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        padded = [[-100] * (width - len(x)) + x if left else x + [-100] * (width - len(x)) for x in labels]
        batch["labels"] = torch.tensor(padded, dtype=torch.long)
        return batch


@dataclass(frozen=True)
class MlmTask(Task):
    """Masked-LM on text lines from local sources (or ``data_dir`` itself) or a hub dataset."""

    name: str
    sources: tuple[TextSource, ...] = ()  # under --data-dir; none: read `path`, else --data-dir itself
    path: str | None = None  # a fixed file or folder (`text_mlm_task`)
    hub_name: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str | None] = field(default_factory=lambda: {"train": "train", "validation": None})
    text_column: str = "text"
    heldout_every: int = HELDOUT_EVERY
    mlm_probability: float = 0.15
    eval_seed: int = 1234
    labels: tuple[str, ...] | None = None
    kind: str = "masked-lm"
    main_metric: str = "accuracy"

    # -- data -------------------------------------------------------------------------------------
    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        import datasets

        if split not in ("train", "validation"):
            raise SparseBertError(f"{self.name} has splits train and validation, not '{split}'")
        local = self.path or data_dir
        lines = self._local_lines(local, split) if local else self._hub_lines(split)
        if not lines:
            raise SparseBertError(f"{self.name} '{split}' has no text")
        return take(datasets.Dataset.from_dict({"text": lines}), max_samples)

    def _local_lines(self, data_dir: str, split: str) -> list[str]:
        if self.sources and not self.path:
            if not os.path.isdir(data_dir):
                raise SparseBertError(f"data directory '{data_dir}' does not exist")
            lines = [t for s in self.sources for t in read_source(s, data_dir)]
        else:
            lines = read_path(self.path or data_dir, self.text_column)
        return split_lines(lines, split, self.heldout_every)

    def _hub_lines(self, split: str) -> list[str]:
        if self.hub_name is None:
            where = ", ".join(s.path for s in self.sources) or "a text file or folder"
            raise SparseBertError(
                f"{self.name} reads local text ({where}): pass --data-dir (the shared data root, or "
                "the file/folder for mlm-text)"
            )
        hub_split = self.hub_splits.get(split)
        ds = load_hub(self.name, self.hub_name, hub_split or "train", self.hub_config)
        if self.text_column not in ds.column_names:
            raise SparseBertError(
                f"hub dataset '{self.hub_name}' has no '{self.text_column}' column "
                f"(columns: {ds.column_names})"
            )
        lines = [t for t in (x.strip() for x in ds[self.text_column]) if t]
        return lines if hub_split else split_lines(lines, split, self.heldout_every)

    def encode(self, ds, tokenizer, max_seq_length: int):
        return pack(ds, tokenizer, max_seq_length, name=self.name)

    def encode_eval(self, ds, tokenizer, max_seq_length: int):
        packed = pack(ds, tokenizer, max_seq_length, name=self.name)
        return mask_eval(packed, tokenizer, self.eval_seed, self.mlm_probability)

    def collator(self, tokenizer):
        return MlmCollator(tokenizer, mlm_probability=self.mlm_probability)

    # -- evaluation -------------------------------------------------------------------------------
    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet("validation", "validation")]

    def preprocess_logits(self, logits, labels):
        return masked_lm_sums(logits, labels)

    def metrics(self, predictions, label_ids, eval_set: EvalSet) -> dict[str, float]:
        return self.score(eval_set, predictions, label_ids)

    def score(self, eval_set, predictions, label_ids, features=None, examples=None) -> dict[str, float]:
        p = predictions[0] if isinstance(predictions, tuple) else predictions
        p = np.asarray(p)
        labels = np.asarray(label_ids)
        if p.ndim == 3:  # raw logits (no preprocess_logits): the same sums, here
            p = masked_lm_sums(torch.from_numpy(p), torch.from_numpy(labels)).numpy()
        if p.ndim == 2 and np.issubdtype(p.dtype, np.floating) and p.shape[1] == 3:
            ce, correct, count = p.astype(np.float64).sum(0)
        elif p.shape == labels.shape:  # argmax ids only: no cross-entropy
            keep = labels != -100
            count, correct, ce = float(keep.sum()), float((p[keep] == labels[keep]).sum()), float("nan")
        else:
            raise SparseBertError(f"masked-LM predictions of shape {p.shape} are neither sums nor token ids")
        if count == 0:
            raise SparseBertError(f"{self.name} '{eval_set.name}' has no masked tokens to score")
        mean_ce = ce / count
        return {"accuracy": correct / count, "perplexity": float(np.exp(mean_ce)), "cross_entropy": mean_ce}


def read_path(path: str, text_column: str = "text") -> list[str]:
    """Passages of a file, or of every file of a folder (sorted by name)."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if not f.startswith("."))
        files = [os.path.join(path, f) for f in names if os.path.isfile(os.path.join(path, f))]
    else:
        raise SparseBertError(
            f"text path '{path}' does not exist; give a text file or a folder of text files"
        )
    if not files:
        raise SparseBertError(f"folder '{path}' holds no text files")
    lines: list[str] = []
    for f in files:
        lines.extend(read_source(TextSource(f, _format_of(f), text_column), os.path.dirname(f)))
    return lines


def pack(ds, tokenizer, max_seq_length: int, name: str = "mlm", chunk_lines: int = 1000):
    """Packed ``[CLS] ... [SEP]`` blocks of exactly ``max_seq_length`` tokens (+ ``length``)."""
    if max_seq_length < 8:
        raise SparseBertError(f"max sequence length {max_seq_length} is too short for masked-LM blocks")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise SparseBertError("masked-LM packing needs a tokenizer with [CLS] and [SEP] tokens")
    body = max_seq_length - 2

    def fn(batch):
        stream: list[int] = []
        for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            if ids:
                stream.extend(ids)
                stream.append(sep_id)
        blocks = [stream[i : i + body] for i in range(0, len(stream), body)]
        if len(blocks) > 1 and len(blocks[-1]) < body:
            blocks.pop()
        input_ids = [[cls_id, *b, sep_id] for b in blocks]
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(x) for x in input_ids],
            "length": [len(x) for x in input_ids],
        }

    return ds.map(fn, batched=True, batch_size=chunk_lines, remove_columns=ds.column_names,
                  desc=f"packing {name}")


def mask_eval(packed, tokenizer, seed: int, mlm_probability: float = 0.15):
    """Mask every block once, deterministically (seed, block index) -> ``input_ids``, ``labels``."""
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    mask_id, vocab = tokenizer.mask_token_id, len(tokenizer)
    if mask_id is None:
        raise SparseBertError("masked-LM needs a tokenizer with a mask token ([MASK])")

    def fn(batch, indices):
        out_ids, out_labels = [], []
        for ids, idx in zip(batch["input_ids"], indices, strict=True):
            rng = np.random.default_rng([seed, idx])
            masked, labels = mask_block(ids, rng, special, mask_id, vocab, mlm_probability)
            out_ids.append(masked)
            out_labels.append(labels)
        return {"input_ids": out_ids, "labels": out_labels}

    return packed.map(fn, batched=True, with_indices=True, desc="masking (fixed seed)")


def masked_lm_sums(logits, labels) -> torch.Tensor:
    """Per sequence: [sum of masked-token CE, correct argmax count, masked count] (float32)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if labels is None:
        raise SparseBertError("masked-LM evaluation needs labels (pre-masked features from encode_eval)")
    keep = labels != -100
    rows = keep.nonzero(as_tuple=True)[0]
    selected = logits[keep].float()
    target = labels[keep]
    ce = torch.nn.functional.cross_entropy(selected, target, reduction="none")
    correct = (selected.argmax(-1) == target).float()
    out = torch.zeros(labels.shape[0], 3, dtype=torch.float32, device=logits.device)
    out[:, 0].index_add_(0, rows, ce)
    out[:, 1].index_add_(0, rows, correct)
    out[:, 2] = keep.sum(-1).float()
    return out


def text_mlm_task(name: str, source: str, text_column: str = "text", hub_config: str | None = None,
                  hub_validation_split: str | None = "validation", register: bool = True) -> MlmTask:
    """A masked-LM task over ``source``: an existing file or folder (read like ``mlm-text``, whatever
    ``--data-dir`` says), or else a hub dataset name (``hub_config``; its ``hub_validation_split``
    if given, else the held-out rule on its train split). Registered under ``name`` unless
    ``register=False``."""
    if os.path.exists(source):
        task = MlmTask(name, path=os.path.abspath(source), text_column=text_column)
    else:
        task = MlmTask(name, hub_name=source, hub_config=hub_config, text_column=text_column,
                       hub_splits={"train": "train", "validation": hub_validation_split})
    return register_task(task) if register else task


_SQUAD_DIR = "squad_v1.1"
MLM_TASKS: dict[str, MlmTask] = {
    t.name: t
    for t in (
        MlmTask("mlm-general", sources=(
            TextSource("general_english_nltk/brown_untagged_sentences.txt.gz"),
            TextSource(f"{_SQUAD_DIR}/squad_v1.1_train_from_explorer_html.json.gz", "squad",
                       exclude_squad=f"{_SQUAD_DIR}/squad_v1.1_dev_from_explorer_html.json"),
        )),
        MlmTask("mlm-pubmed", sources=(
            TextSource("pubmed_text/pubmed_unlabeled_derived.tsv.gz", "tsv", "text"),
        )),
        MlmTask("mlm-text"),
    )
}
for _task in MLM_TASKS.values():
    register_task(_task, aliases=(_task.name.replace("-", "_"),))

__all__ = [
    "MLM_TASKS", "MlmCollator", "MlmTask", "TextSource", "is_heldout", "mask_block", "mask_eval",
    "masked_lm_sums", "pack", "read_path", "split_lines", "text_mlm_task",
]
