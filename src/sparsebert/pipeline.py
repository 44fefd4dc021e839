"""One run, end to end: recipe + model + task -> train (pruning, KD) -> evaluate -> save.

The CLI and the benchmarks call these functions; they are the public Python API too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from sparsebert.errors import SparseBertError
from sparsebert.methods.gmp import GradualMagnitudePruner
from sparsebert.models import load_classifier, load_tokenizer, resolve_model_path
from sparsebert.recipe import Recipe
from sparsebert.report import format_report, sparsity_report
from sparsebert.targets import select_targets
from sparsebert.tasks.glue import GlueTask, compute_metrics_fn, get_task, load_split
from sparsebert.tasks.prompts import get_prompt, label_word_ids, tokenize_with_prompt

logger = logging.getLogger("sparsebert")
RUN_INFO_FILE = "sparsebert.json"

# Our defaults for TrainingArguments, below the recipe's `training` section and the CLI.
TRAINING_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "logging_steps": 50,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "eval_strategy": "no",
    "report_to": "none",
    "train_sampling_strategy": "group_by_length",
    "seed": 42,
}


@dataclass
class DataOptions:
    task: str
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_seq_length: int = 128
    eval_split: str = "validation"


def build_training_args(output_dir: str, recipe: Recipe, explicit: dict[str, Any] | None = None):
    """TrainingArguments from our defaults <- recipe.training <- explicit (CLI) values."""
    from transformers import TrainingArguments

    kwargs = {**TRAINING_DEFAULTS, **recipe.training, **(explicit or {}), "output_dir": output_dir}
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise SparseBertError(f"invalid training arguments: {err}") from None


def tokenize(ds, tokenizer, task: GlueTask, max_seq_length: int):
    """Tokenise text_a [, text_b] and add a `length` column for length-grouped batching."""

    def fn(batch):
        texts = (batch["text_a"], batch["text_b"]) if task.pair else (batch["text_a"],)
        enc = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    drop = [c for c in ds.column_names if c.startswith("text_")]
    return ds.map(fn, batched=True, remove_columns=drop, desc=f"tokenising {task.name}")


def prepare_datasets(data: DataOptions, tokenizer, need_train: bool = True, prompt: bool = False):
    """Load and tokenise the task's splits (as prompt-filled texts for an MLM head if ``prompt``)."""
    task = get_task(data.task)
    encode = tokenize_with_prompt if prompt else tokenize
    train = None
    if need_train:
        train = load_split(task, "train", data.data_dir, max_samples=data.max_train_samples)
        train = encode(train, tokenizer, task, data.max_seq_length)
    evald = load_split(task, data.eval_split, data.data_dir, max_samples=data.max_eval_samples)
    evald = encode(evald, tokenizer, task, data.max_seq_length)
    return task, train, evald


def use_prompt_head(recipe: Recipe, model_path: str | None, task: GlueTask) -> bool:
    """Whether a learned-mask run classifies through the model's MLM head with a prompt."""
    from sparsebert.prompt_head import has_mlm_head
    from sparsebert.tasks.prompts import PROMPTS

    if recipe.masks is None or recipe.masks.head == "classifier":
        return False
    path = resolve_model_path(model_path)
    has_head = has_mlm_head(path)
    if recipe.masks.head == "prompt":
        if not has_head:
            raise SparseBertError(
                f"masks.head: prompt needs a model with a trained masked-LM head; '{path}' has none "
                "(use masks.head: auto to fall back to a trained classifier, or a *ForMaskedLM model)"
            )
        get_prompt(task)  # raises for tasks without a template
        return True
    return has_head and task.name in PROMPTS


def load_prompt_classifier(model_path: str | None, tokenizer, task: GlueTask):
    """A `PromptClassifier` over the model's masked-LM head, with the task's label words."""
    from transformers import AutoModelForMaskedLM

    from sparsebert.prompt_head import PromptClassifier

    path = resolve_model_path(model_path)
    mlm = AutoModelForMaskedLM.from_pretrained(path)
    return PromptClassifier(mlm, tokenizer.mask_token_id, label_word_ids(tokenizer, get_prompt(task)))


def _is_finetuned_classifier(model_path: str | None) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model_path))
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def _head_description(recipe: Recipe, prompt: bool, model_path: str | None) -> str:
    if prompt:
        return "MLM head with label words at [MASK] (nothing but masks learned)"
    if recipe.masks is None or recipe.masks.train_weights:
        return "trained classifier (weights train)"
    if not recipe.masks.train_head:
        return "fine-tuned classifier, frozen"
    if recipe.masks.head == "auto":
        return "trained classifier (model has no MLM head)"
    return "trained classifier (masks.head: classifier)"


def _check_teacher(teacher, task: GlueTask, path: str) -> None:
    if teacher.config.num_labels != task.num_labels:
        raise SparseBertError(
            f"teacher '{path}' has {teacher.config.num_labels} labels, {task.name} needs "
            f"{task.num_labels}: distil from a model fine-tuned on this task"
        )


