"""One run, end to end: recipe + model + task -> train (a pruning method, a loss of terms) ->
evaluate every evaluation set of the task -> save.

Task-agnostic: the task (`tasks.base.Task`) says which model class, data, collator,
evaluation sets and distilled outputs; the recipe names a registered pruning method; the
loss is a list of `losses.LossTerm`s. The CLI and the benchmarks call these functions; they
are the public Python API too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsebert.budgets import scale_training
from sparsebert.config import Recipe
from sparsebert.errors import SparseBertError
from sparsebert.losses import LossTerm, distillation_terms
from sparsebert.methods.base import MethodContext, PruningMethod, build_method
from sparsebert.models import RUN_INFO_FILE, load_model, load_tokenizer, resolve_model_path
from sparsebert.preflight import (
    check_free_space,
    check_positive,
    check_training_numbers,
    checkpoint_bytes,
    complete_checkpoints,
    describe_os_error,
    prepare_output_dir,
    run_identity,
)
from sparsebert.report import format_report, sparsity_report
from sparsebert.safe_load import check_model_folder
from sparsebert.targets import select_targets
from sparsebert.tasks.base import EvalSet, Task, get_task
from sparsebert.verify import write_checksums

logger = logging.getLogger("sparsebert")

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

MIN_SEQ_LENGTH = 8
"""Shorter sequences cannot hold the special tokens and a pair of texts (or a prompt)."""

SPARSE_MODEL_MIN_ZEROS = 0.05
"""A starting model whose targeted weights are at least this fraction exact zeros is taken
as pruned: `finetune` keeps its zeros (sparse transfer) unless told to unlock them. Trained
dense weights have practically no exact zeros."""


@dataclass
class DataOptions:
    task: str
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_seq_length: int = 128
    eval_split: str = "validation"


@dataclass
class EvalData:
    """One evaluation set, loaded and encoded."""

    eval_set: EvalSet
    examples: Any
    features: Any


@dataclass
class TrainRun:
    """What `train_run` returns: the run info (also in ``sparsebert.json``), the trained model
    in memory (for a prompt classifier, the masked-LM model it wraps) and the trainer."""

    info: dict[str, Any]
    model: Any
    trainer: Any = field(repr=False, default=None)


def build_training_args(output_dir: str, recipe: Recipe, explicit: dict[str, Any] | None = None):
    """TrainingArguments from our defaults <- recipe.training <- explicit (CLI) values, the
    budget then scaled with the target sparsity when the recipe says so (`budgets.py`)."""
    from transformers import TrainingArguments

    kwargs = {**TRAINING_DEFAULTS, **recipe.training, **(explicit or {}), "output_dir": output_dir}
    kwargs, budget = scale_training(kwargs, recipe)
    if budget is not None:
        logger.info("budget scaled with the target sparsity: x%.2f (%s)", budget["factor"], budget)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise SparseBertError(f"invalid training arguments: {err}") from None


def check_data_options(data: DataOptions) -> None:
    if not isinstance(data.max_seq_length, int) or data.max_seq_length < MIN_SEQ_LENGTH:
        raise SparseBertError(
            f"--max-seq-length must be an integer >= {MIN_SEQ_LENGTH} (tokens per example, special "
            f"tokens included), got {data.max_seq_length!r}"
        )
    check_positive("--max-train-samples", data.max_train_samples)
    check_positive("--max-eval-samples", data.max_eval_samples)


def check_vocabulary(tokenizer, model, who: str) -> None:
    """Token ids past the embedding table fail deep inside torch: say so before training."""
    size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > size:
        raise SparseBertError(
            f"{who}: its tokenizer has {len(tokenizer)} tokens but its embeddings only {size}: the "
            "tokenizer saved with the model is not the one it was trained with"
        )


def last_checkpoint_hint(output_dir: str) -> str:
    """'; the last complete checkpoint is X (resume with --resume)' or ''."""
    complete = complete_checkpoints(output_dir)
    if not complete:
        return ""
    return f"; the last complete checkpoint is {complete[-1]} (continue with --resume)"


# -- data -------------------------------------------------------------------------------------------
def eval_sets_for(task: Task, split: str = "validation") -> list[EvalSet]:
    """The task's evaluation sets; a split other than ``validation`` is evaluated alone."""
    if split == "validation":
        return task.eval_sets()
    return [EvalSet(split, split)]


