"""Safe, atomic file I/O: every write goes to a temp file first, then is renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from d2nwg.errors import one_line


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path):
    """Yield a temp directory next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None) -> None:
    """Write tensors atomically; non-string metadata values are JSON-encoded (safetensors wants str→str)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, corrupt or truncated file raises ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"corrupt or unreadable safetensors file {path}: {err}") from None


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The str→str metadata of a safetensors file (``ValueError`` naming it if unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"corrupt or unreadable safetensors file {path}: {err}") from None


def load_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth``/``.ckpt`` state_dict without unpickling code (``weights_only=True``)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles
        raise ValueError(f"corrupt or unsafe checkpoint {path}: {one_line(err)}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} is not a flat state_dict of tensors")
    return dict(obj)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict from safetensors, or from a torch checkpoint with ``weights_only=True``."""
    path = Path(path)
    if path.suffix in {".pt", ".pth", ".ckpt", ".bin"}:
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return load_torch_checkpoint(path)
    return load_safetensors(path)
