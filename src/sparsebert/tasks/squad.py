"""SQuAD v1.1 extractive question answering: sliding-window features, n-best span
post-processing and the official EM/F1 (`squad_metric`).

Data: SQuAD-format JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}]}]}]}]}``), plain or gzipped, flattened to
the hub's columns ``id, title, context, question, answers{text, answer_start}``. Local files
(folder ``squad_v1.1/`` or ``squad/`` under ``--data-dir``): train =
``squad_v1.1_train_from_explorer_html.json.gz`` or the official ``train-v1.1.json``;
validation = ``squad_v1.1_dev_from_explorer_html.json`` or ``dev-v1.1.json``. Without
``--data-dir`` the hub dataset ``squad`` is loaded.

Quirks of the shared copy (rebuilt from the SQuAD-explorer pages; counts match the official
release, 87,599 / 10,570 questions): question ids are synthetic (``dev-AAA-PPP-QQ``), so
official prediction files cannot be joined by id; train ``answer_start`` is the *first*
occurrence of the answer text, wrong for some of the ~10.8% of answers that occur more
than once (the training target is then another occurrence of the same text; nothing here
can repair it); dev questions carry 1-6 reference answers (EM/F1 take the max over them,
unaffected). Questions without answers (SQuAD 2.0) are an error: this is the v1.1 task.

Encoding (as BERT's and HF's ``run_qa``): ``question [SEP] context`` with ``only_second``
truncation, ``return_overflowing_tokens`` windows of ``max_seq_length`` with ``doc_stride``
(128) overlap; questions longer than 64 tokens (or half the window) are cut to keep room for
the context. The stride is lowered to ``max_seq_length // 4`` when it would not fit (e.g. a
short proxy window). Train features carry ``start_positions`` / ``end_positions`` of the
first answer, the [CLS] index when the answer is not wholly inside the window. Evaluation
features keep ``example_id`` and ``offset_mapping`` (``None`` outside the context).
`score` takes, over all windows of a question, the best valid span among the 20 best start
and 20 best end logits (end >= start, at most 30 tokens, both inside the context), scored by
start + end logit, and reports the official ``exact_match`` / ``f1`` (main metric ``f1``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import EvalSet, Task, register_task
from sparsebert.tasks.datafiles import check_split, load_hub, open_text, split_path, take
from sparsebert.tasks.squad_metric import squad_v1_scores

logger = logging.getLogger(__name__)

SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("squad_v1.1_train_from_explorer_html.json.gz", "train-v1.1.json", "train-v1.1.json.gz"),
    "validation": ("squad_v1.1_dev_from_explorer_html.json", "dev-v1.1.json", "dev-v1.1.json.gz"),
}


@dataclass(frozen=True)
class SquadTask(Task):
    name: str = "squad"
    labels: tuple[str, ...] | None = None
    folders: tuple[str, ...] = ("squad_v1.1", "squad", "SQuAD")
    hub_name: str | None = "squad"
    doc_stride: int = 128
    max_query_length: int = 64
    n_best: int = 20
    max_answer_length: int = 30
    kind: str = "question-answering"
    main_metric: str = "f1"

    @property
    def num_labels(self) -> int:
        return 2  # the QA head's start and end logits (BertForQuestionAnswering needs num_labels=2)

    # -- data -------------------------------------------------------------------------------------
    def load_split(self, split: str, data_dir: str | None, max_samples: int | None = None):
        import datasets

        check_split(self.name, split, SPLIT_FILES)
        if data_dir:
            path = split_path(self.name, split, data_dir, self.folders, SPLIT_FILES)
            ds = datasets.Dataset.from_dict(read_squad_json(path))
        else:
            ds = load_hub(self.name, self.hub_name, split)
            for col in ("id", "context", "question", "answers"):
                if col not in ds.column_names:
                    raise SparseBertError(
                        f"hub dataset '{self.hub_name}' has no '{col}' column (columns: {ds.column_names}); "
                        "expected SQuAD's id/context/question/answers"
                    )
        return take(ds, max_samples)

    def _stride(self, max_seq_length: int) -> int:
        if self.doc_stride < max_seq_length // 2:
            return self.doc_stride
        stride = max(max_seq_length // 4, 1)
        logger.warning("doc stride %d does not fit max_seq_length %d; using %d", self.doc_stride,
                       max_seq_length, stride)
        return stride

    def _tokenize(self, batch, tokenizer, max_seq_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise SparseBertError(
                "question answering needs a fast tokenizer (offsets); load it with use_fast=True"
            )
        max_query = min(self.max_query_length, max_seq_length // 2)
        questions = cap_questions([q.lstrip() for q in batch["question"]], tokenizer, max_query)
        return tokenizer(
            questions,
            batch["context"],
            truncation="only_second",
            max_length=max_seq_length,
            stride=self._stride(max_seq_length),
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )

    def encode(self, ds, tokenizer, max_seq_length: int):
        def fn(batch):
            enc = self._tokenize(batch, tokenizer, max_seq_length)
            sample_map = enc.pop("overflow_to_sample_mapping")
            offsets_all = enc.pop("offset_mapping")
            starts, ends = [], []
            for i, offsets in enumerate(offsets_all):
                cls_index = enc["input_ids"][i].index(tokenizer.cls_token_id)
                answers = batch["answers"][sample_map[i]]
                start, end = answer_positions(enc.sequence_ids(i), offsets, answers, cls_index)
                starts.append(start)
                ends.append(end)
            enc["start_positions"] = starts
            enc["end_positions"] = ends
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"tokenising {self.name}")

    def encode_eval(self, ds, tokenizer, max_seq_length: int):
        def fn(batch):
            enc = self._tokenize(batch, tokenizer, max_seq_length)
            sample_map = enc.pop("overflow_to_sample_mapping")
            enc["example_id"] = [batch["id"][s] for s in sample_map]
            enc["offset_mapping"] = [
                [o if sid == 1 else None for o, sid in zip(offsets, enc.sequence_ids(i), strict=True)]
                for i, offsets in enumerate(enc["offset_mapping"])
            ]
            return enc

        return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"tokenising {self.name} (eval)")

    # -- evaluation -------------------------------------------------------------------------------
    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet("validation", "validation")]

    def score(self, eval_set, predictions, label_ids, features=None, examples=None) -> dict[str, float]:
        if features is None or examples is None:
            raise SparseBertError(
                "SQuAD scoring needs the evaluation features and raw examples (span post-processing)"
            )
        start_logits, end_logits = predictions[0], predictions[1]
        texts = postprocess_spans(
            examples, features, np.asarray(start_logits), np.asarray(end_logits),
            n_best=self.n_best, max_answer_length=self.max_answer_length,
        )
        references = {
            qid: list(a["text"]) for qid, a in zip(examples["id"][:], examples["answers"][:], strict=True)
        }
        return squad_v1_scores(texts, references)


def read_squad_json(path: str) -> dict[str, list]:
    """A SQuAD-format JSON file (plain or .gz) flattened to the hub's columns."""
    try:
        with open_text(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise SparseBertError(f"'{path}' is not readable SQuAD JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise SparseBertError(f"'{path}' has no top-level 'data' list; expected SQuAD v1.1 JSON")
    cols: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    seen: set[str] = set()
    for article in data["data"]:
        title = article.get("title", "")
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                qid = str(qa["id"])
                answers = qa.get("answers") or []
                if not answers:
                    raise SparseBertError(
                        f"'{path}': question '{qid}' has no answers; this is the SQuAD v1.1 task "
                        "(every question answerable), not SQuAD 2.0"
                    )
                if qid in seen:
                    raise SparseBertError(f"'{path}': question id '{qid}' occurs twice; ids must be unique")
                seen.add(qid)
                cols["id"].append(qid)
                cols["title"].append(title)
                cols["context"].append(context)
                cols["question"].append(qa["question"])
                cols["answers"].append({
                    "text": [a["text"] for a in answers],
                    "answer_start": [int(a["answer_start"]) for a in answers],
                })
    if not cols["id"]:
        raise SparseBertError(f"'{path}' holds no questions")
    return cols


def cap_questions(questions: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Cut questions longer than ``max_tokens`` sub-tokens at that token's character end."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"], strict=True):
        out.append(q[: offsets[max_tokens - 1][1]] if len(ids) > max_tokens else q)
    return out


def answer_positions(sequence_ids, offsets, answers, cls_index: int) -> tuple[int, int]:
    """Token start/end of the first answer in one window, or (cls, cls) when it is not inside."""
    if not answers["answer_start"]:
        return cls_index, cls_index
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    ctx_start = sequence_ids.index(1)
    ctx_end = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    if offsets[ctx_start][0] > start_char or offsets[ctx_end][1] < end_char:
        return cls_index, cls_index
    start = ctx_start
    while start <= ctx_end and offsets[start][0] <= start_char:
        start += 1
    end = ctx_end
    while end >= ctx_start and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def postprocess_spans(
    examples, features, start_logits: np.ndarray, end_logits: np.ndarray,
    n_best: int = 20, max_answer_length: int = 30,
) -> dict[str, str]:
    """Question id -> best answer text over all of its windows ("" when no window has a valid span)."""
    if len(start_logits) != len(features):
        raise SparseBertError(
            f"SQuAD post-processing got logits for {len(start_logits)} features but "
            f"{len(features)} features; pass the features the predictions were made on"
        )
    by_example: dict[str, list[int]] = defaultdict(list)
    for i, qid in enumerate(features["example_id"][:]):  # [:]: a list (datasets >= 4 returns a lazy Column)
        by_example[qid].append(i)
    offset_mapping = features["offset_mapping"][:]
    answers: dict[str, str] = {}
    for qid, context in zip(examples["id"][:], examples["context"][:], strict=True):
        best_score, best_text = -np.inf, ""
        for fi in by_example.get(qid, []):
            offsets = offset_mapping[fi]
            n = len(offsets)
            s, e = start_logits[fi][:n], end_logits[fi][:n]
            starts = np.argsort(s)[::-1][:n_best]
            ends = np.argsort(e)[::-1][:n_best]
            in_context = np.array([o is not None for o in offsets])
            length = ends[None, :] - starts[:, None] + 1
            valid = in_context[starts][:, None] & in_context[ends][None, :] & (length >= 1)
            valid &= length <= max_answer_length
            if not valid.any():
                continue
            scores = np.where(valid, s[starts][:, None] + e[ends][None, :], -np.inf)
            a, b = np.unravel_index(int(np.argmax(scores)), scores.shape)
            if scores[a, b] > best_score:
                best_score = float(scores[a, b])
                best_text = context[offsets[starts[a]][0] : offsets[ends[b]][1]]
        answers[qid] = best_text
    return answers


SQUAD = register_task(SquadTask(), aliases=("squad_v1.1", "squad-v1.1", "squad1.1"))

__all__ = ["SQUAD", "SquadTask", "answer_positions", "postprocess_spans", "read_squad_json"]