def load_eval_data(task: Task, data: DataOptions, tokenizer, prompt: bool = False) -> list[EvalData]:
    """Every evaluation set of the task, encoded; optional sets whose data is absent are skipped."""
    out = []
    for es in eval_sets_for(task, data.eval_split):
        try:
            raw = task.load_eval_set(es, data.data_dir, data.max_eval_samples)
        except SparseBertError as err:
            if es.optional:
                logger.info("evaluation set %s skipped: %s", es.name, err)
                continue
            raise
        feats = task.encode_prompt(raw, tokenizer, data.max_seq_length) if prompt else \
            task.encode_eval(raw, tokenizer, data.max_seq_length)
        out.append(EvalData(es, raw, feats))
    return out


def prepare_datasets(data: DataOptions, tokenizer, need_train: bool = True, prompt: bool = False):
    """The task, its encoded training set (None unless ``need_train``) and its evaluation data."""
    task = get_task(data.task)
    train = raw_train = None
    if need_train:
        raw_train = task.load_split("train", data.data_dir, data.max_train_samples)
        train = task.encode_prompt(raw_train, tokenizer, data.max_seq_length) if prompt else \
            task.encode(raw_train, tokenizer, data.max_seq_length)
    return task, train, raw_train, load_eval_data(task, data, tokenizer, prompt)


def add_teacher_inputs(features, raw, task: Task, teacher_tokenizer, max_seq_length: int):
    """Columns ``teacher_input_ids`` ... with the teacher's own encoding of the same examples
    (the student reads a prompt, or another tokenizer)."""
    theirs = task.encode(raw, teacher_tokenizer, max_seq_length)
    for col in ("input_ids", "attention_mask", "token_type_ids"):
        if col in theirs.column_names:
            features = features.add_column(f"teacher_{col}", theirs[col])
    return features


def _same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


# -- models -------------------------------------------------------------------------------------------
def use_prompt_head(recipe: Recipe, model_path: str | None, task: Task) -> bool:
    """Whether a learned-mask run classifies through the model's MLM head with a prompt."""
    from sparsebert.prompt_head import has_mlm_head

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
        if task.prompt() is None:
            raise SparseBertError(
                f"task {task.name} has no prompt template for an MLM head; use masks.head: classifier"
            )
        return True
    return has_head and task.prompt() is not None


def load_prompt_classifier(model_path: str | None, tokenizer, task: Task):
    """A `PromptClassifier` over the model's masked-LM head, with the task's label words."""
    from transformers import AutoModelForMaskedLM

    from sparsebert.prompt_head import PromptClassifier
    from sparsebert.tasks.prompts import label_word_ids

    path = resolve_model_path(model_path)
    check_model_folder(path)
    mlm = AutoModelForMaskedLM.from_pretrained(path, use_safetensors=True)
    return PromptClassifier(mlm, tokenizer.mask_token_id, label_word_ids(tokenizer, task.prompt()))


def _head_description(recipe: Recipe, prompt: bool) -> str:
    if prompt:
        return "MLM head with label words at [MASK] (nothing but masks learned)"
    if recipe.masks is None or recipe.masks.train_weights:
        return "trained classifier (weights train)"
    if not recipe.masks.train_head:
        return "fine-tuned classifier, frozen"
    if recipe.masks.head == "auto":
        return "trained classifier (model has no MLM head)"
    return "trained classifier (masks.head: classifier)"


def choose_recipe(recipe: Recipe, model, unlock_mask: bool) -> Recipe:
    """Dense fine-tuning of a model that is already sparse becomes sparse transfer (its zeros
    locked) unless ``unlock_mask``; said in a log line either way."""
    if recipe.method != "dense":
        return recipe
    targets = select_targets(model, recipe.targets)
    total = sum(p.numel() for p in targets.values())
    zeros = sum(int((p.detach() == 0).sum()) for p in targets.values())
    fraction = zeros / total if total else 0.0
    if fraction < SPARSE_MODEL_MIN_ZEROS:
        return recipe
    if unlock_mask:
        logger.warning("the model is %.1f%% sparse: --unlock-mask given, its zeros may become non-zero",
                       100 * fraction)
        return recipe
    logger.warning("the model is already %.1f%% sparse: fine-tuning with its mask locked (sparse "
                   "transfer); pass --unlock-mask to let pruned weights grow back", 100 * fraction)
    from dataclasses import replace

    return replace(recipe, method="transfer", name=f"{recipe.name}+transfer")


