"""A transformers `Trainer` that drives pruning methods and composes the loss from terms.

Everything the Trainer already does (devices, DDP/FSDP via accelerate, gradient
accumulation, logging, checkpoints, resuming) stays the Trainer's; this adds, knowing
nothing of any method's family:

- `MethodsCallback`: calls every method's hooks (step begin, after backward, after the
  optimizer step, checkpoint save, train end) and restores their state on resume;
- learning-rate re-warming at the methods' pruning steps (a LambdaLR, so it resumes);
- extra optimizer groups a method asks for (mask scores with their own learning rate);
- the loss as a weighted sum of `losses.LossTerm`s (task loss, distillation from a frozen
  teacher on the teacher's own inputs, a method's penalty, any registered term), with
  extra per-example columns kept through the Trainer's column removal;
- ``eval_loss`` is the task loss (never distillation); each term is logged by its name.

Loss scaling: every term is a mean over its micro-batch, so this trainer tells the Trainer
that the loss is *not* normalised by ``num_items_in_batch``; the Trainer then divides by the
gradient-accumulation steps and DDP averages over ranks: 4 x 8 and 1 x 32 examples give the
same gradient, and a penalty weighs the same on one process or many. (With the Trainer's
default, a model whose forward takes ``**kwargs`` — every transformers model — is assumed
to normalise by the token count itself, which a mean cross-entropy does not: the gradient
was multiplied by the accumulation steps, and the task loss by the world size.)
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from sparsebert.collators import TEACHER_PREFIX
from sparsebert.losses import LossBatch, LossTerm, TaskLoss
from sparsebert.methods.base import PruningMethod
from sparsebert.preflight import RUN_FILE
from sparsebert.prompt_head import PromptClassifier
from sparsebert.schedules import rewarm_lr_lambda
from sparsebert.verify import write_checksums


class MethodsCallback(TrainerCallback):
    """Drives `PruningMethod`s from the Trainer's loop."""

    def __init__(self, methods: Sequence[PruningMethod]):
        self.methods = list(methods)

    def on_train_begin(self, args, state, control, **kwargs):
        for m in self.methods:
            m.on_train_begin()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        for m in self.methods:
            entry = m.on_step_begin(state.global_step, state.max_steps, optimizer)
            if entry:
                state.log_history.append({"step": state.global_step, **entry})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for m in self.methods:
            m.on_pre_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        for m in self.methods:
            m.on_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                for m in self.methods:
                    m.save(folder)

    def on_train_end(self, args, state, control, **kwargs):
        for m in self.methods:
            m.on_train_end(args)


