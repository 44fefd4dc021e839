"""YAML recipes: one per paper's method, shipped in the package, overridable from the CLI.

A recipe is validated strictly: an unknown key, a wrong type or an out-of-range value is
an error that names the key and the fix, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from sparsebert.allocation import ALLOCATIONS
from sparsebert.errors import SparseBertError, check_sparsity
from sparsebert.schedules import GradualSchedule

METHODS = ("dense", "gmp", "movement", "soft-movement", "smp-l", "smp-s", "mask-train")
# Methods whose masks are learned in the forward pass (W ⊙ M(S)); they need a `masks` section.
LEARNED_METHODS = ("movement", "soft-movement", "smp-l", "smp-s", "mask-train")
LEARNED_ALLOCATIONS = ("uniform", "global", "smp-s")
HEADS = ("classifier", "auto", "prompt")

# What each learned-mask method fixes; a recipe that contradicts it is an error, because it
# would no longer be that paper's method (use another method name instead).
_METHOD_RULES: dict[str, dict[str, Any]] = {
    "movement": {"binarizer": ("topk",), "train_weights": True, "allocation": ("uniform", "global")},
    "soft-movement": {"binarizer": ("sigmoid-threshold",), "train_weights": True,
                      "allocation": ("uniform",)},
    "smp-l": {"binarizer": ("topk",), "train_weights": False, "allocation": ("uniform",)},
    "smp-s": {"binarizer": ("topk",), "train_weights": False, "allocation": ("smp-s",)},
    "mask-train": {"binarizer": ("threshold",), "train_weights": False, "allocation": ("uniform",),
                   "init": ("magnitude-hard", "magnitude-soft")},
}
# Defaults of the masks section that depend on the method (a recipe may still set any of them).
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "movement": {"binarizer": "topk", "train_weights": True},
    "soft-movement": {"binarizer": "sigmoid-threshold", "threshold": 0.1, "train_weights": True},
    "smp-l": {"binarizer": "topk", "train_weights": False, "head": "auto"},
    "smp-s": {"binarizer": "topk", "train_weights": False, "head": "auto"},
    "mask-train": {"binarizer": "threshold", "init": "magnitude-hard", "threshold": 0.01,
                   "train_weights": False},
}


@dataclass
class ScheduleConfig:
    init_sparsity: float = 0.7
    start: float = 0.0
    end: float = 0.7
    frequency: float = 0.1


@dataclass
class LRConfig:
    rewarm: bool = True
    final_ratio: float = 0.1


@dataclass
class DistillationConfig:
    enabled: bool = True
    hardness: float = 1.0
    temperature: float = 2.0


@dataclass
class PenaltyConfig:
    """λ_t · mean over matrices of ||σ(S)||_1 / numel, λ_t ramping cubically from 0 to ``lambda``
    over the schedule's [start, end] (SMP, soft movement). YAML key: ``lambda``."""

    lambda_: float = field(default=0.0, metadata={"key": "lambda"})


@dataclass
class MasksConfig:
    """The learned-mask section (methods in LEARNED_METHODS only)."""

    binarizer: str = "topk"  # topk | threshold | sigmoid-threshold
    init: str = "zeros"  # zeros | magnitude | magnitude-hard | magnitude-soft
    threshold: float = 0.0  # φ (threshold) or the final τ (sigmoid-threshold)
    score_lr: float = 1e-2
    train_weights: bool = True
    train_head: bool = True  # with frozen weights: does the classification head train?
    head: str = "classifier"  # classifier | auto (MLM head + prompt if there is one) | prompt
    realloc_temperature: float = 1.0  # SMP-S: p in σ(S/p)
    final_hold: float = 0.0  # last fraction of training with the exact top-k mask at the target
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)


@dataclass
class Recipe:
    name: str = "custom"
    method: str = "gmp"
    targets: list[str] = field(default_factory=lambda: ["encoder-linears"])
    allocation: str = "global"
    sparsity: float = 0.9
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    masks: MasksConfig | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def learned(self) -> bool:
        return self.method in LEARNED_METHODS

    def gradual_schedule(self) -> GradualSchedule:
        return GradualSchedule(final_sparsity=self.sparsity, **dataclasses.asdict(self.schedule))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.masks is not None:
            out["masks"]["penalty"] = {"lambda": self.masks.penalty.lambda_}
        return out