# -- evaluation ------------------------------------------------------------------------------------------
def evaluate_all(trainer, task: Task, evals: Sequence[EvalData]) -> dict[str, dict[str, float]]:
    """Metrics of every evaluation set: ``eval_<metric>`` for the first (in-distribution) set,
    ``eval_<set>_<metric>`` for the others; each with its loss and runtime."""
    results: dict[str, dict[str, float]] = {}
    in_training_metrics = trainer.compute_metrics
    trainer.compute_metrics = None  # it knows the first set only; each set is scored below
    try:
        for i, ev in enumerate(evals):
            prefix = "eval" if i == 0 else f"eval_{ev.eval_set.name}"
            pred = trainer.predict(ev.features, metric_key_prefix=prefix)
            scores = task.score(ev.eval_set, pred.predictions, pred.label_ids, ev.features, ev.examples)
            metrics = {**pred.metrics, **{f"{prefix}_{k}": v for k, v in scores.items()}}
            if trainer.state.epoch is not None:
                metrics["epoch"] = trainer.state.epoch
            trainer.log(metrics)
            results[ev.eval_set.name] = metrics
    finally:
        trainer.compute_metrics = in_training_metrics
    return results


def _compute_metrics(task: Task, ev: EvalData | None):
    if ev is None:
        return None

    def compute(pred) -> dict[str, float]:
        return task.score(ev.eval_set, pred.predictions, pred.label_ids, ev.features, ev.examples)

    return compute