def train_and_prune(
    model_path: str | None,
    data: DataOptions,
    recipe: Recipe,
    output_dir: str,
    teacher_path: str | None = None,
    training_overrides: dict[str, Any] | None = None,
    resume: str | bool | None = None,
) -> dict[str, Any]:
    """Fine-tune (recipe method ``dense``), prune while fine-tuning (``gmp``) or learn masks
    (movement, soft-movement, smp-l, smp-s, mask-train); save and report."""
    from transformers import DataCollatorWithPadding

    started = time.time()
    tokenizer = load_tokenizer(model_path)
    prompt = recipe.learned and use_prompt_head(recipe, model_path, get_task(data.task))
    if recipe.learned and not prompt and not recipe.masks.train_weights and not recipe.masks.train_head \
            and not _is_finetuned_classifier(model_path):
        raise SparseBertError(
            f"recipe '{recipe.name}' freezes the weights and the classifier head (masks.train_head: false), "
            "so it needs a model already fine-tuned on the task; pass one with --model, or "
            "--set masks.train_head=true"
        )
    task, train_ds, eval_ds = prepare_datasets(data, tokenizer, prompt=prompt)
    if prompt:
        model = load_prompt_classifier(model_path, tokenizer, task)
    else:
        model = load_classifier(model_path, task.num_labels, task.is_regression)
    args = build_training_args(output_dir, recipe, training_overrides)

    pruner = None
    mask_method = None
    if recipe.method == "gmp":
        targets = select_targets(model, recipe.targets)
        pruner = GradualMagnitudePruner(targets, recipe.gradual_schedule(), recipe.allocation)
    elif recipe.learned:
        from sparsebert.methods.learned import build_learned_method

        mask_method = build_learned_method(model, select_targets(model, recipe.targets), recipe)
        mask_method.configure_trainable(model, head_trains=not prompt and recipe.masks.train_head)
    teacher = None
    use_kd = recipe.distillation.enabled and teacher_path is not None
    if teacher_path is not None and not recipe.distillation.enabled:
        logger.warning("recipe '%s' disables distillation: the teacher is not used", recipe.name)
    if use_kd:
        teacher = load_classifier(teacher_path, task.num_labels, task.is_regression)
        _check_teacher(teacher, task, teacher_path)

    from sparsebert.trainer import SparseTrainer

    trainer = SparseTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics_fn(task),
        pruner=pruner,
        mask_method=mask_method,
        teacher=teacher,
        kd_hardness=recipe.distillation.hardness,
        kd_temperature=recipe.distillation.temperature,
        lr_rewarm=recipe.lr.rewarm,
        lr_final_ratio=recipe.lr.final_ratio,
    )
    if resume == "auto" or resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if resume is None:
            logger.warning("no checkpoint in %s: starting from scratch", output_dir)
    elif resume and not os.path.isdir(resume):
        raise SparseBertError(f"checkpoint to resume from '{resume}' does not exist")
    train_result = trainer.train(resume_from_checkpoint=resume or None)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        trainer.save_model(output_dir)
    report_targets = recipe.targets if recipe.method != "dense" else ["encoder-linears"]
    plain_model = model.mlm if prompt else model
    report = sparsity_report(plain_model, report_targets)
    info = {
        "command": "prune" if recipe.method != "dense" else "finetune",
        "model": model_path or "embedded:all-MiniLM-L6-v2",
        "teacher": teacher_path if use_kd else None,
        "task": task.name,
        "data": vars(data),
        "recipe": recipe.to_dict(),
        "target_sparsity": recipe.sparsity if recipe.method != "dense" else 0.0,
        "train_steps": train_result.global_step,
        "wall_seconds": time.time() - started,
        "metrics": metrics,
        "sparsity": report,
    }
    if mask_method is not None:
        info["weights_trained"] = mask_method.weights_trained
        info["head"] = _head_description(recipe, prompt, model_path)
        info["learned_masks"] = mask_method.report
        info["trained_parameters"] = sum(
            p.numel() for p in plain_model.parameters() if p.requires_grad)
        if prompt:
            p = get_prompt(task)
            info["prompt"] = {"template": p.template, "label_words": list(p.words)}
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, RUN_INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, default=str)
        with open(os.path.join(output_dir, "sparsity.txt"), "w") as f:
            f.write(format_report(report) + "\n")
    return info


def evaluate_saved(
    model_path: str, data: DataOptions, batch_size: int = 128
) -> dict[str, Any]:
    """Evaluate a saved classifier on a task split (plain transformers loading)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    path = resolve_model_path(model_path)
    tokenizer = load_tokenizer(path)
    run_info = os.path.join(path, RUN_INFO_FILE)
    prompt = False
    if os.path.isfile(run_info):
        with open(run_info) as f:
            prompt = "prompt" in json.load(f)
    task, _, eval_ds = prepare_datasets(data, tokenizer, need_train=False, prompt=prompt)
    if prompt:  # an SMP model that classifies with its MLM head: evaluate it the same way
        model = load_prompt_classifier(path, tokenizer, task)
    else:
        model = load_classifier(path, task.num_labels, task.is_regression, require_head=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none")
        trainer = Trainer(
            model=model, args=args, processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics_fn(task),
        )
        metrics = trainer.evaluate(eval_ds)
    plain = model.mlm if prompt else model
    return {"task": task.name, "split": data.eval_split, "metrics": metrics,
            "encoder_linear_sparsity": sparsity_report(plain)["target_sparsity"]}


__all__ = ["DataOptions", "evaluate_saved", "train_and_prune"]
