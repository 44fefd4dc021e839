"""One-shot pruning of a fine-tuned model: no training, a few calibration batches.

`prune_oneshot` prunes the targeted weights of a model in place, to an exact sparsity or an
N:M pattern, with

- ``sparsegpt`` (`sparsebert.sparsegpt`): layer-wise OBS reconstruction, sequential over the
  encoder layers: each layer's calibration inputs come from the already pruned layers
  before it; H = 2 X Xᵀ / tokens per linear (padding left out), shared by the linears that
  read the same input (Q, K, V); every matrix gets the same sparsity. With the option
  ``true_sequential`` the linears of a layer go in the order they run: Q/K/V, then the
  attention output from inputs through the pruned Q/K/V, and so on (one pass per group);
- any other registered criterion (`sparsebert.criteria.CRITERIA`; its ``sparsegpt`` is the
  gradual pruner's form of the solver, here the name means the solver above): ``magnitude``
  (no data), ``wanda`` (activations: layer-wise too, as in its reference, when the allocation is per
  matrix or per row; its own allocation, ``per-row``, by default), ``obert`` (gradients:
  one per calibration example, then the OBS update), or a plugin's. The allocation defaults
  to the criterion's own, else ``uniform`` (one-shot methods prune every matrix alike);
  ``global`` ranks everything together in one pass.

`run_oneshot` is `sparsebert oneshot`: calibration batches from the task's training data
(a seeded random sample, batched by length), the fine-tuned model, pruning, evaluation on
the task's evaluation sets, and a plain Hugging Face model saved with ``sparsebert.json``,
``sparsity.txt`` and ``checksums.json``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsebert.activations import linears_of, token_mask
from sparsebert.allocation import ALLOCATIONS, check_pattern_shape, parse_pattern, pattern_sparsity
from sparsebert.criteria import CRITERIA, Criterion, get_criterion
from sparsebert.errors import SparseBertError, check_sparsity
from sparsebert.sparsegpt import HessianHooks, OneShotSparseGPTOptions, sparsegpt_prune_
from sparsebert.targets import _LAYER_STACK, select_targets

logger = logging.getLogger("sparsebert")

SOLVERS = {"sparsegpt": OneShotSparseGPTOptions}
"""One-shot methods that are not criteria (they reconstruct, layer by layer), with their options."""


def oneshot_methods() -> list[str]:
    """Everything ``--criterion`` accepts: the one-shot solvers and every registered criterion."""
    return sorted(set(SOLVERS) | set(CRITERIA.names()))


def options_class(criterion: str) -> type | None:
    """The options dataclass of a one-shot method or criterion (None: it takes none)."""
    if criterion in SOLVERS:
        return SOLVERS[criterion]
    return getattr(CRITERIA.get(criterion), "Options", None)


# -- calibration data -------------------------------------------------------------------------------
def model_input_names(model: nn.Module) -> set[str]:
    """The keyword arguments ``model.forward`` takes."""
    return set(inspect.signature(model.forward).parameters)


def calibration_batches(
    task: Any, tokenizer: Any, data_dir: str | None, samples: int = 128, max_seq_length: int = 128,
    batch_size: int = 16, seed: int = 0, input_names: Iterable[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``samples`` training examples of ``task`` drawn at random (``seed``), encoded, sorted by
    length and collated into batches (less padding); only the model's inputs are kept."""
    if samples < 1:
        raise SparseBertError(f"--calibration-samples must be >= 1, got {samples}")
    raw = task.load_split("train", data_dir)
    n = min(samples, len(raw))
    if n < samples:
        logger.warning("the %s training set has %d examples: calibrating on all of them", task.name, n)
    raw = raw.shuffle(seed=seed).select(range(n))
    feats = task.encode(raw, tokenizer, max_seq_length)
    names = set(input_names) if input_names is not None else None
    rows = [dict(feats[i]) for i in range(len(feats))]
    rows.sort(key=lambda r: len(r["input_ids"]))
    wanted = (names or set()) | {"label", "labels"}
    rows = [{k: v for k, v in r.items() if names is None or k in wanted} for r in rows]
    collate = task.collator(tokenizer)
    batches = []
    for i in range(0, len(rows), batch_size):
        batch = dict(collate(rows[i : i + batch_size]))
        batches.append({k: v for k, v in batch.items() if names is None or k in names})
    return batches