# -- one run ---------------------------------------------------------------------------------------------
def train_run(
    model_path: str | None,
    data: DataOptions,
    recipe: Recipe,
    output_dir: str,
    teacher_path: str | None = None,
    training_overrides: dict[str, Any] | None = None,
    resume: str | bool | None = None,
    unlock_mask: bool = False,
    extra_loss_terms: Sequence[LossTerm] = (),
    callbacks: Sequence[Any] = (),
    overwrite: bool = False,
    debias: Any = None,
) -> TrainRun:
    """Fine-tune (recipe method ``dense``; a sparse model keeps its zeros), prune while
    fine-tuning (``gmp``), transfer with a locked mask (``transfer``) or learn masks
    (movement, soft-movement, smp-l, smp-s, mask-train); evaluate, save and report.

    ``extra_loss_terms`` are added to the recipe's (task loss, distillation, the method's
    penalty); ``callbacks`` are `transformers.TrainerCallback`s for the Trainer. ``debias``
    (`debias.DebiasOptions`) replaces the task-loss term by a debiasing loss."""
    from transformers import set_seed

    started = time.time()
    task = get_task(data.task)
    check_data_options(data)
    if debias is not None:
        from sparsebert.debias import check_teacher

        check_teacher(debias, teacher_path)
    args = build_training_args(output_dir, recipe, training_overrides)
    check_training_numbers(args)
    resume_from = prepare_output_dir(output_dir, run_identity(task.name, model_path, recipe,
                                                              data.max_seq_length), resume, overwrite)
    set_seed(args.seed)  # before any head is initialised: same seed, same model
    tokenizer = load_tokenizer(model_path)
    prompt = recipe.learned and use_prompt_head(recipe, model_path, task)
    if recipe.learned and not prompt and not recipe.masks.train_weights and not recipe.masks.train_head:
        from sparsebert.heads import is_finetuned
        from sparsebert.models import load_config

        if not is_finetuned(load_config(model_path), task.kind):
            raise SparseBertError(
                f"recipe '{recipe.name}' freezes the weights and the task head (masks.train_head: false), "
                "so it needs a model already fine-tuned on the task; pass one with --model, or "
                "--set masks.train_head=true"
            )
    _, train_ds, raw_train, evals = prepare_datasets(data, tokenizer, prompt=prompt)
    model = load_prompt_classifier(model_path, tokenizer, task) if prompt else load_model(model_path, task)
    plain_model = model.mlm if prompt else model
    check_vocabulary(tokenizer, plain_model, model_path or "the embedded model")
    check_free_space(Path(output_dir), checkpoint_bytes(plain_model))
    recipe = choose_recipe(recipe, plain_model, unlock_mask)

    context = MethodContext(model_path=resolve_model_path(model_path),
                            head_trains=not prompt and (recipe.masks is None or recipe.masks.train_head))
    method: PruningMethod = build_method(model, select_targets(model, recipe.targets), recipe, context)
    method.configure_trainable(model)

    teacher = None
    use_kd = recipe.distillation.enabled and teacher_path is not None
    debias_teacher = debias is not None and debias.needs_teacher  # conf-reg reads the teacher, KD or not
    if teacher_path is not None and not recipe.distillation.enabled and not debias_teacher:
        logger.warning("recipe '%s' disables distillation: the teacher is not used", recipe.name)
    if use_kd or debias_teacher:
        teacher = load_model(teacher_path, task, role="teacher")
        teacher_tokenizer = load_tokenizer(teacher_path)
        check_vocabulary(teacher_tokenizer, teacher, f"teacher '{teacher_path}'")
        if prompt or not _same_vocabulary(tokenizer, teacher_tokenizer):
            if task.kind != "sequence-classification":
                raise SparseBertError(
                    f"the teacher '{teacher_path}' has another tokenizer than the student: distilling "
                    f"{task.kind} needs the same tokens; use a teacher with the student's vocabulary"
                )
            train_ds = add_teacher_inputs(train_ds, raw_train, task, teacher_tokenizer, data.max_seq_length)
    layerwise = {"hidden": recipe.distillation.hidden, "attention": recipe.distillation.attention}
    if any(layerwise.values()) and not use_kd:
        raise SparseBertError(
            "distillation.hidden / distillation.attention (layer-wise KD) need a teacher: pass "
            "--teacher (a dense model of the same depth, e.g. the one you prune from), or set them to 0"
        )
    if any(layerwise.values()) and "teacher_input_ids" in train_ds.column_names:
        raise SparseBertError(
            "layer-wise KD (distillation.hidden / attention) compares the student's and the teacher's "
            "layers token by token, and here the teacher reads other tokens (a prompt or another "
            "tokenizer); use logit KD only (set them to 0)"
        )
    terms = distillation_terms(recipe.distillation.hardness, recipe.distillation.temperature, use_kd,
                               **layerwise)
    terms += list(extra_loss_terms)
    debias_info = None
    if debias is not None:  # the bias_probs column, checked by hash; the debias term for the task loss
        from sparsebert.debias import apply_debias

        train_ds, terms, debias_info = apply_debias(debias, task, raw_train, train_ds, terms)

    from sparsebert.collators import with_extra_columns
    from sparsebert.trainer import SparseTrainer

    collator = with_extra_columns(task.collator(tokenizer), tokenizer,
                                  [c for t in terms for c in t.columns])
    trainer = SparseTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=evals[0].features if evals else None,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=_compute_metrics(task, evals[0] if evals else None),
        preprocess_logits_for_metrics=task.preprocess_logits,
        methods=[method],
        loss_terms=terms,
        teacher=teacher,
        task=task,
        lr_rewarm=recipe.lr.rewarm,
        lr_final_ratio=recipe.lr.final_ratio,
        callbacks=list(callbacks),
    )
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
        eval_results = evaluate_all(trainer, task, evals)
        if trainer.is_world_process_zero():
            trainer.save_model(output_dir)
    except OSError as err:
        raise SparseBertError(f"writing to {output_dir} failed: {describe_os_error(err)}"
                              f"{last_checkpoint_hint(output_dir)}") from None
    except RuntimeError as err:  # torch.save reports a full disk as an 'iostream error'
        if "iostream" not in str(err) and "PytorchStreamWriter" not in str(err):
            raise
        first_line = str(err).splitlines()[0]
        raise SparseBertError(f"writing to {output_dir} failed (is the disk full?): {first_line}"
                              f"{last_checkpoint_hint(output_dir)}") from None
    prunes = recipe.method != "dense"
    report = sparsity_report(plain_model, recipe.targets if prunes else ["encoder-linears"])
    commands = {"dense": "finetune", "transfer": "transfer", "head-only": "head-only"}
    command = commands.get(recipe.method, "prune")
    info: dict[str, Any] = {
        "command": command,
        "model": model_path or "embedded:all-MiniLM-L6-v2",
        "teacher": teacher_path if use_kd else None,
        "task": task.name,
        "data": vars(data),
        "recipe": recipe.to_dict(),
        "target_sparsity": recipe.sparsity if method.prunes else report["target_sparsity"] if prunes else 0.0,
        "train_steps": train_result.global_step,
        "wall_seconds": time.time() - started,
        "metrics": next(iter(eval_results.values()), {}),
        "eval_sets": eval_results,
        "loss_terms": {t.name: t.weight for t in trainer.loss_terms},
        "debias": debias_info,
        "budget": scale_training({**TRAINING_DEFAULTS, **recipe.training, **(training_overrides or {})},
                                 recipe)[1],
        "method": {"name": recipe.method, **method.report()},
        "sparsity": report,
    }
    if teacher is not None:
        info["teacher_metrics"] = teacher_metrics(teacher_path, data, trainer.args.world_size)
    if recipe.learned:
        info["weights_trained"] = method.weights_trained
        info["head"] = _head_description(recipe, prompt)
        info["learned_masks"] = method.report()
        info["trained_parameters"] = sum(p.numel() for p in plain_model.parameters() if p.requires_grad)
        if prompt:
            p = task.prompt()
            info["prompt"] = {"template": p.template, "label_words": list(p.words)}
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, RUN_INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, default=str)
        with open(os.path.join(output_dir, "sparsity.txt"), "w") as f:
            f.write(format_report(report) + "\n")
        write_checksums(output_dir)  # last: `sparsebert verify` catches any later change
    return TrainRun(info, plain_model, trainer)


