"""Registry of target architectures that a pipeline can rebuild at generation time.

An architecture is described by a JSON-able spec ``{"name": ..., "config": {...}}``
so that a zoo or a pipeline stores it and `build_model` rebuilds a fresh module.
The name is a key of `ARCHITECTURES` (an `Architecture` entry each), or
``"package.module:callable"`` for a user's own builder, imported on use and not registered. Importing it
runs code, so such a name needs the user's consent (`d2nwg.security`: ``--trust-remote-code``,
``trust_remote_code=True``); registering the builder with `register_architecture` needs none.

Built-in entries:

=================  ===========================================================  ==================
name               builds                                                      export_folder
=================  ===========================================================  ==================
mlp                `MLP`, a ReLU classifier ``in_features -> hidden -> K``     none
text-adapter       `d2nwg.targets.text_classifier.modeling.TextAdapterClassifier` (lazy import)  PEFT folder + head
causal-lm-adapter  `d2nwg.targets.causal_lm.modeling.CausalLMAdapter` (lazy import)            PEFT folder naming its base
=================  ===========================================================  ==================

An entry's optional ``export_folder(weights, spec, out)`` hook writes a standard folder
next to `d2nwg generate`'s own files (e.g. a PEFT adapter that ``PeftModel.from_pretrained``
loads). Users register their own with `register_architecture`.

Example:
    >>> from d2nwg.targets.architectures import build_model
    >>> net = build_model({"name": "mlp", "config": {"in_features": 64, "hidden": [32], "num_classes": 5}})
    >>> type(net).__name__
    'MLP'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from d2nwg.registry import Registry
from d2nwg.security import RemoteCodeError, TRUST_FLAG, code_name_allowed

ExportFolder = Callable[[Mapping, Mapping, Path], Path]
"""``export_folder(weights, architecture_spec, out) -> out``: writes a standard folder for one weight set."""


@dataclass(frozen=True)
class Architecture:
    """A registered target architecture.

    Args:
        name: the registry name stored in zoos and pipelines, e.g. ``"mlp"``.
        build: ``build(**config) -> nn.Module``; a class or a function.
        export_folder: optional hook ``(weights, spec, out) -> out`` that `d2nwg generate`
            calls to write a standard folder (e.g. a PEFT adapter) for the chosen weight set.
    """

    name: str
    build: Callable[..., nn.Module]
    export_folder: ExportFolder | None = None


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
# Each family's entry lives next to its class (targets/<family>/) and is imported on first lookup, so the
# heavy ones (transformers/peft) load only when used.
ARCHITECTURES.register_lazy("text-adapter", "d2nwg.targets.text_classifier.modeling:ARCHITECTURE")
ARCHITECTURES.register_lazy("causal-lm-adapter", "d2nwg.targets.causal_lm.modeling:ARCHITECTURE")
ARCHITECTURES.register_lazy("mlp", "d2nwg.targets.mlp.model:ARCHITECTURE")

LEGACY_NAMES: dict[str, str] = {"d2nwg.text_adapter:TextAdapterClassifier": "text-adapter"}
"""``"module:callable"`` names stored by older zoos and pipelines -> the registered entry that replaced them."""


def register_architecture(name: str, *, export_folder: ExportFolder | None = None) -> Callable:
    """Decorator registering a model builder (class or function) as architecture ``name``.

    Args:
        name: the registry name; zoos and pipelines store it in their architecture spec.
        export_folder: optional ``(weights, spec, out) -> out`` hook (see `Architecture`).

    Returns:
        A decorator that registers ``Architecture(name, builder, export_folder)`` and
        returns the builder unchanged.

    Raises:
        ValueError: ``name`` is already registered.

    Example:
        >>> @register_architecture("tiny-cnn")                      # doctest: +SKIP
        ... class TinyCNN(nn.Module): ...
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES.register(name, Architecture(name, builder, export_folder))
        return builder

    return wrap


def resolve_architecture(name: str) -> Architecture:
    """The `Architecture` of a spec name: registered, legacy (`LEGACY_NAMES`) or ``"module:callable"``.

    A ``"module:callable"`` name is imported from the user's environment and wrapped in an
    unregistered `Architecture` without an export hook, only where the user consented
    (`d2nwg.security.code_name_allowed`): a zoo or pipeline opened with ``trust_remote_code=True``, a name
    passed to `d2nwg.ingest.build.ingest`, or a `d2nwg.security.trust_remote_code` block.

    Raises:
        RemoteCodeError: a ``"module:callable"`` name without consent (nothing is imported).
        ValueError: an unknown name (listing the registered ones) or an import that fails.
    """
    name = LEGACY_NAMES.get(name, name)
    if name in ARCHITECTURES:
        return ARCHITECTURES.get(name)
    if ":" not in name:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)} (or use 'module:callable')")
    if not code_name_allowed(name):
        raise RemoteCodeError(f"architecture '{name}' names code in module '{name.partition(':')[0]}'; pass {TRUST_FLAG} to import it")
    module_name, _, attr = name.partition(":")
    try:
        return Architecture(name, getattr(importlib.import_module(module_name), attr))
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import architecture '{name}': {err}") from None


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of a spec name (``resolve_architecture(name).build``)."""
    return resolve_architecture(name).build


def build_model(spec: Mapping) -> nn.Module:
    """Build a fresh module from ``{"name": ..., "config": {...}}``.

    Raises:
        RemoteCodeError: a ``"module:callable"`` name the user has not consented to (`resolve_architecture`).
        ValueError: the spec has no name, the name is unknown, the builder rejects the config, or it
            returns something that is not an ``nn.Module``.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"architecture spec needs a 'name', got {spec!r}")
    builder = resolve_builder(spec["name"])
    config = spec.get("config", {})
    if not isinstance(config, Mapping):
        raise ValueError(f"architecture '{spec['name']}' needs a config object, got {type(config).__name__}")
    try:
        model = builder(**dict(config))
    except TypeError as err:
        raise ValueError(f"architecture '{spec['name']}' rejected its config: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"architecture '{spec['name']}' built a {type(model).__name__}, not a torch nn.Module")
    return model


def folder_exporter(spec: Mapping) -> ExportFolder | None:
    """The ``export_folder`` hook of the spec's architecture, or None when it has none."""
    return resolve_architecture(spec["name"]).export_folder
