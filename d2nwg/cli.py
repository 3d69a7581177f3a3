"""The ``d2nwg`` command line: a thin layer over library functions.

User mistakes (bad paths, corrupt files, shape mismatches) surface as one
``error: ...`` line and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from d2nwg.console import print_summary, print_summary_by_kind, print_table, print_zoo
from d2nwg.errors import UserError, escape_control, one_line

EXIT_USER_ERROR = 2
HEAD_SOLVER_CHOICES = ("generated", "lda", "class_mean")
"""``d2nwg.heads.HEAD_SOLVERS`` plus "generated", spelled out so that building the parser imports no torch
code of its own (a test keeps them in step)."""
FORMATTER = argparse.ArgumentDefaultsHelpFormatter
"""Shows "(default: ...)" after each option's help."""


def warn(message: str) -> None:
    """Print one ``warning: ...`` line on stderr."""
    print(f"warning: {escape_control(message)}", file=sys.stderr)


def load_pipeline(args: argparse.Namespace):
    """``--pipeline`` at ``--revision``, printing which Hub commit it is (or that the cache was used)."""
    from d2nwg.pipeline import D2NWGPipeline

    pipe = D2NWGPipeline.from_pretrained(args.pipeline, revision=args.revision)
    if pipe.hub_snapshot is not None:
        print(f"pipeline: {pipe.hub_snapshot.describe()}")
    return pipe


# ----------------------------------------------------------------------------- zoo
def cmd_zoo_build(args: argparse.Namespace) -> None:
    from model_zoo import get_recipe

    recipe = get_recipe(args.recipe)
    zoo = recipe(args.out, **{f.name: getattr(args, f.name) for f in recipe.settings()})
    print_zoo(zoo.summary())


def cmd_zoo_info(args: argparse.Namespace) -> None:
    from d2nwg.zoo import ModelZoo

    zoo = ModelZoo.open(args.zoo)
    leak = zoo.split_leak_message()
    if leak:
        print(f"warning: {leak}", file=sys.stderr)
    summary = zoo.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_zoo(summary)


def cmd_zoo_ingest(args: argparse.Namespace) -> None:
    from d2nwg.ingest import BadCheckpointsError, ingest
    from d2nwg.ingest_adapters import find_adapter_folders, ingest_adapters

    if Path(args.checkpoints).is_dir() and find_adapter_folders(args.checkpoints):  # bring your own PEFT adapters
        if args.arch:
            raise UserError("--arch does not apply to PEFT adapter folders: their adapter_config.json says what they are")
        zoo = ingest_adapters(
            args.checkpoints, args.datasets, args.mapping, args.out, base=args.base, heldout_fraction=args.heldout_fraction,
            split_fractions=args.split_fractions, seed=args.seed, warn=warn,
        )
        print_zoo(zoo.summary())
        return
    if args.arch is None:
        raise UserError("--arch is required (unless --checkpoints holds PEFT adapter folders)")
    try:
        zoo = ingest(
            args.checkpoints,
            args.datasets,
            args.mapping,
            args.arch,
            args.out,
            arch_config=args.arch_config,
            include=args.include,
            exclude=args.exclude,
            chunk_size=args.chunk_size,
            heldout_fraction=args.heldout_fraction,
            split_fractions=args.split_fractions,
            seed=args.seed,
            skip_bad=args.skip_bad,
            image_size=args.image_size,
            label_column=args.label_column,
            epochs=args.epochs,
            warn=lambda message: print(f"warning: {message}", file=sys.stderr),
            align=args.align,
        )
    except BadCheckpointsError as err:
        for bad in err.bad:
            print(f"bad checkpoint {bad.name}: {bad.reason}", file=sys.stderr)
        raise UserError(str(err)) from None
    print_zoo(zoo.summary())


def cmd_zoo_align(args: argparse.Namespace) -> None:
    from d2nwg.align import align_zoo_dir

    zoo = align_zoo_dir(args.zoo, args.out, reference=args.reference, seed=args.seed)
    print_zoo(zoo.summary())
    print(f"alignment: {zoo.root / 'alignment.json'}")


