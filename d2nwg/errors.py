"""User-facing errors: what the CLI reports as one ``error: ...`` line (exit code 2) instead of a traceback."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and newline


def escape_control(text: str) -> str:
    """``text`` with control characters (ANSI escapes, NUL, carriage returns) written as ``\\xNN``, so that
    names read from a hostile file cannot rewrite the terminal when a message shows them."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class UserError(ValueError):
    """A mistake in the user's input: reported as one line, exit code 2."""


def one_line(err: BaseException, empty: str | None = None) -> str:
    """The first line of ``err``'s message, for errors that must stay one line.

    Args:
        err: any exception; third-party ones (torch, huggingface_hub, PIL) often carry multi-line messages.
        empty: what to return when the message is empty; default: the exception's type name.

    Returns:
        The message's first line, or ``empty`` (or the type name) when there is no message.
    """
    text = str(err)
    if not text:
        return empty if empty is not None else type(err).__name__
    return escape_control(text.splitlines()[0])


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM; the CLI prints its message on one line and exits ``128 + signum``.

    Args:
        message: what was kept, e.g. where the checkpoint that resumes the run is.
        signum: the signal number (2 for SIGINT: exit code 130; 15 for SIGTERM: 143).
    """

    def __init__(self, message: str = "", signum: int = 2):
        super().__init__(message)
        self.signum = signum