# -- the encoder layers -------------------------------------------------------------------------------
def layer_stack(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder's layers (``encoder.layer.N``, ``transformer.layer.N``, ``layers.N``), in order."""
    out = []
    for name, module in model.named_modules():
        match = _LAYER_STACK.search(name + ".")
        if match and match.end() == len(name) + 1:
            out.append((name, module))
    return out


class _StopForward(Exception):
    pass


@dataclass
class _Call:
    """One calibration batch at the entrance of one layer: the arguments other than the
    hidden states (attention mask, position embeddings ...) and the batch's token mask."""

    args: tuple
    kwargs: dict[str, Any]
    mask: torch.Tensor | None


_HIDDEN_KEYS = ("hidden_states", "hidden_state", "x")


def _split_hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    for key in _HIDDEN_KEYS:
        if key in kwargs:
            rest = dict(kwargs)
            return rest.pop(key), (), rest
    raise SparseBertError("could not find the hidden states among an encoder layer's arguments")


@torch.no_grad()
def _capture(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batches: Sequence[Mapping[str, Any]],
             device: torch.device) -> tuple[list[torch.Tensor], list[list[_Call]]]:
    """The first layer's input hidden states per batch and every layer's other arguments
    (attention masks, position embeddings: whatever the encoder computes for each layer).

    One forward pass per batch in which the layers do nothing (each returns its input: the
    arguments, not the hidden states, are what is recorded) and the pass stops at the last
    layer, so capturing costs the embeddings only."""
    calls: list[list[_Call]] = [[] for _ in layers]
    first: list[torch.Tensor] = []
    current: dict[str, Any] = {}
    shape: dict[str, Any] = {}

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            hidden, rest, kw = _split_hidden(args, kwargs)
            calls[index].append(_Call(rest, kw, current.get("mask")))
            if index == 0:
                first.append(hidden.detach())
            if index == len(layers) - 1:
                raise _StopForward

        return hook

    def passthrough(layer: nn.Module):
        real = layer.forward

        def forward(*args, **kwargs):
            hidden = _split_hidden(args, kwargs)[0]
            if "out" not in shape:  # what a layer returns: learnt once from a real call
                shape["out"] = real(*args, **kwargs)
            out = shape["out"]
            if torch.is_tensor(out):
                return hidden
            if isinstance(out, tuple):
                return (hidden, *(None for _ in out[1:]))
            return real(*args, **kwargs)

        return forward

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, (_, layer) in enumerate(layers)]
    for _, layer in layers[:-1]:
        layer.forward = passthrough(layer)
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            mask = inputs.get("attention_mask")
            current["mask"] = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
            try:
                model(**inputs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        for _, layer in layers[:-1]:
            del layer.forward
    if any(len(c) != len(batches) for c in calls):
        raise SparseBertError(
            "the encoder layers were not each called once per batch: cannot prune layer-wise"
        )
    return first, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    with token_mask(call.mask):
        out = layer(hidden, *call.args, **call.kwargs)
    if torch.is_tensor(out):
        return out
    return out[0]


# -- pruning ----------------------------------------------------------------------------------------------
def _prune_by_criterion(criterion: Criterion, params: dict[str, nn.Parameter], sparsity: float,
                        allocation: str, pattern: tuple[int, int] | None) -> None:
    from sparsebert.methods.gradual import GradualPruner
    from sparsebert.schedules import GradualSchedule

    schedule = GradualSchedule(final_sparsity=sparsity)
    GradualPruner(params, schedule, allocation, criterion, pattern=pattern).prune_to(sparsity)


def _single_examples(batch: Mapping[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    size = next(iter(batch.values())).shape[0]
    for i in range(size):
        yield {k: v[i : i + 1] for k, v in batch.items()}


def _observe(model: nn.Module, criterion: Criterion, params: dict[str, nn.Parameter],
             batches: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> int:
    """Calibration passes for a criterion that needs activations (forward) or gradients (one
    backward pass per example); returns the number of passes."""
    passes = 0
    if "gradients" in criterion.needs:
        for batch in batches:
            for example in _single_examples(batch):
                model.zero_grad(set_to_none=True)
                out = model(**{k: v.to(device) for k, v in example.items()})
                if getattr(out, "loss", None) is None:
                    raise SparseBertError(
                        f"criterion {criterion.name} needs gradients of the task loss: calibration "
                        "batches must carry labels"
                    )
                out.loss.backward()
                criterion.observe_gradients(params)
                passes += 1
        model.zero_grad(set_to_none=True)
    elif "activations" in criterion.needs:
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
                passes += 1
    return passes


def prune_oneshot(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]] = (),
    criterion: str = "sparsegpt",
    sparsity: float | None = None,
    *,
    pattern: str | tuple[int, int] | None = None,
    allocation: str | None = None,
    targets: str | Iterable[str] = "encoder-linears",
    options: Any = None,
    sequential: bool = True,
) -> dict[str, Any]:
    """Prune ``model``'s targets in place in one shot; return what was done (for ``sparsebert.json``).

    ``batches``: calibration batches (model inputs; ``labels`` too for gradient criteria).
    ``sparsity``: exact fraction pruned (of each matrix, or of all targets with ``global``);
    with ``pattern`` N:M it defaults to 1 - N/M and may not differ. ``options``: the
    criterion's ``Options`` (or `OneShotSparseGPTOptions`) instance. ``sequential``:
    activation-based methods process the encoder layers one after the other on the pruned
    layers' outputs.
    """
    started = time.time()
    nm = parse_pattern(pattern, "--pattern")
    if nm is not None:
        final = pattern_sparsity(*nm)
        if sparsity is not None and abs(sparsity - final) > 1e-9:
            raise SparseBertError(
                f"pattern {nm[0]}:{nm[1]} keeps {nm[0]} of every {nm[1]} weights, i.e. sparsity {final:g}; "
                f"drop --sparsity or give {final:g} (got {sparsity:g})"
            )
        sparsity = final
    if sparsity is None:
        raise SparseBertError("give a sparsity (--sparsity) or an N:M pattern (--pattern)")
    check_sparsity(sparsity)
    solver = criterion.lower() if criterion.lower() in SOLVERS else None
    crit = None if solver else get_criterion(criterion, options)
    if allocation is None:
        allocation = (crit.allocation if crit is not None else None) or "uniform"
    if allocation not in ALLOCATIONS:
        raise SparseBertError(f"unknown allocation '{allocation}': use one of {', '.join(ALLOCATIONS)}")
    if solver and allocation != "uniform":
        raise SparseBertError(f"{solver} prunes every matrix to the same sparsity: use allocation uniform")
    params = select_targets(model, targets)
    if nm is not None:
        for name, p in params.items():
            check_pattern_shape(name, p.shape, *nm)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    layers = layer_stack(model)
    in_layers = {n: next((i for i, (ln, _) in enumerate(layers) if n.startswith(ln + ".")), None)
                 for n in params}
    needs = frozenset() if crit is None else crit.needs
    layerwise = (solver is not None or "activations" in needs) and sequential and allocation != "global"
    if layerwise and any(i is None for i in in_layers.values()):
        outside = [n for n, i in in_layers.items() if i is None]
        if solver:
            raise SparseBertError(
                f"{solver} reconstructs the encoder layers' linears; targets outside them: {outside[:3]}"
            )
        layerwise = False
    if (solver or needs) and not batches:
        raise SparseBertError(f"{criterion} needs calibration batches")
    passes = 0
    try:
        if layerwise:
            passes = _prune_layerwise(model, layers, in_layers, params, batches, device, sparsity, nm,
                                      allocation, solver, crit, options)
        else:
            crit.attach(model, params)
            try:
                passes = _observe(model, crit, params, batches, device)
                _prune_by_criterion(crit, params, sparsity, allocation, nm)
            finally:
                crit.detach()
    finally:
        model.train(was_training)
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p.detach() == 0).sum()) for p in params.values())
    opts = options
    if opts is None:
        opts = SOLVERS[solver]() if solver else getattr(crit, "options", None)
    return {
        "criterion": solver or crit.name,
        "sparsity": sparsity,
        "pattern": f"{nm[0]}:{nm[1]}" if nm else None,
        "allocation": allocation,
        "layerwise": layerwise,
        "options": dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else None,
        "calibration_batches": len(batches),
        "calibration_examples": sum(next(iter(b.values())).shape[0] for b in batches) if batches else 0,
        "calibration_passes": passes,
        "target_sparsity": zeros / total if total else 0.0,
        "seconds": time.time() - started,
    }


