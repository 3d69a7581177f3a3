"""The ``d2nwg`` command line: a thin layer over library functions.

User mistakes (bad paths, corrupt files, shape mismatches) surface as one
``error: ...`` line and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from d2nwg.commands.adapters import add_adapters_parser
from d2nwg.commands.demo import add_demo_parser
from d2nwg.commands.evaluate import add_evaluate_parser
from d2nwg.commands.generate import add_generate_parser
from d2nwg.commands.options import EXIT_USER_ERROR
from d2nwg.commands.push import add_push_parser
from d2nwg.commands.train import add_train_parser
from d2nwg.commands.zoo import add_zoo_parser
from d2nwg.errors import one_line


COMMANDS = {
    "zoo": add_zoo_parser,
    "train": add_train_parser,
    "evaluate": add_evaluate_parser,
    "generate": add_generate_parser,
    "push": add_push_parser,
    "adapters": add_adapters_parser,
    "demo": add_demo_parser,
}
"""Command -> the function that adds its subparser, in ``--help`` order; each command is a module of this package
(`d2nwg.commands.zoo`, ...) whose subparser's ``func`` calls the library function that does the work."""


def build_parser() -> argparse.ArgumentParser:
    """The ``d2nwg`` argument parser: one subcommand per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="d2nwg", description="Diffusion-based neural network weight generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from d2nwg.security import trust_remote_code

    args = build_parser().parse_args(argv)
    try:
        with trust_remote_code(getattr(args, "trust_remote_code", False)):
            args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:  # Ctrl-C; `d2nwg.errors.Interrupted` also for SIGTERM (exit 143)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
            # Every process of a multi-process run stops at the same step; one line says so.
            print(f"interrupted: {one_line(err)}" if str(err) else "interrupted", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
    return 0
