"""YAML recipes: one per paper's method, shipped in the package, overridable from the CLI.

A recipe is validated strictly: an unknown key, a wrong type or an out-of-range value is
an error that names the key and the fix, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from importlib import resources
from typing import Any

import yaml

from sparsebert.config import BudgetConfig, DistillationConfig, LRConfig, Recipe, ScheduleConfig
from sparsebert.errors import SparseBertError, check_sparsity

logger = logging.getLogger("sparsebert")

_SECTIONS = {"schedule": ScheduleConfig, "lr": LRConfig, "distillation": DistillationConfig,
             "budget": BudgetConfig}


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


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass type of a nested section field (annotations are strings here)."""
    import typing

    hint = typing.get_type_hints(cls).get(name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


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
        nested = _section_type(cls, f.name)
        if nested is not None:
            kwargs[f.name] = _build_section(nested, value, f"{where}.{key}")
            continue
        kwargs[f.name] = _coerce(value, f.type if not isinstance(f.type, str)
                                 else {"float": float, "bool": bool, "str": str}.get(f.type),
                                 f"{where}.{key}")
    return cls(**kwargs)


def _training_value(value: Any, f: dataclasses.Field, where: str) -> Any:
    """A TrainingArguments value of the field's type: numbers and booleans are checked here,
    not deep inside the Trainer (a string learning rate fails at the first optimizer step)."""
    default = f.default
    if isinstance(default, bool):
        return _coerce(value, bool, where)
    if not isinstance(default, int | float):
        return value
    if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
        try:
            number = float(value)
        except ValueError:
            raise SparseBertError(f"{where} must be a number, got {value!r}") from None
        value = int(number) if isinstance(default, int) and number.is_integer() else number
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SparseBertError(f"{where} must be a number, got {value!r}")
    return value


def _generic_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe) if f.name != "sections"]


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a parsed recipe mapping and build a `Recipe`.

    The schema is assembled from what is registered: the generic keys every method shares,
    plus the sections the named method declares (with its defaults), its allocations, and
    its own rules (`PruningMethod.validate_recipe`)."""
    from sparsebert.criteria import CRITERIA
    from sparsebert.methods.base import METHODS

    if not isinstance(data, dict):
        raise SparseBertError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    r = Recipe()
    r.name = _coerce(data.get("name", r.name), str, f"{source}: name")
    r.method = _coerce(data.get("method", r.method), str, f"{source}: method")
    if r.method not in METHODS:
        raise SparseBertError(
            f"{source}: unknown method '{r.method}'; known methods: {', '.join(METHODS.names())}"
        )
    method = METHODS.get(r.method)
    allowed = _generic_keys() + list(method.sections)
    for key in data:
        if key not in allowed:
            owners = [m for m in METHODS.names() if key in METHODS.get(m).sections]
            if owners:
                label = getattr(METHODS.get(owners[0]).sections[key], "owners", "the methods")
                raise SparseBertError(
                    f"{source}: a {key} section is only for {label} ({', '.join(owners)}), "
                    f"not for method '{r.method}'"
                )
            raise _unknown_key(key, allowed, source)
    targets = data.get("targets", r.targets)
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
        raise SparseBertError(f"{source}: targets must be a list of presets or regexes, got {targets!r}")
    r.targets = targets
    r.allocation = _coerce(data.get("allocation", method.allocations[0]), str, f"{source}: allocation")
    if r.allocation not in method.allocations:
        raise SparseBertError(
            f"{source}: allocation '{r.allocation}' is not available for method '{r.method}'; "
            f"use {' or '.join(method.allocations)}"
        )
    r.sparsity = check_sparsity(data.get("sparsity", r.sparsity), f"{source}: sparsity")
    if not method.prunes:
        if data.get("sparsity", 0.0) != 0.0:
            raise SparseBertError(
                f"{source}: method '{r.method}' has no target sparsity of its own (it keeps the "
                "starting model's zeros); drop sparsity / --sparsity, or use a pruning recipe such as gmp"
            )
        r.sparsity = 0.0
    r.criterion = _coerce(data.get("criterion", r.criterion), str, f"{source}: criterion")
    if r.criterion not in CRITERIA:
        raise SparseBertError(
            f"{source}: unknown criterion '{r.criterion}'; known criteria: {', '.join(CRITERIA.names())}"
        )
    if "criterion" in data and not method.uses_criterion:
        raise SparseBertError(
            f"{source}: method '{r.method}' does not use a criterion (its masks are "
            f"{'learned' if method.sections else 'not pruned by scores'}); drop the criterion key"
        )
    _criterion_options_and_pattern(r, data, method, source)
    for key, cls in _SECTIONS.items():
        setattr(r, key, _build_section(cls, data.get(key), f"{source}: {key}"))
    if "rewarm" not in (data.get("lr") or {}):
        r.lr.rewarm = method.lr_rewarm_default
    training = data.get("training") or {}
    if not isinstance(training, dict):
        raise SparseBertError(f"{source}: training must be a mapping of TrainingArguments fields")
    from transformers import TrainingArguments

    ta_fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    for key in training:
        if key not in ta_fields:
            raise _unknown_key(key, list(ta_fields), f"{source}: training (TrainingArguments)")
    r.training = {k: _training_value(v, ta_fields[k], f"{source}: training.{k}") for k, v in training.items()}
    for key, cls in method.sections.items():
        given = data.get(key)
        defaults = method.section_defaults.get(key, {})
        merged = {**defaults, **given} if isinstance(given, dict) else (given or defaults)
        r.sections[key] = _build_section(cls, merged, f"{source}: {key}")
    if method.prunes:
        if r.schedule.init_sparsity > r.sparsity and not method.uses_criterion:
            # learned masks (mask training at <= 70%): the first step is the target, one-shot
            logger.info("%s: schedule.init_sparsity %g is above the target %g: the first step prunes to %g",
                        source, r.schedule.init_sparsity, r.sparsity, r.sparsity)
            r.schedule.init_sparsity = r.sparsity  # what runs is what sparsebert.json records
        elif r.schedule.init_sparsity >= r.sparsity > 0.0 and method.uses_criterion:
            # GMP*'s big first step (70%) is for targets above it. At or below it, jumping to the
            # target at the first step is one-shot magnitude pruning, which costs far more than a
            # gradual run (SST-2 at 50%, 100 steps: 71.9 vs 77.5 with a cubic from 0; bench/peers.py):
            # the schedule then starts from 0, cubic to the target (Zhu & Gupta's GMP).
            logger.info("%s: schedule.init_sparsity %g is not below the target %g: pruning gradually "
                        "from 0 instead (cubic to the target)", source, r.schedule.init_sparsity, r.sparsity)
            r.schedule.init_sparsity = 0.0  # what runs is what sparsebert.json records
        r.gradual_schedule()  # validates the schedule's ranges
    if not 0.0 <= r.distillation.hardness <= 1.0:
        raise SparseBertError(f"{source}: distillation.hardness must be in [0, 1]")
    if r.distillation.temperature <= 0:
        raise SparseBertError(f"{source}: distillation.temperature must be > 0")
    for key in ("hidden", "attention"):
        if getattr(r.distillation, key) < 0:
            raise SparseBertError(f"{source}: distillation.{key} is a loss weight: it must be >= 0 (0 = off)")
    from sparsebert.budgets import check_budget

    check_budget(r, method, source)
    method.validate_recipe(r, source)
    return r


def _criterion_options_and_pattern(r: Recipe, data: dict[str, Any], method: Any, source: str) -> None:
    """``criterion_options`` (the criterion's Options dataclass) and ``pattern`` ("N:M", which
    fixes the sparsity at 1 - N/M), for methods that prune by a criterion."""
    from sparsebert.allocation import parse_pattern, pattern_sparsity
    from sparsebert.criteria import CRITERIA

    for key in ("criterion_options", "pattern"):
        if data.get(key) is not None and not method.uses_criterion:
            raise SparseBertError(f"{source}: {key} is for methods that prune by a criterion (gmp), "
                                  f"not for method '{r.method}'")
    given = data.get("criterion_options")
    if given is not None:
        options_cls = getattr(CRITERIA.get(r.criterion), "Options", None)
        if options_cls is None:
            raise SparseBertError(f"{source}: criterion '{r.criterion}' takes no criterion_options")
        r.criterion_options = _build_section(options_cls, given, f"{source}: criterion_options")
    pattern = data.get("pattern")
    if pattern is None:
        return
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        raise SparseBertError(
            f"{source}: pattern must be quoted, e.g. pattern: \"2:4\" (unquoted, YAML reads 2:4 as "
            f"the base-60 number {pattern})"
        )
    n, m = parse_pattern(pattern, f"{source}: pattern")
    r.pattern = f"{n}:{m}"
    final = pattern_sparsity(n, m)
    if abs(r.sparsity - final) > 1e-9:
        raise SparseBertError(
            f"{source}: pattern {n}:{m} keeps {n} of every {m} weights, i.e. sparsity {final:g}, but "
            f"sparsity is {r.sparsity:g}: set sparsity: {final:g} (--sparsity {final:g})"
        )


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
    except UnicodeDecodeError:
        raise SparseBertError(f"{source} is not UTF-8 text (UTF-16?): save the recipe as UTF-8") from None
    for item in overrides or []:
        if "=" not in item:
            raise SparseBertError(f"override '{item}' must look like key=value, e.g. schedule.end=0.8")
        key, raw = item.split("=", 1)
        try:
            if key.strip() == "pattern":  # unquoted, YAML reads 2:4 as the base-60 number 124
                value = None if raw.strip().lower() in ("", "null", "~", "none") else raw.strip()
            else:
                value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(data, dict):
            _set_dotted(data, key.strip(), value)
    return recipe_from_dict(data, source)
