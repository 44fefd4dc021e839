"""A transformers `Trainer` that knows about masks, schedules and teachers.

Everything the Trainer already does (devices, DDP/FSDP via accelerate, gradient
accumulation, logging, checkpoints, resuming) stays the Trainer's; this adds:
- the pruning callback: prune on the schedule at the start of a step, re-apply masks after
  every optimizer step, save masks into every checkpoint and restore them on resume;
- learning-rate re-warming at each pruning step (a LambdaLR, so it resumes with the rest);
- knowledge distillation from a frozen teacher;
- learned masks (movement, SMP, mask training): the method's per-step update, the score
  penalty added to the loss, a parameter group for the scores with their own learning rate
  and no weight decay, and baking the masks into the weights when training ends. The scores
  are model parameters, so the Trainer's own checkpoints and resume carry them.
"""

from __future__ import annotations

import json
import os

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from sparsebert.losses import kd_loss
from sparsebert.methods.gmp import GradualMagnitudePruner
from sparsebert.methods.learned import LearnedMaskMethod
from sparsebert.prompt_head import PromptClassifier
from sparsebert.schedules import rewarm_lr_lambda


class PruningCallback(TrainerCallback):
    """Drives a `GradualMagnitudePruner` from the Trainer's loop."""

    def __init__(self, pruner: GradualMagnitudePruner):
        self.pruner = pruner
        self.trainer: Trainer | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.pruner.masks.register_grad_hooks()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.pruner.maybe_prune(state.global_step, state.max_steps, optimizer):
            state.log_history.append(
                {"step": state.global_step, "pruned_to_sparsity": self.pruner.current_sparsity}
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.masks.apply_()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.pruner.masks.save(folder)

    def on_train_end(self, args, state, control, **kwargs):
        self.pruner.masks.apply_()
        self.pruner.masks.remove_grad_hooks()
        if args.world_size > 1:
            rank = args.process_index
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, f"mask_digest_rank{rank}.json"), "w") as f:
                json.dump({"rank": rank, "digest": self.pruner.masks.digest(),
                           "sparsity": self.pruner.masks.sparsity()}, f)


class LearnedMaskCallback(TrainerCallback):
    """Drives a `LearnedMaskMethod`: update at every step, bake when training ends."""

    def __init__(self, method: LearnedMaskMethod):
        self.method = method

    def on_step_begin(self, args, state, control, **kwargs):
        self.method.step(state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.method.finish()


class SparseTrainer(Trainer):
    """`Trainer` + pruning schedule + LR re-warming + knowledge distillation + learned masks."""

    def __init__(
        self,
        *args,
        pruner: GradualMagnitudePruner | None = None,
        mask_method: LearnedMaskMethod | None = None,
        teacher: torch.nn.Module | None = None,
        kd_hardness: float = 1.0,
        kd_temperature: float = 2.0,
        lr_rewarm: bool = False,
        lr_final_ratio: float = 0.1,
        **kwargs,
    ):
        self.pruner = pruner
        self.mask_method = mask_method
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if pruner is not None:
            callbacks.append(PruningCallback(pruner))
        if mask_method is not None:
            callbacks.append(LearnedMaskCallback(mask_method))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.kd_hardness = kd_hardness
        self.kd_temperature = kd_temperature
        self.lr_rewarm = lr_rewarm
        self.lr_final_ratio = lr_final_ratio

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.pruner is not None and self.lr_rewarm:
            steps = self.pruner.schedule.pruning_steps(num_training_steps)
            fn = rewarm_lr_lambda(
                steps, num_training_steps, self.args.get_warmup_steps(num_training_steps), self.lr_final_ratio
            )
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, fn)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def create_optimizer(self, model=None):
        """With learned masks: the scores get their own group (masks.score_lr, no weight decay)."""
        if self.mask_method is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        score_ids = {id(p) for p in self.mask_method.masks.score_parameters()}
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters()
                 if p.requires_grad and id(p) not in score_ids]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            {"params": [p for p in self.mask_method.masks.score_parameters() if p.requires_grad],
             "weight_decay": 0.0, "lr": self.mask_method.cfg.score_lr},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self._task_loss(model, inputs, num_items_in_batch)
        if self.mask_method is not None and model.training:
            penalty = self.mask_method.penalty()
            if penalty is not None:
                loss = loss + penalty.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self.mask_method is not None and not self.mask_method.masks.baked and "loss" in logs:
            logs = {**logs, **self.mask_method.log_values()}
        return super().log(logs, *args, **kwargs)

    def _task_loss(self, model, inputs, num_items_in_batch=None):
        """Task loss (the model's own, or KD from the teacher) and the model outputs."""
        if self.teacher is None:
            return super().compute_loss(model, inputs, True, num_items_in_batch)
        labels = inputs.get("labels")
        outputs = model(**inputs)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher_logits = self.teacher(**teacher_inputs).logits
        loss = kd_loss(outputs.logits, teacher_logits, labels, self.kd_hardness, self.kd_temperature)
        return loss, outputs

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
        if self.pruner is not None:
            self.pruner.masks.load(resume_from_checkpoint)
            self.pruner.current_sparsity = self.pruner.masks.sparsity()
