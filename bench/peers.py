"""Peers side by side (issue 12, item 7): the same model, data and budget pruned by other toolkits.

- ``torch.ao``: `torch.ao.pruning.WeightNormSparsifier` over the encoder linears (Q, K, V,
  attention output, FFN in / out: sparsebert's ``encoder-linears``), unstructured (block
  ``(1, 1)``, one zero per block: each matrix pruned to exactly ``round(S * numel)`` zeros by
  |w|, uniform over the matrices), its sparsity level driven by torch's cubic scheduler
  `torch.ao.pruning.CubicSL` (Zhu & Gupta: s_t = s_f + (s_0 - s_f)(1 - t / n)^3, s_0 = 0),
  during fine-tuning with a plain Hugging Face `Trainer`. A `TrainerCallback` does what the
  torch docs' loop does: ``sparsifier.step()`` (masks from the current level) and
  ``scheduler.step()`` (next level); here at every pruning event (every ``frequency`` of
  training until ``end``, like sparsebert's GMP schedule), ``squash_mask()`` at the end.
  Optional logit KD from a teacher (sparsebert's KD loss, T = 2, hardness 1).
- ``llmc-sparsegpt`` / ``llmc-wanda``: llm-compressor's one-shot `SparseGPTModifier` /
  `WandaPruningModifier`. llm-compressor 0.14 pins transformers <= 5.17, so it runs from its
  own virtual environment (``bench/work/peers/llmc-venv``, built on demand by
  `ensure_llmc_venv`) as a subprocess: `bench/peers_llmcompressor.py`. The calibration
  examples are sparsebert's (`sparsebert.oneshot.calibration_batches`: the same seeded sample
  of the task's training set, the same tokenisation), one example per batch (so that no
  padding enters llm-compressor's statistics), passed as a file.
- ``sparsebert`` counterparts with the same inputs: `run_sparsebert_oneshot`,
  `run_sparsebert_prune`.

Every ``run_*`` returns one row: ``task``, ``method``, ``target_sparsity``,
``measured_sparsity`` (zeros of the encoder linears, counted from the saved model), ``pattern``,
``metric``, ``value``, ``train_steps``, ``wall_seconds`` (+ details). Every model is evaluated
from its saved folder with `sparsebert.pipeline.evaluate_saved` (plain transformers loading).

Smoke check (one thread; a fine-tuned dense SST-2 model as teacher):

    OMP_NUM_THREADS=1 python bench/peers.py smoke --teacher bench/work/transfer/sst2-dense \\
        --data-dir /work/shared/data --out bench/work/peers/smoke.json --patterns 2:4
    python bench/peers.py build-venv      # only the llm-compressor environment
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work", "peers")
LLMC_VENV = os.path.join(WORK, "llmc-venv")
LLMC_SCRIPT = os.path.join(HERE, "peers_llmcompressor.py")
LLMC_REQUIREMENTS = ("llmcompressor==0.14.0", "torch==2.13.0")
"""llm-compressor 0.14 accepts torch 2.10 .. 2.14: the CPU build of our torch (2.13) is used."""

LLMC_METHODS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}

SCHEDULE = {"start": 0.0, "end": 0.7, "frequency": 0.1}
"""When torch.ao prunes (fractions of training): an event every 10% of training, the last at
70%, then the masks are held — the positions of sparsebert's GMP* recipe."""


# -- shared -----------------------------------------------------------------------------------------------
def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _main_metric(task_name: str) -> str:
    from sparsebert.tasks.base import get_task

    return get_task(task_name).main_metric


def _data(task: str, data_dir: str | None, max_train_samples: int | None = None,
          max_eval_samples: int | None = None, max_seq_length: int = 128):
    from sparsebert.pipeline import DataOptions

    return DataOptions(task, data_dir, max_train_samples, max_eval_samples, max_seq_length)


