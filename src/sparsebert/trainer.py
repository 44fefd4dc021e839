"""A transformers `Trainer` that knows about masks, schedules and teachers.

Everything the Trainer already does (devices, DDP/FSDP via accelerate, gradient
accumulation, logging, checkpoints, resuming) stays the Trainer's; this adds:
- the pruning callback: prune on the schedule at the start of a step, re-apply masks after
  every optimizer step, save masks into every checkpoint and restore them on resume;
- learning-rate re-warming at each pruning step (a LambdaLR, so it resumes with the rest);
- knowledge distillation from a frozen teacher.
"""

from __future__ import annotations

import json
import os

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from sparsebert.losses import kd_loss
from sparsebert.methods.gmp import GradualMagnitudePruner
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


class SparseTrainer(Trainer):
    """`Trainer` + pruning schedule + LR re-warming + knowledge distillation."""

    def __init__(
        self,
        *args,
        pruner: GradualMagnitudePruner | None = None,
        teacher: torch.nn.Module | None = None,
        kd_hardness: float = 1.0,
        kd_temperature: float = 2.0,
        lr_rewarm: bool = False,
        lr_final_ratio: float = 0.1,
        **kwargs,
    ):
        self.pruner = pruner
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if pruner is not None:
            callbacks.append(PruningCallback(pruner))
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        outputs = model(**inputs)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher_logits = self.teacher(**teacher_inputs).logits
        loss = kd_loss(outputs.logits, teacher_logits, labels, self.kd_hardness, self.kd_temperature)
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.pruner is not None:
            self.pruner.masks.load(resume_from_checkpoint)
            self.pruner.current_sparsity = self.pruner.masks.sparsity()