def teacher_metrics(teacher_path: str, data: DataOptions, world_size: int = 1) -> dict[str, float] | None:
    """The teacher's metrics on the student's evaluation set, so that a distilled run reports
    what it is measured against (a sparse model 3 points below a teacher says more than the
    number alone). Read from the teacher's ``sparsebert.json`` when it was evaluated on the
    same task and data, else evaluated here (one pass over the dev set); None under DDP, where
    a second evaluation would need every rank."""
    path = os.path.join(resolve_model_path(teacher_path), RUN_INFO_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        same = {k: saved.get("data", {}).get(k) for k in ("task", "max_eval_samples", "max_seq_length",
                                                            "eval_split")}
        if same == {"task": data.task, "max_eval_samples": data.max_eval_samples,
                    "max_seq_length": data.max_seq_length, "eval_split": data.eval_split}:
            return saved.get("metrics")
    if world_size > 1:
        return None
    eval_only = DataOptions(data.task, data.data_dir, None, data.max_eval_samples, data.max_seq_length,
                            data.eval_split)
    return evaluate_saved(teacher_path, eval_only)["metrics"]


def train_and_prune(*args, **kwargs) -> dict[str, Any]:
    """`train_run`, returning only the run info (what ``sparsebert.json`` holds)."""
    return train_run(*args, **kwargs).info


def evaluate_saved(
    model_path: str, data: DataOptions, batch_size: int = 128, runtime: str = "torch"
) -> dict[str, Any]:
    """Evaluate a saved model on every evaluation set of a task (plain transformers loading);
    ``runtime``: ``torch``, or the sparse CPU runtime (``sparse``, ``sparse-int8``: see
    `sparsebert.runtime.sparsify.prepare_for_runtime`), whose accuracy is then reported."""
    import tempfile

    from transformers import TrainingArguments

    from sparsebert.trainer import SparseTrainer

    path = resolve_model_path(model_path)
    tokenizer = load_tokenizer(path)
    run_info = os.path.join(path, RUN_INFO_FILE)
    prompt = False
    if os.path.isfile(run_info):
        with open(run_info) as f:
            prompt = "prompt" in json.load(f)
    task, _, _, evals = prepare_datasets(data, tokenizer, need_train=False, prompt=prompt)
    if prompt:  # an SMP model that classifies with its MLM head: evaluate it the same way
        model = load_prompt_classifier(path, tokenizer, task)
    else:
        model = load_model(path, task, role="evaluate")
    plain = model.mlm if prompt else model
    sparsity = sparsity_report(plain)["target_sparsity"]  # before the runtime swaps modules
    runtime_info: dict[str, Any] = {"runtime": "torch"}
    if runtime != "torch":  # the sparse runtime swaps its modules in (in place)
        from sparsebert.runtime.sparsify import prepare_for_runtime

        runtime_info = prepare_for_runtime(model, runtime)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none",
                                 use_cpu=runtime != "torch")
        trainer = SparseTrainer(
            model=model, args=args, processing_class=tokenizer, data_collator=task.collator(tokenizer),
            preprocess_logits_for_metrics=task.preprocess_logits, task=task,
        )
        results = evaluate_all(trainer, task, evals)
    return {"task": task.name, "split": data.eval_split, "runtime": runtime_info,
            "metrics": next(iter(results.values()), {}), "eval_sets": results,
            "encoder_linear_sparsity": sparsity}


__all__ = ["DataOptions", "TrainRun", "evaluate_saved", "train_and_prune", "train_run"]
