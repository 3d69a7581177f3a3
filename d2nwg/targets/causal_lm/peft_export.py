"""A generated causal-LM adapter as a standard PEFT folder.

`save_causal_lm_adapter` writes ``adapter_config.json`` naming the base, so
``AutoPeftModelForCausalLM.from_pretrained(folder)`` loads base and adapter in one call."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from d2nwg.targets.adapters.frozen_base import load_base_model
from d2nwg.targets.adapters.kinds import to_peft_state_dict


# ----------------------------------------------------------------------------- PEFT export
@functools.lru_cache(maxsize=1)
def _resolved(base: str) -> str:
    from d2nwg.targets.adapters.packaged_bases import resolve_base

    return str(resolve_base(base))


def save_causal_lm_adapter(member: Mapping[str, torch.Tensor], architecture: Mapping, out: str | Path) -> Path:
    """Write a standard PEFT folder for ``member``; ``AutoPeftModelForCausalLM.from_pretrained(out)`` loads it.

    ``adapter_config.json``'s ``base_model_name_or_path`` is the base's local folder (a packaged base's cache
    folder, see `d2nwg.targets.adapters.packaged_bases`) or its Hub id, so the folder loads base and adapter in one call;
    ``d2nwg.json`` records the architecture and how prompts were formatted.
    """
    from d2nwg.targets.adapters.kinds import build_peft_model, save_adapter_folder

    cfg = dict(architecture["config"])
    model = build_peft_model(
        load_base_model(cfg["base"]), cfg.get("kind", "lora"), list(cfg["target_modules"]), list(cfg["layers"]),
        int(cfg["r"]), **dict(cfg.get("options") or {}),
    )
    model.peft_config["default"].base_model_name_or_path = _resolved(cfg["base"])
    out = save_adapter_folder(model, out, to_peft_state_dict(member))
    usage = {"base": cfg["base"], "prompt": "the base tokenizer's chat template, add_generation_prompt=True", "decoding": "greedy"}
    (out / "d2nwg.json").write_text(json.dumps({**usage, "architecture": dict(architecture)}, indent=2))
    return out