def evaluate_row(out_dir: str, task: str, data_dir: str | None, max_eval_samples: int | None = None,
                 max_seq_length: int = 128) -> dict[str, Any]:
    """Metric of the saved model in ``out_dir`` (plain transformers loading), the measured
    sparsity of its encoder linears and the N:M patterns they all follow."""
    from sparsebert.models import load_model
    from sparsebert.pipeline import evaluate_saved
    from sparsebert.report import sparsity_report
    from sparsebert.tasks.base import get_task

    result = evaluate_saved(out_dir, _data(task, data_dir, None, max_eval_samples, max_seq_length))
    metric = _main_metric(task)
    nm = sparsity_report(load_model(out_dir, get_task(task), role="evaluate"))["nm"]
    return {"metric": metric, "value": result["metrics"].get(f"eval_{metric}"),
            "measured_sparsity": result["encoder_linear_sparsity"],
            "measured_nm": [k for k, ok in nm.items() if ok]}


# -- torch.ao.pruning -------------------------------------------------------------------------------------
def pruning_events(steps: int, start: float = 0.0, end: float = 0.7, frequency: float = 0.1) -> list[int]:
    """Optimizer steps after which torch.ao's masks are recomputed: every ``frequency`` of
    training from ``start`` (exclusive: the level there is s_0 = 0) until ``end`` (inclusive)."""
    interval = max(1, round(frequency * steps))
    first = round(start * steps) + interval
    last = max(1, min(steps, round(end * steps)))
    events = list(range(first, last + 1, interval))
    if not events or events[-1] != last:
        events.append(last)
    return events


def encoder_linear_config(model) -> list[dict[str, str]]:
    """torch.ao sparsifier config: one ``tensor_fqn`` per sparsebert encoder-linear weight."""
    from sparsebert.targets import select_targets

    return [{"tensor_fqn": name} for name in select_targets(model, "encoder-linears")]


def _callback_class():
    from transformers import TrainerCallback

    class TorchAOPruningCallback(TrainerCallback):
        """``sparsifier.step(); scheduler.step()`` as in torch's docs, at the pruning events.

        The scheduler's time is the event count: its level after event k is
        CubicSL(t = k, t_0 = 0, Δt = 1, n = events): s_f at the last event. The sparsifier
        steps once at the start (level s_0 = 0: all-ones masks), so that every later
        ``scheduler.step()`` is followed by the ``sparsifier.step()`` that applies it."""

        def __init__(self, sparsifier, scheduler, events: list[int]):
            self.sparsifier, self.scheduler, self.events = sparsifier, scheduler, set(events)
            self.levels: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.sparsifier.step()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.events:
                self.scheduler.step()
                self.sparsifier.step()
                self.levels.append((state.global_step, self.scheduler.get_last_sl()[0]))

    return TorchAOPruningCallback


def _kd_trainer_class():
    import torch
    from transformers import Trainer

    from sparsebert.losses import soft_kd

    class KDTrainer(Trainer):
        """A plain Trainer whose loss is (1 - h) task + h KD(T) when a teacher is given."""

        def __init__(self, *args, teacher=None, hardness: float = 1.0, temperature: float = 2.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.hardness, self.temperature = teacher, hardness, temperature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**inputs)
            with torch.no_grad():
                plain = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
                t_logits = self.teacher(**plain).logits
            loss = self.hardness * soft_kd(outputs.logits, t_logits, self.temperature)
            if self.hardness < 1.0:
                loss = loss + (1.0 - self.hardness) * outputs.loss
            return (loss, outputs) if return_outputs else loss

    return KDTrainer


