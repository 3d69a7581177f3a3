"""``d2nwg demo``: build the digits zoo, train, evaluate and generate (`d2nwg.demo.run_demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from d2nwg.commands.options import FORMATTER


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from d2nwg.demo import run_demo

    run_demo(Path(args.out), config=args.config, fast=args.fast)


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="build the digits zoo, train, evaluate and generate", formatter_class=FORMATTER)
    demo.add_argument("--out", default="runs/demo", help="demo directory")
    demo.add_argument("--config", default=None, help="training config (default: the packaged digits config)")
    demo.add_argument("--fast", action="store_true", help="tiny settings for a smoke run (poor quality)")
    demo.set_defaults(func=cmd_demo)
