"""Name -> implementation registries for tasks, criteria, pruning methods and loss terms.

Why one small class: each seam (a new task, criterion, method or loss term) should be one
file plus one registry line, and every lookup should fail the same way, with the known
names and a "did you mean". Built-in implementations are imported lazily by module name
(``builtins``), so a registry never imports its implementations at import time and the
implementations can import the registry without a cycle. Third-party ones register
themselves when their module is imported (`load_plugins`, the CLI's ``--plugin``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from sparsebert.errors import SparseBertError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one seam."""

    def __init__(self, kind: str, builtins: Iterable[str] = ()):
        self.kind = kind
        self._builtins = tuple(builtins)
        self._loaded = False
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, item: T, aliases: Iterable[str] = (), replace: bool = False) -> T:
        """Register ``item`` under ``name`` (lower case) and optional other spellings; a second
        registration of a name is an error unless ``replace`` (a plugin that means to override
        a built-in says so)."""
        key = name.lower()
        if key in self._items and not replace and self._items[key] is not item:
            raise SparseBertError(f"a {self.kind} named '{key}' is already registered")
        self._items[key] = item
        for alias in aliases:
            self._aliases[alias.lower()] = key
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@REGISTRY.decorator("name")`` on a class or function."""

        def wrap(item: T) -> T:
            return self.register(name, item)

        return wrap

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return self._key(name) in self._items

    def _key(self, name: str) -> str:
        return self._aliases.get(name.lower(), name.lower())

    def get(self, name: str) -> T:
        self._load_builtins()
        key = self._key(name)
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SparseBertError(
                f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._items))}"
            )
        return self._items[key]


def load_plugins(modules: Iterable[str]) -> None:
    """Import modules that register extra tasks, criteria, methods or loss terms."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise SparseBertError(
                f"plugin '{module}' could not be imported ({err}): give an importable module name "
                "on the Python path, e.g. --plugin mypackage.sparse_tasks"
            ) from None


__all__ = ["Registry", "load_plugins"]
