"""The identity of a text pipeline's frozen base model, and the check ``d2nwg generate --base`` runs with it.

Generated adapters and the cached sentence features are only meaningful on the base the zoo was built
on. A pipeline therefore records, at export (``target.base_identity`` in ``model_index.json``):

* ``model_class`` and ``model_type``: e.g. ``BertModel`` / ``bert``, ``LlamaForCausalLM`` / ``llama``;
* ``num_layers`` (the repeated blocks, `d2nwg.targets.adapters.kinds.block_list`) and ``hidden_size``;
* ``adapted``: ``{"<layer>.<module>": [out, in]}``, the shape of every linear layer an adapter sits on;
* ``fingerprint``: ``sha256:`` plus 16 hex digits of those linear layers' float32 weights and biases.

`check_base` compares another base with it: a different architecture or shape is one ``UserError`` line
naming each difference (the CLI exits 2, before any sentence is encoded); equal shapes with a different
fingerprint (e.g. a randomly initialised BERT of MiniLM's shapes) give a warning, since the adapters then
sit on weights they were not trained for. Only the adapted layers are fingerprinted: a base that differs
elsewhere (embeddings, other layers) passes the fingerprint check.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from d2nwg.errors import UserError

FINGERPRINT_DIGITS = 16
"""Hex digits of the sha256 kept: 64 bits tell bases apart and keep the error line short."""


def adapter_settings(architecture: Mapping) -> tuple[str, list[str], list[int]] | None:
    """``(base, target_modules, layers)`` of a ``text-adapter`` architecture spec, or None for any other target."""
    from d2nwg.targets.text_classifier.modeling import ARCHITECTURE_NAME, TextAdapterClassifier

    if architecture.get("name") != ARCHITECTURE_NAME:
        return None
    defaults = {k: p.default for k, p in inspect.signature(TextAdapterClassifier).parameters.items()}
    cfg = {**defaults, **dict(architecture.get("config") or {})}
    return str(cfg["base"]), list(cfg["target_modules"]), sorted(int(i) for i in cfg["layers"])


def identity_of(base: str, target_modules: Sequence[str], layers: Sequence[int]) -> dict:
    """The identity of ``base`` (see the module docstring) for adapters on ``target_modules`` of ``layers``.

    Args:
        base: a packaged name, local folder or Hub id (`d2nwg.targets.adapters.frozen_base.cached_base_model` loads it).
        target_modules: linear layer names inside each block, e.g. ``["query", "value"]``.
        layers: adapted block indices; those the base lacks are left out of ``adapted``.

    Raises:
        ValueError: the base cannot be loaded (one line).
    """
    from d2nwg.targets.adapters.frozen_base import cached_base_model
    from d2nwg.targets.adapters.kinds import block_list

    encoder = cached_base_model(base)
    try:
        prefix, num_layers = block_list(encoder)
    except ValueError:  # no stack of blocks at all: nothing an adapter could sit on
        prefix, num_layers = None, 0
    # The linear layers inside the blocks, e.g. "encoder.layer.5.attention.self.query" (BERT).
    linears = {n: m for n, m in encoder.named_modules() if prefix is not None and isinstance(m, nn.Linear)}
    adapted: dict[str, list[int]] = {}
    digest = hashlib.sha256()
    for i in layers:
        for t in target_modules:
            name = next((n for n in linears if n.startswith(f"{prefix}.{i}.") and n.endswith(f".{t}")), None)
            if name is None:
                continue
            key = f"{i}.{t}"
            adapted[key] = list(linears[name].weight.shape)  # [out, in]
            for tensor in (linears[name].weight, linears[name].bias):
                if tensor is not None:
                    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
                    digest.update(f"{key}:{list(data.shape)};".encode())
                    digest.update(data.numpy().tobytes())
    config = encoder.config
    return {
        "model_class": type(encoder).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_layers": num_layers,
        "hidden_size": getattr(config, "hidden_size", None),
        "adapted": adapted,
        "fingerprint": "sha256:" + digest.hexdigest()[:FINGERPRINT_DIGITS],
    }


def base_identity(architecture: Mapping) -> dict | None:
    """The identity of a ``text-adapter`` target's base (what an export records), or None for other targets.

    Raises:
        ValueError: the base cannot be loaded.
    """
    settings = adapter_settings(architecture)
    return None if settings is None else identity_of(*settings)


def differences(recorded: Mapping, candidate: Mapping) -> list[str]:
    """What differs between two identities in architecture and shapes, in words (empty: they fit)."""
    found = []
    if (candidate["model_class"], candidate["model_type"]) != (recorded["model_class"], recorded["model_type"]):
        found.append(
            f"model {candidate['model_class']} ({candidate['model_type']}), not {recorded['model_class']} ({recorded['model_type']})"
        )
    if candidate["num_layers"] != recorded["num_layers"]:
        on = ",".join(map(str, sorted({int(k.split(".")[0]) for k in recorded["adapted"]})))
        found.append(f"{candidate['num_layers']} layers, not {recorded['num_layers']} (the adapters sit on layer {on})")
    if candidate["hidden_size"] != recorded["hidden_size"]:
        found.append(f"hidden size {candidate['hidden_size']}, not {recorded['hidden_size']}")
    missing = [k for k in recorded["adapted"] if k not in candidate["adapted"]]
    if missing:
        found.append(f"no adapted linear layer {', '.join(missing)} (layer.module)")
    shapes = [
        f"{k} {candidate['adapted'][k]}, not {shape}"
        for k, shape in recorded["adapted"].items()
        if k in candidate["adapted"] and list(candidate["adapted"][k]) != list(shape)
    ]
    if shapes:
        more = f" and {len(shapes) - 2} more" if len(shapes) > 2 else ""
        found.append("adapted weight shapes [out, in] " + ", ".join(shapes[:2]) + more)
    return found


def _recorded_identity(target) -> dict | None:
    """The target's recorded identity; for pipelines exported before it was recorded, that of the target's own
    base when it is the packaged one or a local folder here (never a download just for the check)."""
    if target.base_identity is not None:
        return target.base_identity
    settings = adapter_settings(target.architecture)
    if settings is None:
        return None
    from d2nwg.targets.adapters.frozen_base import DEFAULT_BASE

    base = settings[0]
    if base != DEFAULT_BASE and not Path(base).is_dir():
        return None
    try:
        return identity_of(*settings)
    except ValueError:
        return None


def check_base(target, base: str) -> str | None:
    """Check that ``base`` can replace the base of ``target`` (a `d2nwg.zoo.specs.TargetSpec`).

    Args:
        target: the pipeline's target; its ``base_identity`` is what ``base`` is compared with.
        base: the replacement, as the user gave it (a local folder or Hub id).

    Returns:
        A warning line when the shapes fit but the fingerprint of the adapted weights differs, else None
        (also None when the pipeline recorded nothing to compare with and its own base is not here).

    Raises:
        UserError: ``base`` does not fit: one line naming each difference (architecture, layer count,
            hidden size, adapted shapes).
        ValueError: ``base`` cannot be loaded.
    """
    settings = adapter_settings(target.architecture)
    if settings is None:
        return None
    recorded = _recorded_identity(target)
    candidate = identity_of(base, settings[1], settings[2])
    if recorded is None:
        return None
    found = differences(recorded, candidate)
    if found:
        raise UserError(
            f"--base {base} does not fit this pipeline, whose adapters were trained on {settings[0]}: " + "; ".join(found)
        )
    if candidate["fingerprint"] != recorded["fingerprint"]:
        return (
            f"--base {base} has the shapes this pipeline's adapters need but different weights under them "
            f"(fingerprint {candidate['fingerprint']}, recorded {recorded['fingerprint']}); the adapters and features "
            "were made for the original weights, so generated adapters may not work"
        )
    return None
