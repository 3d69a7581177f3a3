"""Adapter targets: LoRA and MiSS (Bone) adapters on a *slice of layers* of a base model.

D2NWG can generate parameter-efficient adapters instead of whole networks: the
weights to generate are the adapter tensors of a few chosen layers. This module
builds those adapters with peft, reads and writes their state_dicts, and saves
standard PEFT folders that ``PeftModel.from_pretrained(base, folder)`` loads.

Adapter kinds are a `d2nwg.registry.Registry` (`ADAPTER_KINDS`), one small config builder
``(r, target_modules, **options) -> peft config`` each; add one with `register_adapter`:

==========  ===========================================  ==================================
kind        peft config                                  tensors per target ``nn.Linear``
==========  ===========================================  ==================================
lora        ``LoraConfig(r, lora_alpha, ...)``            ``lora_A.weight`` (r, in),
                                                          ``lora_B.weight`` (out, r)
miss        ``MissConfig(r, init_weights=True)``          ``miss_block`` (r, out)
miss-bat    ``MissConfig(r, init_weights="bat")``         ``miss_block`` (out // r, r, r)
==========  ===========================================  ==================================

Keys follow `peft.get_peft_model_state_dict`, e.g.
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (no adapter name).
peft 0.14–0.18 called MiSS "Bone" (``BoneConfig``, keys ``…bone_block``, same shapes);
`convert_legacy_bone` maps those checkpoints to MiSS keys, and `convert_bone_folder` (``d2nwg adapters
convert-bone IN OUT``) a whole legacy Bone adapter folder to a MiSS one.

Layers are chosen by index (``"4,5"``), ``"all"``, or ``"auto:top25%"`` / ``"auto:2"``,
which ranks layers by the signal-to-noise ratio of their target weights the way
Spectrum does (see `weight_snr`). peft is imported only when an adapter is built.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM          # doctest: +SKIP
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=4, ...))  # doctest: +SKIP
    >>> model = build_peft_model(base, "lora", ["q_proj", "v_proj"], layers="auto:top25%", r=4)  # doctest: +SKIP
    >>> sd = adapter_state_dict(model)                                   # doctest: +SKIP
    >>> save_adapter_folder(inject_adapter(model, sd), "out/adapter")    # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2nwg.registry import Registry

# ----------------------------------------------------------------------------- registry
ADAPTER_KINDS: Registry[Callable[..., Any]] = Registry("adapter kind")


def register_adapter(name: str) -> Callable:
    """Decorator registering a peft config builder as adapter kind ``name``.

    Args:
        name: the kind that `build_peft_model` and zoo recipes accept, e.g. ``"lora"``.

    Returns:
        A decorator that registers a builder ``(r, target_modules, **options) -> peft config``
        (import peft inside it, so that registering stays cheap) and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered.

    Example:
        >>> @register_adapter("my-lora")                                     # doctest: +SKIP
        ... def my_lora(r, target_modules, **options):
        ...     from peft import LoraConfig
        ...     return LoraConfig(r=r, lora_alpha=r, target_modules=target_modules, **options)
    """
    return ADAPTER_KINDS.register(name)


@register_adapter("lora")
def lora_config(r: int, target_modules: list[str], lora_alpha: float | None = None, lora_dropout: float = 0.0, **options):
    """LoRA: ``W x + (alpha / r) B A x`` with ``A`` (r, in), ``B`` (out, r); B starts at zero."""
    from peft import LoraConfig

    # alpha = 2r is the common default for rank-8 q/v adapters (Text-to-LoRA, most recipes).
    alpha = 2 * r if lora_alpha is None else lora_alpha
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=target_modules, **options)


@register_adapter("miss")
def miss_config(r: int, target_modules: list[str], init_weights: bool | str = True, **options):
    """MiSS (was Bone): one shared block ``miss_block`` (r, out) added to every r-wide slice of the input."""
    from peft import MissConfig

    return MissConfig(r=r, target_modules=target_modules, init_weights=init_weights, **options)


@register_adapter("miss-bat")
def miss_bat_config(r: int, target_modules: list[str], **options):
    """MiSS "bat": block-affine ``W + W_blocks @ B + B`` with ``miss_block`` (out // r, r, r); needs r | in, out."""
    return miss_config(r, target_modules, init_weights="bat", **options)


def adapter_config(kind: str, r: int, target_modules: list[str], **options):
    """The peft config of adapter ``kind`` (a name of `ADAPTER_KINDS`).

    Raises:
        ValueError: an unknown ``kind`` (listing the known ones) or a rank ``r < 1``.
    """
    builder = ADAPTER_KINDS.get(kind)
    if r < 1:
        raise ValueError(f"adapter rank r must be >= 1, got {r}")
    return builder(r, list(target_modules), **options)


# ----------------------------------------------------------------------------- layer slices
def block_list(model: nn.Module) -> tuple[str, int]:
    """``(name, length)`` of the model's stack of repeated blocks: the largest homogeneous ModuleList."""
    best: tuple[str, int, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, len(module), size)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of repeated layers to slice")
    return best[0], best[1]


def target_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[int, list[str]]:
    """``{layer index: [full module names]}`` of the ``nn.Linear`` modules named ``target_modules`` per block."""
    if not target_modules:
        raise ValueError("target_modules is empty; name the linear layers to adapt, e.g. ['q_proj', 'v_proj']")
    prefix, n = block_list(model)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    found: dict[int, list[str]] = {i: [] for i in range(n)}
    matched: set[str] = set()
    for name, module in model.named_modules():
        m = pattern.match(name)
        if m is None or not isinstance(module, nn.Linear):
            continue
        for t in target_modules:
            if m.group(2) == t or m.group(2).endswith("." + t):
                found[int(m.group(1))].append(name)
                matched.add(t)
    missing = [t for t in target_modules if t not in matched]
    if missing:
        raise ValueError(f"no nn.Linear named {missing} inside '{prefix}.<i>' blocks of {type(model).__name__}")
    return found


def parse_layers(model: nn.Module, layers: str | Sequence[int], target_modules: Sequence[str]) -> list[int]:
    """Resolve a layer slice: ``[4, 5]``, ``"4,5"``, ``"all"``, ``"auto:top25%"`` or ``"auto:2"`` (sorted indices)."""
    per_layer = target_linears(model, target_modules)
    n = len(per_layer)
    if isinstance(layers, str):
        spec = layers.strip().lower()
        if spec == "all":
            return list(range(n))
        if spec.startswith("auto:"):
            count_spec = spec[5:].removeprefix("top")
            try:
                if count_spec.endswith("%"):
                    count = max(1, round(n * float(count_spec[:-1]) / 100))
                else:
                    count = int(count_spec)
            except ValueError:
                raise ValueError(f"cannot read layer count in {layers!r}; expected e.g. 'auto:top25%' or 'auto:2'") from None
            return select_layers_by_snr(model, target_modules, count)
        try:
            indices = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"cannot read layers {layers!r}; expected '4,5', 'all' or 'auto:top25%'") from None
    else:
        indices = [int(i) for i in layers]
    if not indices:
        raise ValueError("the layer slice is empty")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range; the model has {n} layers (0..{n - 1})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate layer indices in {layers!r}")
    return sorted(indices)


