"""Registry of target architectures that a pipeline can rebuild at generation time.

An architecture is described by a JSON-able spec ``{"name": ..., "config": {...}}``
so that a zoo or a pipeline stores it and `build_model` rebuilds a fresh module.
Users add their own with `register_architecture` or pass ``"module:callable"``.
A builder may also offer ``export_folder(weights, spec, out)``: `d2nwg generate`
calls it to write a standard folder next to its own files (e.g. a PEFT adapter).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import nn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str) -> Callable:
    """Decorator adding a model builder to the registry under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = builder
        return builder

    return wrap


@register_architecture("mlp")
class MLP(nn.Sequential):
    """A ReLU multi-layer perceptron classifier: ``in_features -> hidden... -> num_classes``.

    Layers are named ``fc0, fc1, ...`` so layout globs such as ``"fc*.weight"`` read naturally.
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (32,), num_classes: int = 5):
        layers: list[tuple[str, nn.Module]] = []
        widths = [in_features, *hidden]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [(f"fc{i}", nn.Linear(a, b)), (f"act{i}", nn.ReLU())]
        layers.append((f"fc{len(hidden)}", nn.Linear(widths[-1], num_classes)))
        super().__init__(OrderedDict(layers))
        self.num_classes = num_classes


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """A registered name, or ``"package.module:callable"`` importable from the user's environment."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import architecture '{name}': {err}") from None
    raise ValueError(f"unknown architecture '{name}'; registered: {sorted(ARCHITECTURES)} (or use 'module:callable')")


def build_model(spec: Mapping) -> nn.Module:
    """Build a fresh module from ``{"name": ..., "config": {...}}``."""
    if "name" not in spec:
        raise ValueError(f"architecture spec needs a 'name', got {dict(spec)}")
    builder = resolve_builder(spec["name"])
    try:
        return builder(**dict(spec.get("config", {})))
    except TypeError as err:
        raise ValueError(f"architecture '{spec['name']}' rejected its config: {err}") from None


def folder_exporter(spec: Mapping) -> Callable[[Mapping, Mapping, Path], Path] | None:
    """The architecture's ``export_folder(weights, spec, out)`` hook, or None when it has none."""
    return getattr(resolve_builder(spec["name"]), "export_folder", None)