# ----------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from d2nwg.lightning_cli import train

    from lightning.pytorch.utilities import rank_zero_only

    # Device flags go last so that they win over --set and the config.
    if args.strategy == "fsdp":  # before Lightning builds a trainer, whose own accelerator checks come first
        raise UserError("strategy fsdp is not supported yet (EMA and clipping need whole parameters); use --strategy ddp")
    devices = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes, "strategy": args.strategy}
    overrides = [*args.set, *(f"trainer.{k}={v}" for k, v in devices.items() if v is not None)]
    pipeline_dir = train(args.out, args.config, args.zoo, overrides, resume=args.resume, logger=args.logger)
    if rank_zero_only.rank == 0:  # every process of a multi-process run gets here; one line is enough
        print(f"pipeline: {pipeline_dir}")


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


# ----------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    from d2nwg.evaluate import evaluate
    from d2nwg.provenance import provenance_rows
    from d2nwg.zoo import ModelZoo

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
            raise UserError("--head-solver and --baselines apply to classifier zoos; a generative zoo runs every method of d2nwg.evaluate_generation")
        return _evaluate_generation(pipe, zoo, args)
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
    for message in report["warnings"]:  # trust checks (`d2nwg.trust`), after the tables they qualify
        warn(message)
    print(f"report: {Path(args.out) / 'report.md'}")


def _evaluate_generation(pipe, zoo, args: argparse.Namespace) -> None:
    from d2nwg.evaluate_generation import evaluate_generation, generation_table

    report = evaluate_generation(
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
    for message in report["warnings"]:  # trust checks (`d2nwg.trust`), after the tables they qualify
        warn(message)
    print(f"report: {Path(args.out) / 'report.md'}")


# ----------------------------------------------------------------------------- generate / push
def cmd_generate(args: argparse.Namespace) -> None:
    from d2nwg.datasets import load_dataset
    from d2nwg.generate import generate_to_folder, use_base

    pipe = load_pipeline(args)
    if args.head_solver:
        pipe.set_head_solver(args.head_solver)
    if args.base and (message := use_base(pipe, args.base)):
        warn(message)
    if pipe.target_spec.input.kind == "generative-text":  # a causal-LM adapter from a JSONL task
        return _generate_adapter(pipe, args)
    if args.finetune_steps or args.finetune_lr:
        raise UserError("--finetune-steps/--finetune-lr apply to causal-LM adapter pipelines only")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    dataset = load_dataset(args.dataset, pipe.target_spec.input, classes, args.label_column, args.text_column)
    result = generate_to_folder(
        pipe,
        dataset,
        args.out,
        num_samples=args.num_samples,
        seed=args.seed,
        select=args.select,
        held_back_fraction=args.held_back,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        source=args.pipeline,
        warn=warn,
    )
    print(f"wrote {len(result.files)} weight sets to {result.out}")
    if result.best is not None:
        line = f"best: {result.best}  accuracy on {result.num_held_back} held-back samples: {result.best_score:.4f}"
        if result.best_at_chance:  # never present chance-level weights as a good pick
            line += f"  AT CHANCE (below {result.chance_threshold:.2f}): no better than guessing; the dataset may be unlike the zoo's"
        print(line)
    if result.exported is not None:
        print(f"PEFT adapter + head.safetensors ({result.exported}) in {result.out}: PeftModel.from_pretrained(base, folder)")


def _generate_adapter(pipe, args: argparse.Namespace) -> None:
    from d2nwg.generate_adapter import generate_adapter_folder
    from d2nwg.instructions import read_instructions

    if args.finetune_lr and not args.finetune_steps:
        raise UserError("--finetune-lr needs --finetune-steps (the adapter is fine-tuned only when steps are given)")
    result = generate_adapter_folder(
        pipe, read_instructions(args.dataset), args.out, num_samples=args.num_samples, seed=args.seed,
        num_inference_steps=args.steps, guidance_scale=args.guidance, source=str(args.dataset),
        finetune_steps=args.finetune_steps or 0, finetune_lr=args.finetune_lr,
    )
    print(f"wrote a PEFT adapter to {result.out} (AutoPeftModelForCausalLM.from_pretrained loads base and adapter)")
    tuned = "" if result.finetune is None else f", then fine-tuned on them for {result.finetune['steps']} steps at lr {result.finetune['lr']:g}"
    print(
        f"best: sample {result.best} of {len(result.loglik)}  log-likelihood {result.loglik[result.best]:.4f} nats/token{tuned}  "
        f"exact match on the {result.records} records (greedy): {result.exact_match:.4f}"
    )
    for message in result.warnings:
        warn(message)


def cmd_push(args: argparse.Namespace) -> None:
    from d2nwg.hub import push_pipeline

    url = push_pipeline(args.pipeline, args.repo_id, private=args.private, report_dir=args.report, revision=args.revision)
    print(f"pushed to {url}")


# ----------------------------------------------------------------------------- adapters
def cmd_adapters_convert_bone(args: argparse.Namespace) -> None:
    from d2nwg.adapters import convert_bone_folder

    out, dropped = convert_bone_folder(args.input, args.output)
    if dropped:
        warn(f"config keys MiSS does not know were left out: {', '.join(dropped)}")
    print(f"MiSS adapter folder: {out} (PeftModel.from_pretrained(base, '{out}'))")


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from d2nwg.demo import run_demo

    run_demo(Path(args.out), config=args.config, fast=args.fast)


# ----------------------------------------------------------------------------- parser
TRUST_HELP = (
    "allow importing code that the files name (an architecture given as module:callable); it runs that module, "
    "so pass it only for files you trust (transformers' trust_remote_code)"
)
REVISION_HELP = "branch, tag or commit of a Hub repo id (default: main); the commit used is printed and recorded"


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def add_zoo_build_parser(zoo_sub) -> None:
    build = zoo_sub.add_parser("build", help="train a zoo from a recipe", formatter_class=FORMATTER)
    recipes = build.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    from model_zoo import RECIPES

    for name in RECIPES:
        recipe = RECIPES.get(name)
        p = recipes.add_parser(name, help=(recipe.settings_cls.__doc__ or "").strip(), formatter_class=FORMATTER)
        p.add_argument("--out", required=True, help="zoo directory (a killed build resumes here)")
        docs = recipe.settings_help()
        for f in recipe.settings():
            # ArgumentDefaultsHelpFormatter only shows "(default: ...)" for options that have help;
            # argparse %-formats help, so a literal "%" (e.g. "auto:top25%") must be doubled.
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                dest=f.name,
                type=type(f.default),
                default=f.default,
                help=docs[f.name].replace("%", "%%"),
            )
        p.set_defaults(func=cmd_zoo_build)