def run_torch_ao(model_path: str, task: str, sparsity: float, steps: int, batch_size: int, lr: float,
                 data_dir: str | None, out_dir: str, max_train_samples: int | None = None,
                 teacher: str | None = None, *, max_seq_length: int = 128,
                 max_eval_samples: int | None = None, schedule: dict[str, float] | None = None,
                 hardness: float = 1.0, temperature: float = 2.0,
                 seed: int = 42, threads: int | None = None) -> dict[str, Any]:
    """Fine-tune ``model_path`` on ``task`` for ``steps`` optimizer steps while torch.ao's
    WeightNormSparsifier (unstructured, per matrix, L2 = |w|) prunes the encoder linears to
    ``sparsity`` on CubicSL's schedule; squash the masks, save a plain HF model in ``out_dir``,
    evaluate it from disk. KD from ``teacher`` when given. Returns one result row."""
    import torch
    from torch.ao.pruning import CubicSL, WeightNormSparsifier
    from transformers import TrainingArguments, set_seed

    from sparsebert.models import load_model, load_tokenizer
    from sparsebert.pipeline import TRAINING_DEFAULTS, prepare_datasets
    from sparsebert.report import sparsity_report

    _threads(threads)
    started = time.time()
    sched = {**SCHEDULE, **(schedule or {})}
    set_seed(seed)
    data = _data(task, data_dir, max_train_samples, max_eval_samples, max_seq_length)
    tokenizer = load_tokenizer(model_path)
    task_obj, train_ds, _, _ = prepare_datasets(data, tokenizer)
    model = load_model(model_path, task_obj)
    teacher_model = None
    if teacher is not None:
        teacher_model = load_model(teacher, task_obj, role="teacher").eval()

    config = encoder_linear_config(model)
    sparsifier = WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, config)
    events = pruning_events(steps, **sched)
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=len(events))
    callback = _callback_class()(sparsifier, scheduler, events)

    keep = ("per_device_eval_batch_size", "train_sampling_strategy", "report_to", "logging_steps")
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, weight_decay=0.0, warmup_steps=0, save_strategy="no", eval_strategy="no",
        seed=seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        **{k: TRAINING_DEFAULTS[k] for k in keep},
    )
    trainer = _kd_trainer_class()(
        model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
        data_collator=task_obj.collator(tokenizer), callbacks=[callback], teacher=teacher_model,
        hardness=hardness, temperature=temperature,
    )
    result = trainer.train()
    sparsifier.squash_mask()
    model = model.cpu()
    measured_in_memory = sparsity_report(model, "encoder-linears")["target_sparsity"]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    train_seconds = time.time() - started
    row = {
        "task": task, "method": "torch.ao-wns-cubic", "target_sparsity": sparsity, "pattern": None,
        **evaluate_row(out_dir, task, data_dir, max_eval_samples, max_seq_length),
        "train_steps": result.global_step, "wall_seconds": time.time() - started,
        "train_seconds": train_seconds, "measured_in_memory": measured_in_memory,
        "peer": {"toolkit": f"torch {torch.__version__}", "sparsifier": "WeightNormSparsifier",
                 "sparse_block_shape": [1, 1], "zeros_per_block": 1, "norm": "L2 (= |w| ranking)",
                 "allocation": "uniform (each matrix to the level)", "scheduler": "CubicSL",
                 "init_sl": 0.0, "pruning_events": events, "levels": callback.levels,
                 "lr_schedule": "linear decay, no warm-up", "teacher": teacher,
                 "kd": {"hardness": hardness, "temperature": temperature} if teacher else None},
        "model": model_path, "out_dir": out_dir,
    }
    with open(os.path.join(out_dir, "peer.json"), "w") as f:
        json.dump(row, f, indent=2, default=str)
    return row


