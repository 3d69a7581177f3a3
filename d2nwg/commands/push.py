"""``d2nwg push``: a pipeline with its model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from d2nwg.commands.options import FORMATTER


def cmd_push(args: argparse.Namespace) -> None:
    from d2nwg.evaluation.model_card import model_card
    from d2nwg.pipelines.hub import push_pipeline

    url = push_pipeline(
        args.pipeline, args.repo_id, card=model_card, private=args.private, report_dir=args.report, revision=args.revision
    )
    print(f"pushed to {url}")


def add_push_parser(sub) -> None:
    push = sub.add_parser("push", help="upload a pipeline with a model card to the Hugging Face Hub", formatter_class=FORMATTER)
    push.add_argument("--pipeline", required=True, help="saved pipeline folder")
    push.add_argument("--repo-id", required=True, help="user/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to push to (created from main if missing; default: main)")
    push.add_argument("--report", default=None, help="evaluation folder whose report.json and plots go in the card")
    push.set_defaults(func=cmd_push)
