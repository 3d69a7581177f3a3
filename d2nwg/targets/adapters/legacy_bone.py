"""Legacy Bone adapters (peft 0.14-0.18, ``bone_block`` keys) read as MiSS (peft >= 0.19).

`convert_legacy_bone` renames a state dict, `convert_legacy_bone_config` an ``adapter_config.json``, and
`convert_bone_folder` (``d2nwg adapters convert-bone``) a whole adapter folder."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


# ----------------------------------------------------------------------------- legacy Bone
def convert_legacy_bone(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map peft<0.19 Bone keys (``….bone_block``) to MiSS keys (``….miss_block``); shapes are unchanged.

    Bone and MiSS share the layout: ``(r, out)`` for the default form and
    ``(out // r, r, r)`` for ``init_weights="bat"``. Other keys pass through. A checkpoint
    holding both a Bone key and its MiSS twin is ambiguous and raises ``ValueError``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = re.sub(r"(^|\.)bone_block(?=\.|$)", r"\1miss_block", key)
        if new in out or (new != key and new in state_dict):
            raise ValueError(f"legacy key '{key}' maps to '{new}', which the checkpoint already holds")
        out[new] = value
    return out


def convert_legacy_bone_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """An ``adapter_config.json`` dict of a Bone adapter as the equivalent MiSS config dict."""
    config = dict(config)
    if str(config.get("peft_type", "")).upper() == "BONE":
        config["peft_type"] = "MISS"
        if "bone_dropout" in config:
            config["miss_dropout"] = config.pop("bone_dropout")
    return config


def convert_bone_folder(src: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Convert a legacy Bone adapter folder (peft < 0.19, ``peft_type`` BONE) into a MiSS folder that peft >= 0.19 loads.

    The tensors keep their shapes and values (`convert_legacy_bone` renames ``…bone_block`` to ``…miss_block``),
    the config becomes a MiSS one (`convert_legacy_bone_config`), and the folder's other files are copied, so
    ``PeftModel.from_pretrained(base, out)`` gives the logits the Bone adapter gave.

    Args:
        src: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``).
        out: the new folder; it must not exist or be empty. Written atomically.

    Returns:
        ``(out, dropped)``: the folder, and the config keys MiSS does not know, which were left out.

    Raises:
        ValueError: a missing folder or file, an unreadable config, an adapter that is not Bone, a Bone
            folder without ``bone_block`` tensors, or a non-empty ``out``.
    """
    import dataclasses
    import json
    import shutil

    from peft import MissConfig

    from d2nwg.security import check_folder_links
    from d2nwg.utils.io import atomic_dir, load_weights, read_json, save_safetensors

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"adapter folder not found: {src}")
    config_path = src / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{src} has no adapter_config.json; pass a PEFT adapter folder")
    check_folder_links(src, "adapter folder")  # every other entry is copied into the output
    config = read_json(config_path, "adapter config")
    peft_type = str(config.get("peft_type", "")).upper() if isinstance(config, dict) else ""
    if peft_type != "BONE":
        raise ValueError(f"{src} holds a {peft_type or 'untyped'} adapter, not a legacy Bone one (peft_type BONE)")
    weights_path = next((src / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (src / n).is_file()), None)
    if weights_path is None:
        raise ValueError(f"{src} has no adapter_model.safetensors or adapter_model.bin")
    weights = convert_legacy_bone(load_weights(weights_path))
    if not any(re.search(r"(^|\.)miss_block(\.|$)", k) for k in weights):
        raise ValueError(f"{weights_path} holds no bone_block tensors")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} already exists and is not empty")
    config = convert_legacy_bone_config(config)
    known = {f.name for f in dataclasses.fields(MissConfig)}
    dropped = sorted(k for k in config if k not in known)
    config = {k: v for k, v in config.items() if k in known}
    with atomic_dir(out) as tmp:
        for entry in src.iterdir():  # README, tokenizer files, ...: everything but the two converted files
            if entry.name in ("adapter_config.json", weights_path.name):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_safetensors(tmp / "adapter_model.safetensors", weights, {"format": "pt"})
    return out, dropped
