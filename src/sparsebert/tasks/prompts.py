"""Prompt templates and label words: classifying GLUE tasks with a masked-LM head (SMP).

The label is read from the MLM logits of one label word per class at the [MASK] position
("<sentence> It was [MASK]." -> great / terrible), so a pretrained MLM head classifies and no
new head has to be learned. Templates and words follow the SMP reference (kongds/SMP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sparsebert.errors import SparseBertError
from sparsebert.tasks.base import Task


@dataclass(frozen=True)
class Prompt:
    """``template`` with {a}, {b} (the texts) and {mask}; ``words[i]`` is class i's label word."""

    template: str
    words: tuple[str, ...]


PROMPTS: dict[str, Prompt] = {
    "sst2": Prompt("{a} It was {mask} .", ("terrible", "great")),
    "cola": Prompt("{a} This is {mask} .", ("incorrect", "correct")),
    "mnli": Prompt("{a} ? {mask} , {b}", ("Yes", "Maybe", "No")),
    "qnli": Prompt("{a} ? {mask} , {b}", ("Yes", "No")),
    "rte": Prompt("{a} ? {mask} , {b}", ("Yes", "No")),
    "mrpc": Prompt("{a} ? {mask} , {b}", ("No", "Yes")),
    "qqp": Prompt("{a} ? {mask} , {b}", ("No", "Yes")),
}


def get_prompt(task: Task) -> Prompt:
    if task.name not in PROMPTS:
        raise SparseBertError(
            f"task {task.name} has no prompt template for an MLM head (regression has no label "
            f"words); tasks with one: {', '.join(PROMPTS)}. Use masks.head: classifier"
        )
    return PROMPTS[task.name]


def label_word_ids(tokenizer, prompt: Prompt) -> list[int]:
    """One vocabulary id per label word; each word must be a single token."""
    ids = []
    for word in prompt.words:
        found = None
        for candidate in (word, " " + word):  # BPE vocabularies (RoBERTa) store " great"
            pieces = tokenizer.encode(candidate, add_special_tokens=False)
            if len(pieces) == 1:
                found = pieces[0]
                break
        if found is None:
            raise SparseBertError(
                f"label word '{word}' is not a single token of this tokenizer: the MLM head cannot "
                "score it at the [MASK] position"
            )
        ids.append(found)
    if len(set(ids)) != len(ids):
        raise SparseBertError(f"label words {prompt.words} map to repeated token ids {ids}")
    return ids


def encode_prompt(tokenizer, prompt: Prompt, text_a: str, text_b: str | None, max_length: int) -> list[int]:
    """Token ids of the filled template with special tokens; the texts (never the template or
    [MASK]) are truncated, longest first, so the [MASK] always survives truncation."""
    if tokenizer.mask_token_id is None:
        raise SparseBertError("the tokenizer has no mask token: it cannot be used with an MLM head")
    parts = [p for p in re.split(r"(\{a\}|\{b\}|\{mask\})", prompt.template) if p.strip()]
    texts = {"{a}": tokenizer.encode(text_a, add_special_tokens=False),
             "{b}": tokenizer.encode(text_b or "", add_special_tokens=False)}
    fixed = sum(1 if p == "{mask}" else len(tokenizer.encode(p.strip(), add_special_tokens=False))
                for p in parts if p not in texts)
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False) - fixed
    if budget < 1:
        raise SparseBertError(f"max_seq_length {max_length} is too short for the prompt '{prompt.template}'")
    while len(texts["{a}"]) + len(texts["{b}"]) > budget:
        longest = "{a}" if len(texts["{a}"]) >= len(texts["{b}"]) else "{b}"
        texts[longest] = texts[longest][:-1]
    ids: list[int] = []
    for p in parts:
        if p in texts:
            ids += texts[p]
        elif p == "{mask}":
            ids.append(tokenizer.mask_token_id)
        else:
            ids += tokenizer.encode(p.strip(), add_special_tokens=False)
    prefix, suffix = _special_wrap(tokenizer)
    return prefix + ids + suffix


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one sequence ([CLS] / [SEP],
    <s> / </s>), found by encoding a probe word with and without them."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise SparseBertError("cannot tell where this tokenizer puts its special tokens")


def tokenize_with_prompt(ds, tokenizer, task: Task, max_seq_length: int):
    """A tokenised dataset (input_ids, attention_mask, length, label) of prompt-filled texts."""
    prompt = get_prompt(task)

    def fn(batch):
        b = batch.get("text_b") or [None] * len(batch["text_a"])
        ids = [encode_prompt(tokenizer, prompt, a, bb, max_seq_length) for a, bb in zip(batch["text_a"], b,
                                                                                         strict=True)]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                "length": [len(x) for x in ids]}

    drop = [c for c in ds.column_names if c.startswith("text_")]
    return ds.map(fn, batched=True, remove_columns=drop, desc=f"prompting {task.name}")