# -- llm-compressor (its own venv) --------------------------------------------------------------------------
def llmc_python(venv: str = LLMC_VENV) -> str | None:
    """The llm-compressor venv's python, or None when the venv has not been built."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        return None
    found = glob.glob(os.path.join(venv, "lib", "python*", "site-packages", "llmcompressor", "__init__.py"))
    return python if found else None


def ensure_llmc_venv(venv: str = LLMC_VENV, log: str | None = None) -> str:
    """Build the llm-compressor venv when missing (``python -m venv`` + pip from the local
    mirror); returns its python."""
    python = llmc_python(venv)
    if python is not None:
        return python
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    log = log or os.path.join(os.path.dirname(venv), "llmc-venv-build.log")
    with open(log, "a") as out:
        if not os.path.isfile(os.path.join(venv, "bin", "python")):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, stdout=out, stderr=out)
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        done = subprocess.run(pip + list(LLMC_REQUIREMENTS), stdout=out, stderr=out)
    python = llmc_python(venv)
    if done.returncode != 0 or python is None:
        raise RuntimeError(f"building the llm-compressor venv at {venv} failed: see {log}")
    return python


def write_calibration(model_path: str, task: str, data_dir: str | None, path: str, samples: int = 128,
                      max_seq_length: int = 128, seed: int = 0) -> int:
    """sparsebert's calibration sample (same seed, same tokenisation), one example per batch,
    saved with `torch.save` as a list of {input_ids, attention_mask, token_type_ids} [1, L]."""
    import torch

    from sparsebert.models import load_tokenizer
    from sparsebert.oneshot import calibration_batches
    from sparsebert.tasks.base import get_task

    names = {"input_ids", "attention_mask", "token_type_ids"}
    batches = calibration_batches(get_task(task), load_tokenizer(model_path), data_dir, samples,
                                  max_seq_length, batch_size=1, seed=seed, input_names=names)
    torch.save([{k: v.contiguous() for k, v in b.items()} for b in batches], path)
    return len(batches)


def run_llmcompressor(model_path: str, task: str, method: str, sparsity: float, data_dir: str | None,
                      out_dir: str, *, pattern: str | None = None, calibration_samples: int = 128,
                      max_seq_length: int = 128, max_eval_samples: int | None = None, seed: int = 0,
                      pipeline: str = "sequential", threads: int = 1, venv: str = LLMC_VENV,
                      timeout: float = 3600) -> dict[str, Any]:
    """One-shot SparseGPT or Wanda by llm-compressor (its venv, a subprocess) from the fine-tuned
    ``model_path``; the pruned model saved as a plain HF folder in ``out_dir`` and evaluated here.
    Returns one row; on failure the row has ``error`` (and the subprocess's output tail)."""
    if method not in LLMC_METHODS:
        raise ValueError(f"method must be one of {sorted(LLMC_METHODS)}")
    python = ensure_llmc_venv(venv)
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    calib = os.path.join(out_dir, "calibration.pt")
    n = write_calibration(model_path, task, data_dir, calib, calibration_samples, max_seq_length, seed)
    report = os.path.join(out_dir, "llmc.json")
    cmd = [python, LLMC_SCRIPT, "--model", model_path, "--out", out_dir, "--calibration", calib,
           "--method", method, "--sparsity", str(sparsity), "--pipeline", pipeline,
           "--threads", str(threads), "--report", report]
    if pattern:
        cmd += ["--pattern", pattern]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    with open(os.path.join(out_dir, "llmc.log"), "w") as f:
        f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    row: dict[str, Any] = {
        "task": task, "method": f"llmc-{method}", "target_sparsity": sparsity, "pattern": pattern,
        "metric": _main_metric(task), "value": None, "measured_sparsity": None, "train_steps": 0,
        "calibration_examples": n, "model": model_path, "out_dir": out_dir,
    }
    info = {}
    if os.path.isfile(report):
        with open(report) as f:
            info = json.load(f)
    row["peer"] = info
    if proc.returncode != 0 or not info.get("ok"):
        row["error"] = info.get("error") or f"exit status {proc.returncode}"
        row["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        row["wall_seconds"] = time.time() - started
        return row
    row.update(evaluate_row(out_dir, task, data_dir, max_eval_samples, max_seq_length))
    row["prune_seconds"] = info.get("oneshot_seconds")
    row["wall_seconds"] = time.time() - started
    with open(os.path.join(out_dir, "peer.json"), "w") as f:
        json.dump(row, f, indent=2, default=str)
    return row


# -- sparsebert counterparts ------------------------------------------------------------------------------
def run_sparsebert_oneshot(model_path: str, task: str, criterion: str, sparsity: float | None,
                           data_dir: str | None, out_dir: str, *, pattern: str | None = None,
                           calibration_samples: int = 128, max_seq_length: int = 128,
                           max_eval_samples: int | None = None, seed: int = 0,
                           threads: int | None = None) -> dict[str, Any]:
    """`sparsebert oneshot` with the same calibration sample; one row, evaluated from disk."""
    from sparsebert.oneshot import run_oneshot

    _threads(threads)
    started = time.time()
    info = run_oneshot(model_path, _data(task, data_dir, None, max_eval_samples, max_seq_length), criterion,
                       out_dir, sparsity=sparsity, pattern=pattern, calibration_samples=calibration_samples,
                       seed=seed, overwrite=True)
    row = {"task": task, "method": f"sparsebert-oneshot-{criterion}",
           "target_sparsity": info["target_sparsity"], "pattern": pattern,
           **evaluate_row(out_dir, task, data_dir, max_eval_samples, max_seq_length),
           "train_steps": 0, "prune_seconds": info["oneshot"]["seconds"],
           "calibration_examples": info["oneshot"].get("calibration_examples"),
           "model": model_path, "out_dir": out_dir,
           "wall_seconds": info["wall_seconds"],  # its own run: load, calibrate, prune, evaluate, save
           "wall_seconds_with_reevaluation": time.time() - started}
    return row


def run_sparsebert_prune(model_path: str, task: str, sparsity: float, steps: int, batch_size: int, lr: float,
                         data_dir: str | None, out_dir: str, max_train_samples: int | None = None,
                         teacher: str | None = None, *, recipe: str = "gmp", max_seq_length: int = 128,
                         max_eval_samples: int | None = None, threads: int | None = None,
                         recipe_overrides: tuple[str, ...] = (), label: str | None = None,
                         seed: int = 42) -> dict[str, Any]:
    """`sparsebert prune --recipe gmp` on the budget `run_torch_ao` gets (``recipe_overrides``:
    ``--set`` strings, e.g. ``allocation=uniform``); one row."""
    from sparsebert.pipeline import train_and_prune
    from sparsebert.recipe import load_recipe

    _threads(threads)
    started = time.time()
    rec = load_recipe(recipe, overrides=[f"sparsity={sparsity}", *recipe_overrides])
    overrides = {"max_steps": steps, "per_device_train_batch_size": batch_size, "learning_rate": lr,
                 "save_strategy": "no", "disable_tqdm": True, "seed": seed}
    data = _data(task, data_dir, max_train_samples, max_eval_samples, max_seq_length)
    info = train_and_prune(model_path, data, rec, out_dir, teacher_path=teacher, training_overrides=overrides,
                           overwrite=True)
    method = label or f"sparsebert-{recipe}" + ("+kd" if info.get("teacher") else "")
    row = {"task": task, "method": method, "target_sparsity": sparsity, "pattern": None,
           "recipe_overrides": list(recipe_overrides),
           **evaluate_row(out_dir, task, data_dir, max_eval_samples, max_seq_length),
           "train_steps": info["train_steps"], "budget": info.get("budget"),
           "model": model_path, "teacher": teacher, "out_dir": out_dir,
           "wall_seconds": info["wall_seconds"],  # its own run: load, train, evaluate, save
           "wall_seconds_with_reevaluation": time.time() - started}
    return row


# -- the smoke check -----------------------------------------------------------------------------------------
def _fmt(row: dict[str, Any]) -> str:
    value = "ERROR" if row.get("value") is None else f"{100 * row['value']:.2f}"
    measured = "-" if row.get("measured_sparsity") is None else f"{100 * row['measured_sparsity']:.2f}%"
    return (f"| {row['method']} | {row['target_sparsity']} | {measured} | {row.get('pattern') or '-'} | "
            f"{row['metric']} | {value} | {row.get('train_steps', 0)} | {row.get('wall_seconds', 0):.1f} |")


def smoke(a) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if os.path.isfile(a.out):
        with open(a.out) as f:
            rows = json.load(f)
    done = {(r["method"], r.get("pattern")) for r in rows if r.get("value") is not None}

    def add(row):
        key = (row["method"], row.get("pattern"))
        rows[:] = [r for r in rows if (r["method"], r.get("pattern")) != key] + [row]
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2, default=str)
        print(_fmt(row), flush=True)

    w = os.path.dirname(os.path.abspath(a.out))
    common = {"max_seq_length": a.max_seq_length, "max_eval_samples": a.max_eval_samples}
    if ("dense-teacher", None) not in done:
        add({"task": a.task, "method": "dense-teacher", "target_sparsity": 0.0, "pattern": None,
             **evaluate_row(a.teacher, a.task, a.data_dir, a.max_eval_samples, a.max_seq_length),
             "train_steps": 0, "wall_seconds": 0.0, "model": a.teacher})
    for pattern in [None, *a.patterns]:
        sparsity = a.sparsity if pattern is None else None  # N:M: the pattern fixes the sparsity
        tag = "" if pattern is None else "-" + pattern.replace(":", "of")
        for crit in ("sparsegpt", "wanda"):
            if "oneshot" in a.only and (f"sparsebert-oneshot-{crit}", pattern) not in done:
                add(run_sparsebert_oneshot(a.teacher, a.task, crit, sparsity, a.data_dir,
                                           os.path.join(w, f"sb-{crit}{tag}"), pattern=pattern,
                                           calibration_samples=a.calibration_samples, threads=a.threads,
                                           **common))
            if "llmc" in a.only and (f"llmc-{crit}", pattern) not in done:
                n, m = (int(x) for x in pattern.split(":")) if pattern else (1, 2)
                add(run_llmcompressor(a.teacher, a.task, crit, sparsity or 1 - n / m, a.data_dir,
                                      os.path.join(w, f"llmc-{crit}{tag}"), pattern=pattern,
                                      calibration_samples=a.calibration_samples, threads=a.threads,
                                      pipeline=a.llmc_pipeline, **common))
    budget = (a.teacher, a.task, a.sparsity, a.steps, a.batch_size, a.lr, a.data_dir)
    if "ao" in a.only and ("torch.ao-wns-cubic", None) not in done:
        add(run_torch_ao(*budget, os.path.join(w, "torch-ao"), a.max_train_samples, a.teacher,
                         threads=a.threads, **common))
    if "gmp" in a.only and not any(m.startswith("sparsebert-gmp") for m, _ in done):
        add(run_sparsebert_prune(*budget, os.path.join(w, "sb-gmp"), a.max_train_samples, a.teacher,
                                 threads=a.threads, **common))
    print("| method | target | measured | pattern | metric | value | steps | wall s |")
    for r in rows:
        print(_fmt(r))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build-venv", help=f"build the llm-compressor venv ({LLMC_VENV})")
    s = sub.add_parser("smoke", help="peers vs sparsebert on one small setting")
    s.add_argument("--teacher", required=True, help="a dense model fine-tuned on --task")
    s.add_argument("--task", default="sst2")
    s.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    s.add_argument("--out", default=os.path.join(WORK, "smoke.json"))
    s.add_argument("--sparsity", type=float, default=0.5)
    s.add_argument("--patterns", nargs="*", default=[], help="also one-shot N:M patterns, e.g. 2:4")
    s.add_argument("--calibration-samples", type=int, default=128)
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=5e-5)
    s.add_argument("--max-train-samples", type=int, default=3200)
    s.add_argument("--max-eval-samples", type=int, default=None)
    s.add_argument("--max-seq-length", type=int, default=64)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--llmc-pipeline", default="sequential")
    s.add_argument("--only", nargs="+", default=["oneshot", "llmc", "ao", "gmp"])
    a = p.parse_args(argv)
    if a.command == "build-venv":
        print(ensure_llmc_venv())
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    smoke(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