def add_zoo_info_parser(zoo_sub) -> None:
    info = zoo_sub.add_parser("info", help="print counts, sizes and accuracy of a zoo", formatter_class=FORMATTER)
    info.add_argument("zoo", help="zoo directory")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_trust_flag(info)
    info.set_defaults(func=cmd_zoo_info)


def add_zoo_ingest_parser(zoo_sub) -> None:
    ingest = zoo_sub.add_parser("ingest", help="build a zoo from your own checkpoints and datasets", formatter_class=FORMATTER)
    ingest.add_argument(
        "--checkpoints", required=True,
        help="folder of *.safetensors, *.pt, *.pth, *.bin or Lightning *.ckpt state_dicts, or of model folders "
        "<model>/checkpoint_<epoch>/checkpoints + <model>/result.json, at any depth; or of PEFT adapter folders "
        "(adapter_config.json + adapter_model.safetensors: LoRA, MiSS or legacy Bone) for a causal LM",
    )
    ingest.add_argument(
        "--datasets", required=True,
        help="folder of datasets: class-folder images, .npz (x, y) or .csv; for PEFT adapters, JSONL instruction files",
    )
    ingest.add_argument(
        "--mapping", required=True,
        help="CSV checkpoint,dataset[,split][,run] or JSON {checkpoint: dataset | {dataset, split, run}}; a checkpoint "
        "is a file path below --checkpoints or a model folder (its path, or its name if unique); one dataset = one "
        "task, and checkpoints sharing a run (or group) value stay on one side of the split",
    )
    ingest.add_argument(
        "--epochs", default="last",
        help="epochs of each model folder that become members: last, all, or N (the last N)",
    )
    ingest.add_argument("--arch", default=None, help="registered architecture name or module:callable (not for PEFT adapter folders)")
    ingest.add_argument("--base", default=None, help="PEFT adapter folders: their base model (default: their base_model_name_or_path)")
    ingest.add_argument("--arch-config", default=None, help="JSON object (or a .json file) of builder arguments")
    ingest.add_argument("--include", nargs="+", action="extend", default=None, metavar="GLOB", help="tensors to tokenize (default: all)")
    ingest.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="GLOB", help="tensors to leave out")
    ingest.add_argument("--chunk-size", type=int, default=32, help="numbers per weight token")
    ingest.add_argument("--heldout-fraction", type=float, default=0.1, help="share of datasets (tasks) without a mapped split held out")
    ingest.add_argument("--split-fractions", default="0.6,0.2,0.2", help="per-class train,support,test fractions of each dataset")
    ingest.add_argument("--image-size", default="8,8", help="H,W that image-folder datasets are resized to")
    ingest.add_argument("--label-column", default="label", help="label column of .csv datasets")
    ingest.add_argument("--seed", type=int, default=0, help="seed of data splits, held-out choice and initialisation")
    ingest.add_argument("--skip-bad", action="store_true", help="leave bad checkpoints out (with warnings) instead of failing")
    ingest.add_argument("--out", required=True, help="new zoo directory (must not exist or be empty)")
    ingest.add_argument(
        "--align", action="store_true",
        help="align members trained from different random inits to one reference (weight matching; writes alignment.json)",
    )
    ingest.set_defaults(func=cmd_zoo_ingest)


