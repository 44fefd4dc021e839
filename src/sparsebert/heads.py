"""The task head, defined once: which modules sit on top of the encoder, and whether a
checkpoint has a trained head of a given kind.

Three places used to answer this each their own way (the ``classifier`` target preset,
which weights train beside learned masks, and where an MLM head is found). Every
architecture sparsebert supports names its heads with one of the prefixes below:

- task heads: ``classifier`` (BERT, DistilBERT, DeBERTa, ModernBERT; ``classifier.dense`` /
  ``classifier.out_proj`` for RoBERTa, XLM-RoBERTa and ELECTRA), ``pre_classifier``
  (DistilBERT), ``qa_outputs`` (question answering), ``score``, ``head`` (ModernBERT's
  prediction head in front of its classifier); the pooler in front of the [CLS]
  classifier (``bert.pooler``, DeBERTa's ``pooler``) only serves that head;
- masked-LM heads: ``cls.predictions`` (BERT), ``lm_head`` (RoBERTa, XLM-RoBERTa),
  ``generator_lm_head`` / ``generator_predictions`` (ELECTRA), ``vocab_transform`` /
  ``vocab_layer_norm`` / ``vocab_projector`` (DistilBERT), ``decoder`` (ModernBERT).
"""

from __future__ import annotations

import re
from typing import Any

TASK_HEAD_PREFIXES = ("classifier", "pre_classifier", "qa_outputs", "score", "head")
POOLER = re.compile(r"(^|\.)pooler\.")
MLM_HEAD_PREFIXES = (
    "cls.predictions", "lm_head", "generator_lm_head", "generator_predictions",
    "vocab_transform", "vocab_layer_norm", "vocab_projector", "decoder",
)

# What `config.architectures` ends with for a checkpoint fine-tuned for each kind of task.
ARCHITECTURE_SUFFIXES = {
    "sequence-classification": ("ForSequenceClassification",),
    "token-classification": ("ForTokenClassification",),
    "question-answering": ("ForQuestionAnswering",),
    "masked-lm": ("ForMaskedLM", "ForPreTraining"),
}


def _bare(name: str) -> str:
    """A parameter or module name without a DDP/compile wrapper prefix."""
    for wrapper in ("module.", "_orig_mod."):
        if name.startswith(wrapper):
            name = name[len(wrapper):]
    return name


def _starts_with(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_task_head(name: str, with_pooler: bool = True) -> bool:
    """Whether a parameter or module name belongs to the task head (and, with
    ``with_pooler``, the pooler that only feeds it)."""
    bare = _bare(name)
    return _starts_with(bare, TASK_HEAD_PREFIXES) or (with_pooler and bool(POOLER.search(bare + ".")))


def is_mlm_head(name: str) -> bool:
    """Whether a parameter or module name belongs to a masked-LM head."""
    return _starts_with(_bare(name), MLM_HEAD_PREFIXES)


def is_head(name: str) -> bool:
    """Task head, pooler or MLM head: everything that is not the encoder body."""
    return is_task_head(name) or is_mlm_head(name)


def is_finetuned(config: Any, kind: str) -> bool:
    """Whether a checkpoint's config says it was saved with a trained head of ``kind``
    (``sequence-classification``, ``token-classification``, ``question-answering``,
    ``masked-lm``); a bare encoder (``BertModel``) or another task's model is not."""
    suffixes = ARCHITECTURE_SUFFIXES.get(kind)
    if suffixes is None:
        raise ValueError(f"unknown model kind '{kind}': one of {', '.join(ARCHITECTURE_SUFFIXES)}")
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(suffixes) for a in archs)


__all__ = [
    "ARCHITECTURE_SUFFIXES",
    "MLM_HEAD_PREFIXES",
    "TASK_HEAD_PREFIXES",
    "is_finetuned",
    "is_head",
    "is_mlm_head",
    "is_task_head",
]
