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

METHODS = ("dense", "gmp")


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
class Recipe:
    name: str = "custom"
    method: str = "gmp"
    targets: list[str] = field(default_factory=lambda: ["encoder-linears"])
    allocation: str = "global"
    sparsity: float = 0.9
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    training: dict[str, Any] = field(default_factory=dict)

    def gradual_schedule(self) -> GradualSchedule:
        return GradualSchedule(final_sparsity=self.sparsity, **dataclasses.asdict(self.schedule))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), where)
        kwargs[key] = _coerce(value, fields[key].type if not isinstance(fields[key].type, str)
                              else {"float": float, "bool": bool, "str": str}.get(fields[key].type),
                              f"{where}.{key}")
    return cls(**kwargs)


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
    r.allocation = _coerce(data.get("allocation", r.allocation), str, f"{source}: allocation")
    if r.allocation not in ALLOCATIONS:
        raise SparseBertError(
            f"{source}: unknown allocation '{r.allocation}'; use one of {', '.join(ALLOCATIONS)}"
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
    if r.method == "gmp":
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
