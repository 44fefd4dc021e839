"""The official SQuAD v1.1 exact-match and F1, written from the definition in the official
evaluation script (``evaluate-v1.1.py``), so that no metric script is fetched from the hub.

- ``normalize_answer``: lower case, drop ASCII punctuation (``string.punctuation``), drop the
  articles ``a``/``an``/``the`` (whole words), collapse whitespace;
- exact match: the normalised strings are equal;
- F1: bag-of-tokens overlap of the normalised, whitespace-split strings (0 when nothing is shared);
- per question the maximum over its ground-truth answers; averaged over questions and x100.
  A question with no prediction scores 0 (the official script counts it and says so).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths: Iterable[str]) -> float:
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def squad_v1_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """``{"exact_match", "f1"}`` (x100) of ``predictions`` (question id -> answer text) against
    ``references`` (question id -> its ground-truth answer texts)."""
    total = exact = f1 = 0.0
    for qid, truths in references.items():
        total += 1
        if qid not in predictions:
            continue  # unanswered: 0, as in the official script
        exact += metric_max_over_ground_truths(exact_match_score, predictions[qid], truths)
        f1 += metric_max_over_ground_truths(f1_score, predictions[qid], truths)
    if total == 0:
        return {"exact_match": 0.0, "f1": 0.0}
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


__all__ = ["exact_match_score", "f1_score", "normalize_answer", "squad_v1_scores"]