# ----------------------------------------------------------------------------- Spectrum-style SNR
def _mp_median(beta: float, grid: int = 20001) -> float:
    """Median of the Marchenko–Pastur law (aspect ratio ``beta <= 1``, unit variance), numerically."""
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    x = torch.linspace(lo, hi, grid, dtype=torch.float64)
    density = torch.sqrt(((hi - x) * (x - lo)).clamp_min(0)) / (2 * math.pi * beta * x.clamp_min(1e-12))
    cdf = torch.cumsum(density, 0)
    cdf = cdf / cdf[-1]
    return float(x[int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)))])


def weight_snr(weight: torch.Tensor) -> float:
    """Signal-to-noise ratio of a weight matrix from the Marchenko–Pastur bound on its singular values.

    The criterion (as in Spectrum, Hartford et al. 2024): a random ``m x n`` matrix (``m >= n``)
    with i.i.d. entries of std ``sigma`` has singular values below the Marchenko–Pastur upper
    edge ``sigma * (sqrt(m) + sqrt(n))``. Singular values above the edge carry learned
    structure ("signal"), those below are indistinguishable from noise:

        SNR = sum(s_i for s_i > edge) / sum(s_i for s_i <= edge)

    ``sigma`` is unknown, so it is estimated robustly from the median singular value
    (Gavish & Donoho 2014): ``sigma = s_median / sqrt(m * mu_beta)``, with ``mu_beta`` the
    median of the Marchenko–Pastur law for ``beta = n / m``. (Spectrum uses an IQR
    estimate; the median one is consistent for pure noise and insensitive to a few spikes.)
    A pure-noise matrix scores about 0; a low-rank-plus-noise matrix scores higher the
    stronger its low-rank part.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight_snr needs a 2-D matrix, got shape {list(weight.shape)}")
    w = weight.detach().to(torch.float64)
    m, n = max(w.shape), min(w.shape)
    s = torch.linalg.svdvals(w)
    sigma = float(s.median()) / math.sqrt(m * _mp_median(n / m))
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    signal, noise = float(s[s > edge].sum()), float(s[s <= edge].sum())
    return signal / noise if noise > 0 else math.inf


def layer_snr(model: nn.Module, target_modules: Sequence[str]) -> dict[int, float]:
    """``{layer index: mean weight_snr over the layer's target matrices}``."""
    modules = dict(model.named_modules())
    return {
        i: sum(weight_snr(modules[name].weight) for name in names) / len(names)
        for i, names in target_linears(model, target_modules).items()
        if names
    }


def select_layers_by_snr(model: nn.Module, target_modules: Sequence[str], count: int) -> list[int]:
    """The ``count`` layers with the highest `layer_snr` (ties: lower index first), sorted."""
    scores = layer_snr(model, target_modules)
    if not 1 <= count <= len(scores):
        raise ValueError(f"cannot select {count} of {len(scores)} layers")
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return sorted(ranked[:count])


# ----------------------------------------------------------------------------- peft models
def build_peft_model(
    base: nn.Module,
    kind: str,
    target_modules: Sequence[str],
    layers: str | Sequence[int] = "all",
    r: int = 8,
    **options,
):
    """Wrap ``base`` (modified in place) with an adapter of ``kind`` on ``target_modules`` of ``layers``.

    Args:
        base: a transformers model (or any module with a ModuleList of blocks).
        kind: ``"lora"``, ``"miss"`` or ``"miss-bat"`` (see `ADAPTER_KINDS`).
        target_modules: names of the linear layers inside each block, e.g. ``["q_proj", "v_proj"]``.
        layers: the slice: ``"4,5"``, ``[4, 5]``, ``"all"``, ``"auto:top25%"`` (Spectrum SNR) or ``"auto:2"``.
        r: adapter rank (MiSS: block size).
        **options: extra config fields, e.g. ``lora_alpha`` or ``init_lora_weights``.

    Returns:
        A ``peft.PeftModel``; only the adapter tensors require grad.

    Example:
        >>> model = build_peft_model(base, "miss", ["q_proj", "v_proj"], layers="2,3", r=4)  # doctest: +SKIP
    """
    from peft import get_peft_model

    chosen = parse_layers(base, layers, target_modules)
    per_layer = target_linears(base, target_modules)
    # Exact module names: peft matches a target when the module name equals it, so the
    # slice is explicit in adapter_config.json and needs no layers_pattern guessing.
    names = [name for i in chosen for name in per_layer[i]]
    with warnings.catch_warnings():
        # peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, adapter_config(kind, r, names, **options))


def adapter_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors (``peft.get_peft_model_state_dict``), detached copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def inject_adapter(peft_model, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"):
    """Load adapter tensors into ``peft_model`` (its adapter ``adapter_name``, one of the same config as
    ``"default"``) after checking keys and shapes against ``"default"``; returns the model.

    Raises ``ValueError`` naming missing keys (adapter tensors the model has but
    ``state_dict`` lacks), unexpected keys (the reverse), or mismatched shapes.
    """
    from peft import set_peft_model_state_dict

    expected = adapter_state_dict(peft_model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter keys do not match the model: missing {missing}, unexpected {unexpected}")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(f"adapter tensor '{k}' has shape {list(state_dict[k].shape)}, expected {list(v.shape)}")
    result = set_peft_model_state_dict(
        peft_model, {k: v.to(expected[k].dtype) for k, v in state_dict.items()}, adapter_name=adapter_name
    )
    leftover = [k for k in getattr(result, "unexpected_keys", []) if k]
    if leftover:  # peft renamed a key we thought valid: never fail silently.
        raise ValueError(f"peft did not load adapter keys {leftover}")
    return peft_model


def save_adapter_folder(peft_model, out: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a standard PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    With ``state_dict`` the adapter is first replaced by it (`inject_adapter`). Load the
    folder with ``PeftModel.from_pretrained(base, out)``.
    """
    if state_dict is not None:
        inject_adapter(peft_model, state_dict)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


# ----------------------------------------------------------------------------- PEFT export
def to_peft_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A member's adapter tensors under standard PEFT keys (``base_model.model.…lora_A.weight``); drops the head."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("peft."):
            continue
        out[key.removeprefix("peft.").replace(".default.", ".").removesuffix(".default")] = value
    return out