def add_zoo_align_parser(zoo_sub) -> None:
    align = zoo_sub.add_parser(
        "align", help="copy a zoo with every member permuted to match one reference (Git Re-Basin weight matching)",
        formatter_class=FORMATTER,
    )
    align.add_argument("zoo", help="zoo directory to align (left untouched)")
    align.add_argument("--out", required=True, help="new zoo directory (must not exist or be empty)")
    align.add_argument("--reference", default="auto", help="member id to align to ('auto': the first train member)")
    align.add_argument("--seed", type=int, default=0, help="seed of the layer order of weight matching")
    add_trust_flag(align)
    align.set_defaults(func=cmd_zoo_align)


def add_zoo_parser(sub) -> None:
    zoo = sub.add_parser("zoo", help="build, ingest, align or inspect model zoos", formatter_class=FORMATTER)
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    add_zoo_build_parser(zoo_sub)
    add_zoo_info_parser(zoo_sub)
    add_zoo_ingest_parser(zoo_sub)
    add_zoo_align_parser(zoo_sub)


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train the hyper-model (VAE, then diffusion)", formatter_class=FORMATTER)
    train.add_argument("--config", default=None, help="LightningCLI YAML, e.g. configs/digits.yaml (default: built-in digits settings)")
    train.add_argument("--out", required=True, help="run directory: logs, checkpoints/last.ckpt, pipeline/")
    train.add_argument("--zoo", default=None, help="zoo directory (overrides data.zoo of the config)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    train.add_argument("--logger", choices=["csv", "wandb"], default="csv", help="training logger")
    train.add_argument(
        "--devices", type=positive_int_or_auto, default=None, metavar="N",
        help="devices (GPUs, or CPU processes) per machine, or auto; more than one trains with data parallelism "
        "(default: the config's trainer.devices, else auto)",
    )
    train.add_argument("--num-nodes", type=positive_int, default=None, metavar="M", help="machines (default: 1)")
    train.add_argument(
        "--strategy", choices=["auto", "ddp", "fsdp"], default=None,
        help="auto: ddp on several devices; fsdp (sharding, for a denoiser too large for one device) is refused "
        "for now (README, Several GPUs)",
    )
    train.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default=None, help="device kind (default: auto)")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. model.diffusion_steps=100 or checkpoint.every_n_train_steps=50 "
        "(last.ckpt is also saved at the end of each stage, of fit, and on Ctrl-C/SIGTERM)",
    )
    add_trust_flag(train)
    train.set_defaults(func=cmd_train)


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
        help="baselines to run, names from d2nwg.baselines.BASELINES (an unknown name lists them; none given: all)",
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


