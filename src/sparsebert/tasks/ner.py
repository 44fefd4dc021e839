"""Biomedical named-entity recognition: CoNLL-style ``token<TAB>tag`` files, entity-level F1.

Data format: one token per line, ``token<TAB>tag`` (a space also separates, CoNLL style; the
tag is the last field), a blank line between sentences; ``-DOCSTART-`` lines, if any, end a
sentence and are skipped; a missing final blank line is fine. Splits are ``train.tsv``,
``devel.tsv`` (= validation; ``dev.tsv`` is accepted too) and ``test.tsv`` in the task's
folder under ``--data-dir`` (Crichton et al. 2017's copies, BioBERT's split):

- ``bc5cdr_chem`` (``bc5cdr_chem/``): B/I-Chemical; 4,560 / 4,581 / 4,797 sentences;
- ``bc5cdr_disease`` (``bc5cdr_disease/``): B/I-Disease; same sentences;
- ``bc5cdr`` (``bc5cdr/``): both types; same sentences;
- ``ncbi_disease`` (``ncbi_disease/``): B/I-Disease; 5,424 / 923 / 940;
- ``bc2gm`` (``bc2gm_biobert/``, BioBERT's copy): **bare** ``B``/``I`` tags (gene mention, no
  type); 12,574 / 2,519 / 5,038. Kept as the label names; seqeval sees them as ``B-GENE``/``I-GENE``.

Each task's tag set is fixed here (``O`` first, then the sorted B-/I- tags), not read from
the data, so the head's label space never depends on a file; a tag outside it is an error
naming the file and line. Hub copies (``ncbi_disease``, ``tner/bc5cdr``,
``spyysalo/bc2gm_corpus``; columns ``tokens`` and ``ner_tags`` or ``tags``) are mapped onto the same tag set
(``B-GENE`` -> ``B``; the other entity type of BC5CDR -> ``O`` for the one-type tasks).

Encoding: words are tokenised with ``is_split_into_words=True``; a word's tag goes on its first
sub-token, ``-100`` on the other sub-tokens and on special tokens. Words past
``max_seq_length`` are cut. Evaluation features also keep ``word_index`` (the word of each
labelled position), so `score` rebuilds each sentence's word-level tag sequence: the gold
tags of the *whole* sentence from the raw examples and the predicted tag of each word's
first sub-token, ``O`` for words lost to truncation (they count as missed entities, never
silently dropped). Metric: seqeval's entity-level precision / recall / F1 (default,
conlleval-style mode), plus token accuracy over words; ``main_metric`` is ``f1``. The test
split is a second, optional evaluation set (its labels are public, and it is what BioBERT
and BLURB report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import EvalSet, Task, register_task
from sparsebert.tasks.datafiles import check_split, load_hub, open_text, split_path, take

SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.tsv", "train.txt"),
    "validation": ("devel.tsv", "dev.tsv", "devel.txt", "dev.txt"),
    "test": ("test.tsv", "test.txt"),
}


def tag_set(*types: str) -> tuple[str, ...]:
    """``O`` then the sorted B-/I- tags of ``types``; no types: bare ``B``/``I`` tags."""
    if not types:
        return ("O", "B", "I")
    return ("O", *sorted(f"{p}-{t}" for t in types for p in "BI"))


@dataclass(frozen=True)
class NerTask(Task):
    """A CoNLL-format NER task with a fixed tag set."""

    name: str
    labels: tuple[str, ...]
    folders: tuple[str, ...]
    hub_name: str | None = None
    hub_config: str | None = None
    hub_tag_names: tuple[str, ...] | None = None  # names of integer hub tags without ClassLabel names
    kind: str = "token-classification"
    main_metric: str = "f1"

    # -- data -------------------------------------------------------------------------------------
    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        import datasets

        check_split(self.name, split, SPLIT_FILES)
        if data_dir:
            cols = read_conll(split_path(self.name, split, data_dir, self.folders, SPLIT_FILES), self.labels)
        else:
            cols = self._load_hub(split)
        if not cols["tokens"]:
            raise SparseBertError(f"{self.name} '{split}' has no sentences")
        return take(datasets.Dataset.from_dict(cols), max_samples)

    def _load_hub(self, split: str) -> dict[str, list]:
        ds = load_hub(self.name, self.hub_name, split, self.hub_config)
        tag_col = next((c for c in ("ner_tags", "tags") if c in ds.column_names), None)
        if "tokens" not in ds.column_names or tag_col is None:
            raise SparseBertError(
                f"hub dataset '{self.hub_name}' has no tokens and ner_tags (or tags) columns "
                f"(columns: {ds.column_names})"
            )
        feature = getattr(ds.features[tag_col], "feature", None)
        names = getattr(feature, "names", None) or self.hub_tag_names
        if names is None:
            raise SparseBertError(f"hub dataset '{self.hub_name}' does not name its integer tags")
        lookup = [self._hub_tag(n) for n in names]
        return {"tokens": ds["tokens"][:], "ner_tags": [[lookup[t] for t in s] for s in ds[tag_col][:]]}

    def _hub_tag(self, name: str) -> int:
        if name in self.labels:
            return self.labels.index(name)
        if name[:2] in ("B-", "I-"):
            if name[0] in self.labels:  # bare B/I task, typed hub tags
                return self.labels.index(name[0])
            return 0  # an entity type this task does not tag (BC5CDR chemical-only / disease-only)
        raise SparseBertError(f"hub tag '{name}' of '{self.hub_name}' maps to none of {list(self.labels)}")

    def encode(self, ds, tokenizer, max_seq_length: int):
        return encode_ner(ds, tokenizer, max_seq_length, keep_word_index=False, name=self.name)

    def encode_eval(self, ds, tokenizer, max_seq_length: int):
        return encode_ner(ds, tokenizer, max_seq_length, keep_word_index=True, name=self.name)

    # -- evaluation -------------------------------------------------------------------------------
    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet("validation", "validation"), EvalSet("test", "test", optional=True)]

    def metrics(self, predictions, label_ids, eval_set: EvalSet) -> dict[str, float]:
        """Entity-level metrics from per-token predicted ids (no word map: first sub-tokens only)."""
        gold, pred = sequences_from_labels(np.asarray(predictions), np.asarray(label_ids), self.labels)
        return ner_metrics(gold, pred)

    def score(self, eval_set, predictions, label_ids, features=None, examples=None) -> dict[str, float]:
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        logits = np.asarray(logits)
        ids = logits.argmax(-1) if logits.ndim == 3 else logits
        label_ids = np.asarray(label_ids)
        if features is not None and examples is not None and "word_index" in features.column_names:
            gold, pred = sequences_from_words(
                ids, label_ids, features["word_index"][:], examples["ner_tags"][:], self.labels
            )
        else:
            gold, pred = sequences_from_labels(ids, label_ids, self.labels)
        return ner_metrics(gold, pred)


def read_conll(path: str, labels: tuple[str, ...]) -> dict[str, list]:
    """Sentences of a ``token<TAB>tag`` file as ``tokens`` (words) and ``ner_tags`` (label ids)."""
    index = {t: i for i, t in enumerate(labels)}
    tokens: list[list[str]] = []
    tags: list[list[int]] = []
    words: list[str] = []
    ids: list[int] = []

    def flush():
        if words:
            tokens.append(list(words))
            tags.append(list(ids))
            words.clear()
            ids.clear()

    with open_text(path) as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            if line.startswith("-DOCSTART-"):
                flush()
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2 or not parts[0]:
                raise SparseBertError(
                    f"{path}, line {line_no}: expected 'token<TAB>tag', got {line[:60]!r}; "
                    "a CoNLL NER file has one token and its tag per line, sentences separated by blank lines"
                )
            tag = parts[-1].strip()
            if tag not in index:
                raise SparseBertError(
                    f"{path}, line {line_no}: tag '{tag}' is not one of this task's tags {list(labels)}; "
                    "check that the file belongs to this task (e.g. chemical tags in a disease task)"
                )
            words.append(parts[0])
            ids.append(index[tag])
    flush()
    return {"tokens": tokens, "ner_tags": tags}


def align_labels(word_ids: list[int | None], word_tags: list[int]) -> tuple[list[int], list[int]]:
    """Per sub-token labels (the word's tag on its first sub-token, -100 elsewhere) and the word
    index of each labelled position."""
    labels, words = [], []
    previous = None
    for w in word_ids:
        if w is None or w == previous:
            labels.append(-100)
        else:
            labels.append(word_tags[w])
            words.append(w)
        previous = w
    return labels, words


def encode_ner(ds, tokenizer, max_seq_length: int, keep_word_index: bool, name: str = "ner"):
    """Tokenise pre-split words and align the tags to first sub-tokens (+ ``length``)."""
    if not getattr(tokenizer, "is_fast", False):
        raise SparseBertError(
            "token classification needs a fast tokenizer (word_ids); load it with use_fast=True"
        )

    def fn(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_seq_length)
        all_labels, all_words = [], []
        for i, tags in enumerate(batch["ner_tags"]):
            labels, words = align_labels(enc.word_ids(i), tags)
            all_labels.append(labels)
            all_words.append(words)
        enc["labels"] = all_labels
        if keep_word_index:
            enc["word_index"] = all_words
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"tokenising {name}")


def sequences_from_labels(ids: np.ndarray, label_ids: np.ndarray, names: tuple[str, ...]):
    """Word-level gold/predicted tag sequences from the labelled (first sub-token) positions."""
    gold, pred = [], []
    for p_row, l_row in zip(ids, label_ids, strict=True):
        keep = l_row != -100
        gold.append([names[int(t)] for t in l_row[keep]])
        pred.append([names[int(t)] for t in p_row[keep]])
    return gold, pred


def sequences_from_words(ids, label_ids, word_index, example_tags, names: tuple[str, ...]):
    """Whole-sentence gold tags, predictions on each word's first sub-token, ``O`` for cut words."""
    if len(word_index) != len(example_tags) or len(word_index) != len(label_ids):
        raise SparseBertError(
            f"NER scoring got {len(label_ids)} predictions, {len(word_index)} features and "
            f"{len(example_tags)} examples; pass the features and examples of the same evaluation set"
        )
    gold, pred = [], []
    for p_row, l_row, words, tags in zip(ids, label_ids, word_index, example_tags, strict=True):
        positions = np.nonzero(l_row != -100)[0]
        if len(positions) != len(words):
            raise SparseBertError("NER features and predictions disagree on the labelled positions")
        g = [names[int(t)] for t in tags]
        p = ["O"] * len(g)
        for pos, w in zip(positions, words, strict=True):
            p[w] = names[int(p_row[pos])]
        gold.append(g)
        pred.append(p)
    return gold, pred


def _seqeval_tag(tag: str) -> str:
    return f"{tag}-GENE" if tag in ("B", "I") else tag


def ner_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """seqeval entity-level precision/recall/F1 (default mode) and word accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    gold = [[_seqeval_tag(t) for t in s] for s in gold]
    pred = [[_seqeval_tag(t) for t in s] for s in pred]
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)),
    }


_BC5CDR_HUB_TAGS = ("O", "B-Chemical", "B-Disease", "I-Disease", "I-Chemical")  # tner/bc5cdr label2id

NER_TASKS: dict[str, NerTask] = {
    t.name: t
    for t in (
        NerTask("bc5cdr_chem", tag_set("Chemical"), ("bc5cdr_chem", "BC5CDR-chem-IOB", "BC5CDR-chem"),
                hub_name="tner/bc5cdr", hub_tag_names=_BC5CDR_HUB_TAGS),
        NerTask("bc5cdr_disease", tag_set("Disease"),
                ("bc5cdr_disease", "BC5CDR-disease-IOB", "BC5CDR-disease"),
                hub_name="tner/bc5cdr", hub_tag_names=_BC5CDR_HUB_TAGS),
        NerTask("bc5cdr", tag_set("Chemical", "Disease"), ("bc5cdr", "BC5CDR-IOB", "BC5CDR"),
                hub_name="tner/bc5cdr", hub_tag_names=_BC5CDR_HUB_TAGS),
        NerTask("ncbi_disease", tag_set("Disease"), ("ncbi_disease", "NCBI-disease-IOB", "NCBI-disease"),
                hub_name="ncbi_disease"),
        NerTask("bc2gm", tag_set(), ("bc2gm_biobert", "BC2GM", "bc2gm"), hub_name="spyysalo/bc2gm_corpus"),
    )
}
_ALIASES = {
    "bc5cdr_chem": ("bc5cdr-chem",),
    "bc5cdr_disease": ("bc5cdr-disease",),
    "ncbi_disease": ("ncbi-disease",),
    "bc2gm": ("bc2gm_biobert",),
}
for _task in NER_TASKS.values():
    register_task(_task, aliases=_ALIASES.get(_task.name, ()))

__all__ = ["NER_TASKS", "NerTask", "align_labels", "encode_ner", "ner_metrics", "read_conll", "tag_set"]
