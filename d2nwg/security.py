"""What a downloaded file may make d2nwg do: import code only with consent, name paths only inside its folder.

Zoos, pipelines, layouts, alignment records, mappings and generate outputs are files anyone can write and
push to the Hub. d2nwg reads names from them in two places where a hostile file could take over a machine,
and guards both here:

* **Code.** An architecture spec may name a ``"package.module:callable"`` builder instead of a registered
  architecture. Importing it runs that module's code, so a name read from a file resolves only against the
  registries unless the user consents, following transformers' ``trust_remote_code`` convention:
  ``--trust-remote-code`` on the CLI, ``trust_remote_code=True`` in Python. Consent is asked every time a
  file is read (as transformers does), also for a zoo that ``zoo ingest --arch module:callable`` wrote
  from the user's own code: the zoo may travel.
* **Paths.** A member id, task id or file name read from a file must be a plain name (no separator, no
  ``..``, no control character), and a relative path must resolve inside its folder (symlinks included), so
  that ``../../x`` can neither be read nor written.

Example:
    >>> from d2nwg.security import check_name, trust_remote_code
    >>> check_name("task-3-s0", "member id")
    'task-3-s0'
    >>> check_name("../escape", "member id")     # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    d2nwg.security.UnsafePathError: member id '../escape' is not a plain name
    >>> with trust_remote_code():      # what --trust-remote-code does around a command
    ...     pass
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path

from d2nwg.errors import UserError, escape_control

TRUST_FLAG = "--trust-remote-code (trust_remote_code=True in Python)"
"""How the user consents, as error messages name it."""

_CONSENT: ContextVar[bool] = ContextVar("d2nwg_trust_remote_code", default=False)
_TRUSTED_NAMES: set[str] = set()  # code names consented to in this process (a zoo opened with consent, say)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RemoteCodeError(UserError):
    """A file names code to import and the user has not consented (one ``error:`` line, exit 2)."""


class UnsafePathError(UserError):
    """A name or relative path read from a file would leave its folder (one ``error:`` line, exit 2)."""


# ----------------------------------------------------------------------------- code
@contextlib.contextmanager
def trust_remote_code(enabled: bool = True) -> Iterator[None]:
    """Consent, inside the block, to importing code that files name (``"module:callable"`` architectures).

    Args:
        enabled: False leaves the consent as it was, so callers can pass their flag straight through.
    """
    token = _CONSENT.set(_CONSENT.get() or bool(enabled))
    try:
        yield
    finally:
        _CONSENT.reset(token)


def remote_code_trusted() -> bool:
    """Whether the current context consents to importing code named in files."""
    return _CONSENT.get()


def is_code_name(name: object) -> bool:
    """Whether ``name`` is a ``"package.module:callable"`` reference rather than a registry name."""
    return isinstance(name, str) and ":" in name


def allow_code_name(name: str) -> None:
    """Mark ``name`` as consented to for the rest of this process (the user passed it, or consented on read)."""
    _TRUSTED_NAMES.add(name)


def check_code_name(name: str, source: str, trust: bool | None = None) -> None:
    """Refuse a code name read from ``source`` unless the user consented; with consent, remember it.

    Args:
        name: a ``"package.module:callable"`` reference (other names pass untouched).
        source: where the name was read, for the message, e.g. ``"pipeline runs/x"``.
        trust: the caller's explicit ``trust_remote_code`` (False refuses even a name consented to earlier);
            ``None`` uses the ambient consent (`code_name_allowed`).

    Raises:
        RemoteCodeError: consent is missing; the message names the module and the flag.
    """
    if not is_code_name(name):
        return
    if not (trust if trust is not None else code_name_allowed(name)):
        module = name.partition(":")[0]
        raise RemoteCodeError(
            f"{source} names code to import: architecture '{name}' would run module '{module}'; "
            f"pass {TRUST_FLAG} only if you trust where it came from"
        )
    allow_code_name(name)


def check_architecture_spec(spec: object, source: str, trust: bool | None = None) -> None:
    """`check_code_name` on an architecture spec ``{"name": ..., "config": {...}}`` read from ``source``.

    Raises:
        RemoteCodeError: the spec names code and consent is missing.
        UserError: the spec is not a mapping with a string ``name``.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise UserError(f"{source} has a malformed architecture spec (expected {{'name': str, 'config': {{...}}}})")
    check_code_name(spec["name"], source, trust)


def code_name_allowed(name: str) -> bool:
    """Whether importing ``name`` is allowed now: consented in this process or in the current context."""
    return name in _TRUSTED_NAMES or remote_code_trusted()


# ----------------------------------------------------------------------------- paths
def check_name(name: object, what: str) -> str:
    """``name`` if it is a plain file-name component: a non-empty string with no separator, ``..`` or control character.

    Args:
        name: a member id, task id, file name, ... read from a file.
        what: what it is, for the message (``"member id"``).

    Raises:
        UnsafePathError: ``name`` could address something outside its folder.
    """
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or _CONTROL.search(name)
    ):
        raise UnsafePathError(
            f"{what} {printable(name)} is not a plain name (no '/', backslash, '..' or control characters)"
        )
    return name


def inside(root: str | Path, relative: str | Path, what: str) -> Path:
    """``root / relative``, checked to stay inside ``root`` once symlinks and ``..`` are resolved.

    Args:
        root: the folder the path belongs to.
        relative: a relative path read from a file (``"members/x.safetensors"``).
        what: what it is, for the message.

    Returns:
        ``Path(root) / relative`` (unresolved, so messages show the path as the user knows it).

    Raises:
        UnsafePathError: an absolute path, a control character, or a path that resolves outside ``root``.
    """
    text = str(relative)
    if not text or os.path.isabs(text) or _CONTROL.search(text) or "\\" in text:
        raise UnsafePathError(f"{what} {printable(text)} must be a relative path inside {root}")
    path = Path(root) / relative
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise UnsafePathError(f"{what} {printable(text)} resolves outside {root}")
    return path


def check_folder_links(folder: str | Path, what: str, allowed: Path | None = None) -> None:
    """Refuse a folder any of whose entries (symlinks included) resolves outside it.

    Args:
        folder: a pipeline or adapter folder about to be loaded.
        what: what it is, for the message (``"pipeline folder"``).
        allowed: a second root the entries may resolve into: a Hub cache snapshot's files are symlinks into
            the repo's ``blobs/`` folder, two levels up.

    Raises:
        UnsafePathError: naming the first entry that points elsewhere.
    """
    folder = Path(folder)
    roots = [folder.resolve(), *([allowed.resolve()] if allowed is not None else [])]
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            entry = Path(dirpath) / name
            target = entry.resolve()
            if not any(target.is_relative_to(r) for r in roots):
                raise UnsafePathError(f"{what} {folder} holds {entry.relative_to(folder)}, a link to {target} outside it")


def printable(value: object) -> str:
    """``repr``-like quoting that escapes control characters, so a hostile name cannot rewrite the terminal."""
    text = value if isinstance(value, str) else repr(value)
    return "'" + escape_control(text).replace("\n", "\\n").replace("\t", "\\t") + "'"