@torch.no_grad()
def _groups_in_order(layer: nn.Module, modules: Mapping[str, nn.Linear], hidden: torch.Tensor,
                     call: _Call) -> list[dict[str, nn.Linear]]:
    """``modules`` grouped by the input they read, in the order the layer runs them (one
    forward pass on one calibration batch): Q/K/V, attention output, FFN in, FFN out."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: order.append((n, args[0])))
               for n, m in modules.items()]
    try:
        _run_layer(layer, hidden, call)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, dict[str, nn.Linear]]] = []
    for name, x in order:
        if any(name in g for _, g in groups):
            continue  # a module run twice: its first place counts
        same = next((g for inp, g in groups if inp is x), None)
        if same is None:
            groups.append((x, {name: modules[name]}))
        else:
            same[name] = modules[name]
    missing = {n: m for n, m in modules.items() if not any(n in g for _, g in groups)}
    return [g for _, g in groups] + ([missing] if missing else [])


@torch.no_grad()
def _prune_layerwise(model, layers, in_layers, params, batches, device, sparsity, nm, allocation,
                     solver, crit, options) -> int:
    first, calls = _capture(model, layers, batches, device)
    hidden = first
    passes = 0
    last = max(i for i in in_layers.values())
    for index, (_, layer) in enumerate(layers[: last + 1]):
        mine = {n: p for n, p in params.items() if in_layers[n] == index}
        if mine:
            if solver:
                opts = options or OneShotSparseGPTOptions()
                modules = linears_of(model, mine, solver)
                groups = (_groups_in_order(layer, modules, hidden[0], calls[index][0])
                          if opts.true_sequential else [modules])
                for group in groups:
                    hooks = HessianHooks(group)
                    try:
                        for h, call in zip(hidden, calls[index], strict=True):
                            _run_layer(layer, h, call)
                            hooks.end_call()
                            passes += 1
                    finally:
                        hooks.remove()
                    for name, module in group.items():
                        sparsegpt_prune_(module.weight.data, hooks.hessian(name), sparsity, nm, opts)
                    del hooks
            else:
                crit.attach(model, mine)
                try:
                    for h, call in zip(hidden, calls[index], strict=True):
                        _run_layer(layer, h, call)
                        passes += 1
                    _prune_by_criterion(crit, mine, sparsity, allocation, nm)
                finally:
                    crit.detach()
        if index < last:
            hidden = [_run_layer(layer, h, call) for h, call in zip(hidden, calls[index], strict=True)]
    return passes


# -- the command -------------------------------------------------------------------------------------------
def build_options(criterion: str, items: Sequence[str]) -> Any:
    """``key=value`` strings -> the options dataclass of ``criterion`` (None when none given)."""
    import yaml

    from sparsebert.recipe import _build_section

    if not items:
        return None
    cls = options_class(criterion)
    if cls is None:
        raise SparseBertError(f"criterion {criterion} takes no options")
    data = {}
    for item in items:
        if "=" not in item:
            raise SparseBertError(f"option '{item}' must look like key=value, e.g. block_size=64")
        key, raw = item.split("=", 1)
        try:
            data[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            data[key.strip()] = raw
    return _build_section(cls, data, f"--option ({criterion})")


def run_oneshot(
    model_path: str,
    data: Any,
    criterion: str,
    output_dir: str,
    sparsity: float | None = None,
    pattern: str | None = None,
    allocation: str | None = None,
    targets: Sequence[str] = ("encoder-linears",),
    options: Any = None,
    calibration_samples: int = 128,
    calibration_batch_size: int = 16,
    seed: int = 0,
    eval_batch_size: int = 128,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`sparsebert oneshot`: calibrate, prune, evaluate, save; returns ``sparsebert.json``'s content.
    The output directory is checked first, as for training (another run there needs ``overwrite``)."""
    import tempfile

    from transformers import TrainingArguments, set_seed

    from sparsebert.models import RUN_INFO_FILE, load_model, load_tokenizer
    from sparsebert.pipeline import DataOptions, check_data_options, evaluate_all, load_eval_data
    from sparsebert.preflight import check_positive, prepare_output_dir
    from sparsebert.report import format_report, sparsity_report
    from sparsebert.tasks.base import get_task
    from sparsebert.trainer import SparseTrainer
    from sparsebert.verify import write_checksums

    started = time.time()
    if criterion.lower() not in oneshot_methods():
        raise SparseBertError(
            f"unknown one-shot criterion '{criterion}'; known: {', '.join(oneshot_methods())}"
        )
    check_data_options(data)
    check_positive("--calibration-samples", calibration_samples)
    check_positive("--calibration-batch-size", calibration_batch_size)
    check_positive("--batch-size", eval_batch_size)
    identity = {"task": data.task, "model": model_path, "recipe": f"oneshot-{criterion.lower()}",
                "method": "oneshot", "targets": list(targets), "sparsity": sparsity,
                "max_seq_length": data.max_seq_length}
    prepare_output_dir(output_dir, identity, resume=None, overwrite=overwrite)
    set_seed(seed)
    task = get_task(data.task)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, task, role="evaluate")
    if torch.cuda.is_available():  # where the Trainer evaluates too
        model = model.to("cuda")
    needs_data = criterion.lower() in SOLVERS or bool(CRITERIA.get(criterion).needs)
    batches = []
    if needs_data:
        batches = calibration_batches(task, tokenizer, data.data_dir, calibration_samples,
                                      data.max_seq_length, calibration_batch_size, seed,
                                      model_input_names(model))
    report = prune_oneshot(model, batches, criterion, sparsity, pattern=pattern, allocation=allocation,
                           targets=list(targets), options=options)
    logger.info("one-shot %s: %.1f%% of the targets pruned in %.1f s", report["criterion"],
                100 * report["target_sparsity"], report["seconds"])
    evals = load_eval_data(task, DataOptions(data.task, data.data_dir, None, data.max_eval_samples,
                                             data.max_seq_length, getattr(data, "eval_split", "validation")),
                           tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=eval_batch_size, report_to="none")
        trainer = SparseTrainer(model=model, args=args, processing_class=tokenizer,
                                data_collator=task.collator(tokenizer),
                                preprocess_logits_for_metrics=task.preprocess_logits, task=task)
        results = evaluate_all(trainer, task, evals)
    model = model.cpu()
    rep = sparsity_report(model, list(targets))
    info: dict[str, Any] = {
        "command": "oneshot",
        "model": model_path,
        "task": task.name,
        "data": {**vars(data), "calibration_samples": calibration_samples,
                 "calibration_batch_size": calibration_batch_size, "seed": seed},
        "oneshot": report,
        "target_sparsity": report["sparsity"],
        "wall_seconds": time.time() - started,
        "metrics": next(iter(results.values()), {}),
        "eval_sets": results,
        "sparsity": rep,
    }
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, RUN_INFO_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)
    with open(os.path.join(output_dir, "sparsity.txt"), "w") as f:
        f.write(format_report(rep) + "\n")
    write_checksums(output_dir)  # last: `sparsebert verify` catches any later change
    return info


