"""``d2nwg evaluate``: the evaluation protocol on a zoo's held-out tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2nwg.commands.options import (
    FORMATTER,
    HEAD_SOLVER_CHOICES,
    REVISION_HELP,
    add_trust_flag,
    load_pipeline,
    positive_float,
    positive_int,
    warn,
)
from d2nwg.errors import UserError
from d2nwg.utils.console import print_summary, print_summary_by_kind, print_table


# ----------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    from d2nwg.evaluation.protocol import evaluate
    from d2nwg.evaluation.report import provenance_rows
    from d2nwg.zoo.model_zoo import ModelZoo

    zoo = ModelZoo.open(args.zoo)
    leak = zoo.split_leak_message()
    if leak and not args.allow_split_leak:
        raise UserError(f"{leak}; --allow-split-leak evaluates anyway")
    if leak:
        print(f"warning: {leak}", file=sys.stderr)  # evaluate() records it in the report too
    pipe = load_pipeline(args)
    print_table("pipeline provenance", provenance_rows(pipe.provenance))
    if zoo.input_spec.kind == "generative-text":  # adapters judged on what they generate: exact match
        if args.head_solver or args.baselines:
            raise UserError("--head-solver and --baselines apply to classifier zoos; a generative zoo runs every method of d2nwg.targets.causal_lm.evaluate")
        return _evaluate_causal_lm(pipe, zoo, args)
    if args.finetune_steps or args.finetune_lr:
        raise UserError("--finetune-steps/--finetune-lr apply to generative (causal-LM adapter) zoos only")
    if args.head_solver:
        pipe.set_head_solver(args.head_solver)
    report = evaluate(
        pipe,
        zoo,
        Path(args.out),
        num_samples=args.num_samples,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        max_tasks=args.max_tasks,
        baselines=args.baselines,
        allow_split_leak=args.allow_split_leak,
    )
    print_summary(report["summary"])
    print_summary_by_kind(report["summary_by_kind"])
    for message in report["warnings"]:  # trust checks (`d2nwg.evaluation.trust`), after the tables they qualify
        warn(message)
    print(f"report: {Path(args.out) / 'report.md'}")


def _evaluate_causal_lm(pipe, zoo, args: argparse.Namespace) -> None:
    from d2nwg.targets.causal_lm.evaluate import evaluate_causal_lm, generation_table

    report = evaluate_causal_lm(
        pipe, zoo, Path(args.out), num_samples=args.num_samples, num_inference_steps=args.steps,
        guidance_scale=args.guidance, seed=args.seed, max_tasks=args.max_tasks, k_shot=args.k_shot,
        multitask_steps=args.multitask_steps, finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        max_new_tokens=args.max_new_tokens,
    )
    def pairs(summary):
        return [(method, f"exact match {em}   log-likelihood {ll}") for method, em, ll in generation_table(summary)]

    print_table(f"held-out tasks ({report['summary']['tasks']})", pairs(report["summary"]))
    for kind, summary in report["summary_by_kind"].items():
        print_table(f"{kind} ({summary['tasks']} tasks)", pairs(summary))
    for message in report["warnings"]:  # trust checks (`d2nwg.evaluation.trust`), after the tables they qualify
        warn(message)
    print(f"report: {Path(args.out) / 'report.md'}")


def add_evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="evaluate a pipeline on a zoo's held-out tasks", formatter_class=FORMATTER)
    ev.add_argument("--pipeline", required=True, help="pipeline folder or Hub repo id")
    ev.add_argument("--revision", default=None, help=REVISION_HELP)
    ev.add_argument("--zoo", required=True, help="zoo directory with held-out tasks")
    ev.add_argument("--out", required=True, help="report folder (report.json, report.md, plots)")
    ev.add_argument("--num-samples", type=int, default=10, help="weight sets generated per task")
    ev.add_argument("--steps", type=int, default=50, help="denoising steps")
    ev.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--max-tasks", type=int, default=None, help="evaluate only the first N held-out tasks of each kind")
    ev.add_argument("--head-solver", choices=HEAD_SOLVER_CHOICES, default=None, help="override how the pipeline writes heads")
    ev.add_argument(
        "--allow-split-leak", action="store_true",
        help="evaluate even when held-out tasks share a dataset with train tasks (zoos ingested before tasks were datasets)",
    )
    ev.add_argument(
        "--baselines", nargs="+", default=None, metavar="NAME",
        help="baselines to run, names from d2nwg.evaluation.baselines.BASELINES (an unknown name lists them; none given: all)",
    )
    ev.add_argument("--k-shot", type=int, default=4, help="generative zoos: in-context examples of the icl and multi-task baselines")
    ev.add_argument("--multitask-steps", type=int, default=200, help="generative zoos: optimiser steps of the multi-task LoRA baseline")
    ev.add_argument(
        "--finetune-steps", type=positive_int, default=None,
        help="generative zoos: steps of the finetune baseline and generated_finetune (unset: the members' steps, and half of them)",
    )
    ev.add_argument("--finetune-lr", type=positive_float, default=None, help="generative zoos: their learning rate (unset: a fifth of the members')")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="generative zoos: longest greedy answer, in tokens (default: the zoo's response window)")
    add_trust_flag(ev)
    ev.set_defaults(func=cmd_evaluate)
