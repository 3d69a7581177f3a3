"""What every ``d2nwg`` command shares: argument types, the help formatter, warnings."""

from __future__ import annotations

import argparse
import math
import sys

from d2nwg.errors import escape_control

EXIT_USER_ERROR = 2
HEAD_SOLVER_CHOICES = ("generated", "lda", "class_mean")
"""``d2nwg.targets.heads.HEAD_SOLVERS`` plus "generated", spelled out so that building the parser imports no torch
code of its own (a test keeps them in step)."""
FORMATTER = argparse.ArgumentDefaultsHelpFormatter
"""Shows "(default: ...)" after each option's help."""


def warn(message: str) -> None:
    """Print one ``warning: ...`` line on stderr."""
    print(f"warning: {escape_control(message)}", file=sys.stderr)


def load_pipeline(args: argparse.Namespace):
    """``--pipeline`` at ``--revision``, printing which Hub commit it is (or that the cache was used)."""
    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline

    pipe = D2NWGPipeline.from_pretrained(args.pipeline, revision=args.revision)
    if pipe.hub_snapshot is not None:
        print(f"pipeline: {pipe.hub_snapshot.describe()}")
    return pipe


def positive_int_or_auto(text: str) -> str:
    """``--devices``: a count >= 1 or ``auto`` (argparse prints the error as one usage line, exit 2)."""
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or 'auto', got {text!r}")
    return text


def positive_int(text: str) -> int:
    """``--num-nodes``, ``--finetune-steps``: a count >= 1."""
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 1, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    """``--finetune-lr``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


# ----------------------------------------------------------------------------- parser
TRUST_HELP = (
    "allow importing code that the files name (an architecture given as module:callable); it runs that module, "
    "so pass it only for files you trust (transformers' trust_remote_code)"
)
REVISION_HELP = "branch, tag or commit of a Hub repo id (default: main); the commit used is printed and recorded"


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