def run_from_cli(ns: Any) -> int:
    """The ``oneshot`` subcommand (arguments parsed by `sparsebert.cli`)."""
    from sparsebert.pipeline import DataOptions

    data = DataOptions(ns.task, ns.data_dir, None, ns.max_eval_samples, ns.max_seq_length)
    info = run_oneshot(
        ns.model, data, ns.criterion, ns.output_dir, sparsity=ns.sparsity, pattern=ns.pattern,
        allocation=ns.allocation, targets=ns.targets, options=build_options(ns.criterion, ns.option),
        calibration_samples=ns.calibration_samples, calibration_batch_size=ns.calibration_batch_size,
        seed=ns.seed, eval_batch_size=ns.batch_size, overwrite=ns.overwrite,
    )
    report = info["oneshot"]
    summary = {
        "task": info["task"],
        "criterion": report["criterion"],
        "target_sparsity": info["target_sparsity"],
        "measured_sparsity": info["sparsity"]["target_sparsity"],
        "pattern": report["pattern"],
        "allocation": report["allocation"],
        "calibration_examples": report["calibration_examples"],
        "prune_seconds": report["seconds"],
        "wall_seconds": info["wall_seconds"],
        "metrics": info["metrics"],
    }
    if len(info["eval_sets"]) > 1:
        summary["eval_sets"] = info["eval_sets"]
    print(json.dumps(summary, indent=2))
    return 0


__all__ = ["SOLVERS", "calibration_batches", "layer_stack", "prune_oneshot", "run_oneshot"]