_SECTIONS = {"schedule": ScheduleConfig, "lr": LRConfig, "distillation": DistillationConfig}


def available_recipes() -> list[str]:
    folder = resources.files("sparsebert") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _unknown_key(key: str, allowed: list[str], where: str) -> SparseBertError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return SparseBertError(f"{where}: unknown key '{key}'{hint}; allowed keys: {', '.join(allowed)}")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise SparseBertError(f"{where} must be true or false, got {value!r}")
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SparseBertError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise SparseBertError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build_section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SparseBertError(f"{where} must be a mapping of keys to values, got {data!r}")
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), where)
        f = fields[key]
        if f.name in _NESTED.get(cls.__name__, {}):
            kwargs[f.name] = _build_section(_NESTED[cls.__name__][f.name], value, f"{where}.{key}")
            continue
        kwargs[f.name] = _coerce(value, f.type if not isinstance(f.type, str)
                                 else {"float": float, "bool": bool, "str": str}.get(f.type),
                                 f"{where}.{key}")
    return cls(**kwargs)


_NESTED: dict[str, dict[str, type]] = {"MasksConfig": {"penalty": PenaltyConfig}}


def _check_masks(r: Recipe, source: str) -> None:
    """Validate the `masks` section against the method and the allowed values."""
    from sparsebert.learned_masks import BINARIZERS, SCORE_INITS

    m, where = r.masks, f"{source}: masks"
    if m.binarizer not in BINARIZERS:
        raise SparseBertError(
            f"{where}.binarizer: unknown '{m.binarizer}'; use one of {', '.join(BINARIZERS)}"
        )
    if m.init not in SCORE_INITS:
        raise SparseBertError(f"{where}.init: unknown '{m.init}'; use one of {', '.join(SCORE_INITS)}")
    if m.head not in HEADS:
        raise SparseBertError(f"{where}.head: unknown '{m.head}'; use one of {', '.join(HEADS)}")
    if m.score_lr <= 0:
        raise SparseBertError(f"{where}.score_lr must be > 0, got {m.score_lr:g}")
    if m.realloc_temperature <= 0:
        raise SparseBertError(f"{where}.realloc_temperature must be > 0, got {m.realloc_temperature:g}")
    if not 0.0 <= m.final_hold < 1.0:
        raise SparseBertError(f"{where}.final_hold must be a fraction of training in [0, 1)")
    if m.penalty.lambda_ < 0:
        raise SparseBertError(f"{where}.penalty.lambda must be >= 0, got {m.penalty.lambda_:g}")
    if m.binarizer == "sigmoid-threshold" and not 0.0 < m.threshold < 1.0:
        raise SparseBertError(f"{where}.threshold: τ of the sigmoid threshold must be in (0, 1)")
    if m.init == "magnitude-hard" and m.threshold <= 0:
        raise SparseBertError(f"{where}.threshold: magnitude-hard init needs φ > 0 (e.g. 0.01)")
    rules = _METHOD_RULES[r.method]
    if m.binarizer not in rules["binarizer"]:
        raise SparseBertError(
            f"{where}.binarizer: method '{r.method}' uses {' or '.join(rules['binarizer'])}, "
            f"not '{m.binarizer}'"
        )
    if m.train_weights != rules["train_weights"]:
        what = "trains the weights" if rules["train_weights"] else "freezes the weights (only scores learn)"
        raise SparseBertError(
            f"{where}.train_weights: method '{r.method}' {what}; set train_weights: "
            f"{str(rules['train_weights']).lower()}"
        )
    if r.allocation not in rules["allocation"]:
        raise SparseBertError(
            f"{source}: allocation '{r.allocation}' is not available for method '{r.method}'; "
            f"use {' or '.join(rules['allocation'])}"
        )
    if "init" in rules and m.init not in rules["init"]:
        raise SparseBertError(f"{where}.init: method '{r.method}' uses {' or '.join(rules['init'])}")
    if r.lr.rewarm:
        raise SparseBertError(
            f"{source}: lr.rewarm re-warms the LR at GMP's pruning steps; learned-mask methods "
            "change their masks every step, set lr.rewarm: false"
        )


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a parsed recipe mapping and build a `Recipe`."""
    if not isinstance(data, dict):
        raise SparseBertError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(Recipe)]
    for key in data:
        if key not in allowed:
            raise _unknown_key(key, allowed, source)
    r = Recipe()
    r.name = _coerce(data.get("name", r.name), str, f"{source}: name")
    r.method = _coerce(data.get("method", r.method), str, f"{source}: method")
    if r.method not in METHODS:
        raise SparseBertError(f"{source}: unknown method '{r.method}'; known methods: {', '.join(METHODS)}")
    targets = data.get("targets", r.targets)
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
        raise SparseBertError(f"{source}: targets must be a list of presets or regexes, got {targets!r}")
    r.targets = targets
    default_alloc = _METHOD_RULES[r.method]["allocation"][0] if r.method in _METHOD_RULES else r.allocation
    r.allocation = _coerce(data.get("allocation", default_alloc), str, f"{source}: allocation")
    allowed_alloc = LEARNED_ALLOCATIONS if r.method in LEARNED_METHODS else ALLOCATIONS
    if r.allocation not in allowed_alloc:
        raise SparseBertError(
            f"{source}: unknown allocation '{r.allocation}' for method '{r.method}'; "
            f"use one of {', '.join(allowed_alloc)}"
        )
    r.sparsity = check_sparsity(data.get("sparsity", r.sparsity), f"{source}: sparsity")
    for key, cls in _SECTIONS.items():
        setattr(r, key, _build_section(cls, data.get(key), f"{source}: {key}"))
    training = data.get("training") or {}
    if not isinstance(training, dict):
        raise SparseBertError(f"{source}: training must be a mapping of TrainingArguments fields")
    from transformers import TrainingArguments

    ta_fields = [f.name for f in dataclasses.fields(TrainingArguments)]
    for key in training:
        if key not in ta_fields:
            raise _unknown_key(key, ta_fields, f"{source}: training (TrainingArguments)")
    r.training = dict(training)
    if r.method in LEARNED_METHODS:
        given = data.get("masks")
        masks = {**_METHOD_DEFAULTS[r.method], **given} if isinstance(given, dict) else given
        r.masks = _build_section(MasksConfig, masks or _METHOD_DEFAULTS[r.method], f"{source}: masks")
        if "rewarm" not in (data.get("lr") or {}):
            r.lr.rewarm = False  # GMP's default; learned masks change every step
        _check_masks(r, source)
    elif data.get("masks") is not None:
        raise SparseBertError(
            f"{source}: a masks section is only for learned-mask methods ({', '.join(LEARNED_METHODS)}), "
            f"not for method '{r.method}'"
        )
    if r.method != "dense":
        r.gradual_schedule()  # validates the schedule's ranges
    if not 0.0 <= r.distillation.hardness <= 1.0:
        raise SparseBertError(f"{source}: distillation.hardness must be in [0, 1]")
    if r.distillation.temperature <= 0:
        raise SparseBertError(f"{source}: distillation.temperature must be > 0")
    return r


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SparseBertError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a shipped recipe by name (e.g. ``gmp``) or a YAML file, then apply overrides.

    Overrides are ``dotted.key=value`` strings, the value parsed as YAML
    (``schedule.end=0.8``, ``lr.rewarm=false``, ``targets=[encoder-linears,embeddings]``).
    """
    if os.path.isfile(name_or_path):
        path, source = name_or_path, name_or_path
    else:
        if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
            raise SparseBertError(f"recipe file '{name_or_path}' does not exist")
        names = available_recipes()
        if name_or_path not in names:
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SparseBertError(
                f"unknown recipe '{name_or_path}'{hint}: shipped recipes are {', '.join(names)}, "
                "or give the path of a YAML file"
            )
        path = str(resources.files("sparsebert") / "recipes" / f"{name_or_path}.yaml")
        source = f"recipe '{name_or_path}'"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise SparseBertError(f"{source} is not valid YAML: {err}") from None
    for item in overrides or []:
        if "=" not in item:
            raise SparseBertError(f"override '{item}' must look like key=value, e.g. schedule.end=0.8")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(data, dict):
            _set_dotted(data, key.strip(), value)
    return recipe_from_dict(data, source)
