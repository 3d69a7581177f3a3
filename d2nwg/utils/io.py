"""Safe, atomic file I/O: every write goes to a temp file first, then is renamed into place."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open


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


MAX_JSON_BYTES = 256 * 1024 * 1024
"""Largest JSON file d2nwg reads (bytes). The largest it writes, a causal-LM zoo's layout with statistics,
is a few MB; a bigger file is refused before it is read rather than filling memory."""


def read_json(path: str | Path, what: str, max_bytes: int | None = None):
    """Parse the JSON file ``path``, refusing oversized, undecodable or pathologically nested files.

    Args:
        path: the file.
        what: what it is, for the message (``"zoo manifest"``).
        max_bytes: the size limit; default `MAX_JSON_BYTES`.

    Returns:
        The parsed value (any JSON type: callers check the shape they expect).

    Raises:
        ValueError: one line naming ``what`` and ``path``: missing, too large, not UTF-8, not JSON, or
            nested too deeply for the parser.
    """
    path = Path(path)
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    try:
        size = path.stat().st_size
        if size > limit:
            raise ValueError(f"{what} {path} is {size:,} bytes, over the {limit:,}-byte limit for JSON files")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt {what} {path}: {err}") from None
    except RecursionError:
        raise ValueError(f"corrupt {what} {path}: nested too deeply") from None


# safetensors' dtype names (the format's spec); a dtype missing here is refused by `safetensors_bytes`.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    **{getattr(torch, n): s for n, s in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                                         ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")) if hasattr(torch, n)},
}  # fmt: skip


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file, the same for the same tensors and metadata in every process.

    The safetensors library writes its ``__metadata__`` from a Rust ``HashMap``, whose order changes
    from process to process, so two runs with equal inputs gave byte-different files (different
    checksums). This writes the format itself: an 8-byte little-endian header length, a JSON header
    (``__metadata__`` with sorted keys first, then the tensors in data order) padded with spaces to a
    multiple of 8, then the tensor bytes, larger dtypes first and by name (the library's own order, which
    keeps every tensor aligned). ``safetensors`` reads the result like its own files.

    Args:
        tensors: name -> tensor (moved to CPU, made contiguous, little-endian as on every supported host).
        metadata: str -> str pairs.

    Raises:
        ValueError: a dtype safetensors cannot store, or non-string metadata.
    """
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in (metadata or {}).items()):
        raise ValueError("safetensors metadata must map str to str")
    prepared = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        prepared[name] = tensor.detach().cpu().contiguous()
    order = sorted(prepared, key=lambda n: (-prepared[n].element_size(), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in order:
        tensor = prepared[name]
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None) -> None:
    """Write tensors atomically and deterministically (same inputs, same bytes: see `safetensors_bytes`).

    Non-string metadata values are JSON-encoded with sorted keys (safetensors wants str -> str).
    """
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    data = safetensors_bytes(tensors, meta)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]+)")
RESAVE_HINT = "re-save only the state_dict, as safetensors: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
"""What to tell the owner of a checkpoint d2nwg cannot read safely."""
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
"""Keys under which training checkpoints nest the weights: Lightning ``.ckpt`` files (``state_dict``, beside
``optimizer_states``, ``loops`` ...) and the common ``{"model_state_dict": ..., "optimizer_state_dict": ...}``."""


def _torch_load_error(path: Path, err: Exception) -> str:
    """One line, free of escape codes, for a ``torch.load(weights_only=True)`` failure of ``path``.

    torch's message opens with "Weights only load failed ... you have two options," (with ANSI bold codes)
    and names the offending global only several lines later; that global is what the user needs.
    """
    text = _ANSI.sub("", str(err))
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        name = found.group(1).rstrip(".")
        return (
            f"checkpoint {path} also pickles '{name}', which safe loading (torch.load weights_only=True) refuses "
            f"because unpickling it could run code; {RESAVE_HINT}"
        )
    found = _UNPICKLER_ERROR.search(text)
    if found:
        return f"checkpoint {path} cannot be loaded safely (weights_only=True): {found.group(1).strip()}; {RESAVE_HINT}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) < 8:  # e.g. KeyError('101') from a file that is no pickle at all: the type says more
        first = f"{type(err).__name__}: {first}".rstrip(": ")
    return f"corrupt or unreadable checkpoint {path} (not a torch.save file?): {first}"


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth``/``.ckpt`` state_dict without unpickling code (``weights_only=True``).

    The weights may sit at the top level or under one of `STATE_DICT_KEYS` (Lightning ``.ckpt`` files keep
    them under ``state_dict`` next to optimizer states and loop counters, which are ignored).

    Raises:
        ValueError: one line naming the file and, for a pickle that safe loading refuses, the offending global
            (e.g. ``argparse.Namespace``, ``numpy._core.multiarray.scalar``), or the key that holds something
            other than a tensor, with what to do.
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles
        raise ValueError(_torch_load_error(path, err)) from None
    if isinstance(obj, Mapping):
        nested = next((obj[k] for k in STATE_DICT_KEYS if k in obj and _is_tensor_dict(obj[k])), None)
        obj = nested if nested is not None else obj
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict of tensors; {RESAVE_HINT}")
    if not obj:
        raise ValueError(f"checkpoint {path} holds an empty dict, not a state_dict of tensors")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            kind = "a dict of tensors" if _is_tensor_dict(value) else f"a {type(value).__name__}"
            raise ValueError(
                f"checkpoint {path} is not a flat state_dict of tensors: key {str(key)!r} holds {kind}; {RESAVE_HINT}"
            )
    return dict(obj)


TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _looks_like_torch_file(path: Path) -> bool:
    """A suffix-less file saved by ``torch.save``: a zip archive (``PK``) or a legacy pickle (protocol byte 0x80)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict from safetensors, or from a torch checkpoint with ``weights_only=True``.

    ``.pt``/``.pth``/``.ckpt``/``.bin`` files are torch checkpoints; a file with another suffix (or none, like
    the ``checkpoint_<epoch>/checkpoints`` files of population-of-models zoos) is read as a torch checkpoint
    when its first bytes say so, else as safetensors.

    Raises:
        ValueError: a missing or unreadable file (see `load_torch_checkpoint`, `load_safetensors`).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return load_safetensors(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    if path.suffix.lower() in TORCH_SUFFIXES or _looks_like_torch_file(path):
        return load_torch_checkpoint(path)
    return load_safetensors(path)