class EpochSeededLengthGroupedSampler:
    """`LengthGroupedSampler` whose permutation of epoch e is drawn from seed + e."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        self.generator = torch.Generator()
        self.inner = LengthGroupedSampler(batch_size, lengths=lengths, generator=self.generator)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return iter(self.inner)


class ChecksumCallback(TrainerCallback):
    """Writes the run's identity and ``checksums.json`` into every checkpoint once everything
    in it is saved (the last callback): `sparsebert verify` can tell a damaged checkpoint, and
    ``--resume`` skips one whose writing was interrupted (no checksums yet)."""

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            run_file = os.path.join(args.output_dir, RUN_FILE)
            if os.path.isfile(run_file):  # what run this is, for --resume's check
                shutil.copy2(run_file, os.path.join(folder, RUN_FILE))
            write_checksums(folder)  # last: marks the checkpoint complete


def use_eager_attention(*models: torch.nn.Module | None) -> None:
    """Switch models to the eager attention implementation, the one that returns attention
    maps (SDPA computes the same attention without them)."""
    for model in models:
        if model is None:
            continue
        target = getattr(model, "mlm", model)  # a prompt classifier wraps its masked-LM model
        setter = getattr(target, "set_attn_implementation", None)
        if setter is None:
            raise ValueError(f"{type(target).__name__} cannot switch to eager attention: attention KD "
                             "needs attention maps; set distillation.attention = 0")
        setter("eager")


class SparseTrainer(Trainer):
    """`Trainer` + pruning methods + LR re-warming + a loss made of terms."""

    def __init__(
        self,
        *args,
        methods: Sequence[PruningMethod] = (),
        loss_terms: Sequence[LossTerm] | None = None,
        teacher: torch.nn.Module | None = None,
        task: Any = None,
        lr_rewarm: bool = False,
        lr_final_ratio: float = 0.1,
        **kwargs,
    ):
        self.methods = list(methods)
        self.task = task
        terms = list(loss_terms) if loss_terms is not None else [TaskLoss()]
        for m in self.methods:
            terms += m.loss_terms()
        self.loss_terms = terms
        if any(t.needs_teacher for t in terms) and teacher is None:
            raise ValueError("a loss term needs a teacher: pass teacher=")
        self.extra_columns = sorted({c for t in terms for c in t.columns})
        self.forward_kwargs = {k: v for t in terms for k, v in t.model_kwargs.items()}
        if any(t.needs_eager_attention for t in terms):
            use_eager_attention(kwargs.get("model") if kwargs.get("model") is not None else args[0], teacher)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self.methods:
            callbacks.insert(0, MethodsCallback(self.methods))
        callbacks.append(ChecksumCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        # the terms are means over their micro-batch: let the Trainer divide by the
        # accumulation steps and never multiply by the world size (module docstring)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.lr_rewarm = lr_rewarm
        self.lr_final_ratio = lr_final_ratio
        self._loss_sums: dict[str, float] = defaultdict(float)
        self._loss_counts: dict[str, int] = defaultdict(int)

    # -- columns ---------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        """Keep the loss terms' extra columns and the teacher's inputs through column removal."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = list(self.extra_columns)
            if self.teacher is not None:
                extra += [TEACHER_PREFIX + c for c in ("input_ids", "attention_mask", "token_type_ids")]
            self._signature_columns = list(self._signature_columns) + extra

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches from a generator seeded per epoch (seed + epoch): the order of
        an epoch is a function of the seed alone, so a run resumed in the middle of an epoch
        sees the same batches as one that was never interrupted (the Trainer's sampler drew
        from the global RNG, whose state differs after a restart)."""
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation in dataset order, always. The Trainer groups evaluation batches by length
        when training does (``train_sampling_strategy="group_by_length"``); predictions then
        come back in another order than the features, which tasks that score predictions
        against their features (QA spans, NER words) cannot undo."""
        from torch.utils.data import SequentialSampler

        if eval_dataset is None or not hasattr(eval_dataset, "__len__"):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    # -- optimisation ------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        steps = sorted({s for m in self.methods for s in m.pruning_steps(num_training_steps)})
        if self.lr_scheduler is None and self.lr_rewarm and steps:
            fn = rewarm_lr_lambda(
                steps, num_training_steps, self.args.get_warmup_steps(num_training_steps), self.lr_final_ratio
            )
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, fn)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def create_optimizer(self, model=None):
        """The Trainer's groups (decay / no decay) plus the methods' own groups."""
        extra = [g for m in self.methods for g in m.optimizer_groups()]
        if not extra or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        taken = {id(p) for g in extra for p in g["params"]}
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in taken]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            *extra,
        ]
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -- loss ----------------------------------------------------------------------------------------
    def _teacher_outputs(self, inputs: dict[str, torch.Tensor], teacher_inputs: dict[str, torch.Tensor]):
        device = next(iter(inputs.values())).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        feed = teacher_inputs or {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            return self.teacher(**feed, **self.forward_kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Columns ``teacher_<name>`` are the teacher's own inputs (the plain encoding when the
        student reads a prompt); without them the teacher sees the student's inputs."""
        inputs = dict(inputs)
        extras = {c: inputs.pop(c) for c in self.extra_columns if c in inputs}
        teacher_inputs = {k[len(TEACHER_PREFIX):]: inputs.pop(k) for k in list(inputs)
                          if k.startswith(TEACHER_PREFIX)}
        if not model.training:  # evaluation: eval_loss is the task loss
            outputs = model(**inputs)
            loss = getattr(outputs, "loss", None)
            return (loss, outputs) if return_outputs else loss
        outputs = model(**inputs, **self.forward_kwargs)
        batch = LossBatch(outputs, inputs, extras, self.task,
                          (lambda: self._teacher_outputs(inputs, teacher_inputs)) if self.teacher else None)
        loss = None
        for term in self.loss_terms:
            value = term(batch)
            if value is None:
                continue
            self._loss_sums[term.name] += float(value.detach())
            self._loss_counts[term.name] += 1
            weighted = term.weight * value
            loss = weighted if loss is None else loss + weighted.to(loss.device)
        if loss is None:
            raise ValueError("no loss term produced a loss for this batch")
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            extra = {name: round(self._loss_sums[name] / n, 6) for name, n in self._loss_counts.items() if n}
            if len(extra) > 1 or "task_loss" not in extra:
                logs = {**logs, **extra}
            self._loss_sums.clear()
            self._loss_counts.clear()
            for m in self.methods:
                logs = {**logs, **m.log_values()}
        return super().log(logs, *args, **kwargs)

    # -- saving ---------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        """A prompt classifier is saved as the masked-LM model it wraps (loadable with
        AutoModelForMaskedLM); everything else as the Trainer does it."""
        if not isinstance(self.model, PromptClassifier):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        self.model.mlm.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is None and isinstance(self.model, PromptClassifier):
            model = self.model.mlm
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for m in self.methods:
            m.load(resume_from_checkpoint)
