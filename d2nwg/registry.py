"""`Registry`: one name -> entry table for every swappable part of d2nwg.

Target architectures (`d2nwg.targets.architectures.ARCHITECTURES`), adapter types
(`d2nwg.targets.adapters.kinds.ADAPTER_KINDS`), zoo recipes (`model_zoo.RECIPES`) and evaluation
baselines all follow the same pattern: a module-level `Registry`, entries added with
`Registry.register` (directly or as a decorator), looked up with `Registry.get`.

Entries that live in modules with heavy imports are registered *lazily*:
`Registry.register_lazy` records ``"package.module:attribute"`` and the module is
imported the first time the entry is asked for. The registering module then needs no
import of the heavy one, and the entry is still defined next to the code it describes.

Example:
    >>> from d2nwg.registry import Registry
    >>> SHAPES = Registry("shape")
    >>> @SHAPES.register("square")
    ... def square(side: float) -> float:
    ...     return side * side
    >>> SHAPES.get("square")(3.0)
    9.0
    >>> "square" in SHAPES, SHAPES.names()
    (True, ['square'])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry table that refuses duplicates and names the known entries on a miss.

    Args:
        kind: what the entries are, in words (``"architecture"``, ``"zoo recipe"``); it
            appears in error messages, e.g. ``unknown zoo recipe 'x'; known: [...]``.

    Names are kept in registration order (`names`, iteration), which is the order a CLI
    offers them in; error messages list them sorted.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> "module:attribute", until first use
        self._order: list[str] = []

    # ------------------------------------------------------------------ adding
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry: T | None = None):
        """Add ``entry`` under ``name``; without ``entry``, return a decorator that adds its argument.

        Args:
            name: the public name, e.g. ``"lora"``; must not be registered yet.
            entry: the object to store. Omit it to use ``@registry.register(name)`` as a
                decorator, which stores the decorated object and returns it unchanged.

        Returns:
            ``entry``, or the decorator when ``entry`` is omitted.

        Raises:
            ValueError: ``name`` is already registered (directly or lazily), or is not a
                non-empty string.

        Example:
            >>> KINDS = Registry("adapter kind")
            >>> KINDS.register("lora", dict)        # direct
            <class 'dict'>
            >>> @KINDS.register("miss")             # decorator
            ... def miss_config(r): ...
        """
        if entry is None:

            def wrap(obj: T) -> T:
                return self.register(name, obj)

            return wrap
        self._check_new(name)
        self._entries[name] = entry
        self._order.append(name)
        return entry

    def register_lazy(self, name: str, target: str) -> None:
        """Add an entry that is imported from ``target`` (``"package.module:attribute"``) on first `get`.

        Use it for entries whose module imports heavy optional backends, so that listing
        the registry (e.g. building the CLI parser) stays cheap.

        Args:
            name: the public name; must not be registered yet.
            target: ``"package.module:attribute"`` naming the entry object.

        Raises:
            ValueError: ``name`` is already registered, or ``target`` has no ``":"``.
        """
        module, sep, attribute = target.partition(":")
        if not (sep and module and attribute):
            raise ValueError(f"lazy {self.kind} '{name}' needs a 'package.module:attribute' target, got {target!r}")
        self._check_new(name)
        self._lazy[name] = target
        self._order.append(name)

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._order:
            raise ValueError(f"{self.kind} '{name}' is already registered")

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> T:
        """The entry registered under ``name`` (importing a lazy entry's module on first use).

        Raises:
            ValueError: ``name`` is unknown (the message lists the known names, sorted), or a
                lazy entry's module or attribute cannot be imported.
        """
        if name in self._entries:
            return self._entries[name]
        if name not in self._lazy:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._order)}")
        module, _, attribute = self._lazy[name].partition(":")
        try:
            entry = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import {self.kind} '{name}' from '{self._lazy[name]}': {err}") from None
        self._entries[name] = entry
        del self._lazy[name]
        return entry

    def names(self) -> list[str]:
        """Every registered name, in registration order (lazy entries are not imported)."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._order

    def __iter__(self) -> Iterator[str]:
        """The registered names, in registration order (like iterating a dict)."""
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self._order})"