def add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate weights for your dataset", formatter_class=FORMATTER)
    gen.add_argument("--pipeline", required=True, help="pipeline folder or Hub repo id")
    gen.add_argument("--revision", default=None, help=REVISION_HELP)
    gen.add_argument(
        "--dataset", required=True,
        help="folder of class subfolders of images, .npz (x, y) or .csv; text pipelines: .csv with text and label "
        "columns, or class subfolders of .txt files (one sentence per line); causal-LM pipelines: a .jsonl of "
        "{prompt, response} or {messages} records",
    )
    gen.add_argument("--out", required=True, help="new output folder for the generated weights")
    gen.add_argument("--num-samples", type=int, default=10, help="weight sets to generate")
    gen.add_argument("--select", choices=["support"], default=None, help="pick the best set on held-back samples")
    gen.add_argument("--held-back", type=float, default=0.3, help="fraction of each class held back for --select")
    gen.add_argument("--classes", default=None, help="class order a,b,c (default: sorted names)")
    gen.add_argument("--label-column", default="label", help="label column of a .csv dataset")
    gen.add_argument("--text-column", default="text", help="sentence column of a .csv dataset (text pipelines)")
    gen.add_argument("--base", default=None, help="text pipelines: local folder or Hub id of the base model, if not where the zoo had it")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps")
    gen.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    gen.add_argument("--head-solver", choices=HEAD_SOLVER_CHOICES, default=None, help="override how the pipeline writes heads")
    gen.add_argument(
        "--finetune-steps", type=positive_int, default=None,
        help="causal-LM pipelines: then fine-tune the chosen adapter on the records for this many steps (llm-lora: 16; unset: no fine-tuning)",
    )
    gen.add_argument("--finetune-lr", type=positive_float, default=None, help="causal-LM pipelines: its learning rate (unset: a fifth of the zoo members')")
    add_trust_flag(gen)
    gen.set_defaults(func=cmd_generate)


def add_push_parser(sub) -> None:
    push = sub.add_parser("push", help="upload a pipeline with a model card to the Hugging Face Hub", formatter_class=FORMATTER)
    push.add_argument("--pipeline", required=True, help="saved pipeline folder")
    push.add_argument("--repo-id", required=True, help="user/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to push to (created from main if missing; default: main)")
    push.add_argument("--report", default=None, help="evaluation folder whose report.json and plots go in the card")
    push.set_defaults(func=cmd_push)


def add_adapters_parser(sub) -> None:
    adapters = sub.add_parser("adapters", help="work with PEFT adapter folders", formatter_class=FORMATTER)
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    bone = adapters_sub.add_parser(
        "convert-bone", formatter_class=FORMATTER,
        help="convert a legacy Bone adapter folder (peft < 0.19, peft_type BONE, bone_block tensors) to MiSS",
    )
    bone.add_argument("input", help="Bone adapter folder (adapter_config.json + adapter_model.safetensors or .bin)")
    bone.add_argument("output", help="new MiSS adapter folder (must not exist or be empty)")
    bone.set_defaults(func=cmd_adapters_convert_bone)


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="build the digits zoo, train, evaluate and generate", formatter_class=FORMATTER)
    demo.add_argument("--out", default="runs/demo", help="demo directory")
    demo.add_argument("--config", default=None, help="training config (default: the packaged digits config)")
    demo.add_argument("--fast", action="store_true", help="tiny settings for a smoke run (poor quality)")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``d2nwg`` argument parser: one subcommand per ``add_<command>_parser``."""
    parser = argparse.ArgumentParser(prog="d2nwg", description="Diffusion-based neural network weight generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_zoo_parser, add_train_parser, add_evaluate_parser, add_generate_parser, add_push_parser, add_adapters_parser,
        add_demo_parser,
    ):
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


if __name__ == "__main__":
    sys.exit(main())
