"""The ``d2nwg`` command line: a thin layer over library functions.

User mistakes (bad paths, corrupt files, shape mismatches) surface as one
``error: ...`` line and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in the user's input: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- zoo
def _recipe_settings(name: str):
    import importlib

    from model_zoo import RECIPES

    module = importlib.import_module(RECIPES[name])
    return next(v for v in vars(module).values() if dataclasses.is_dataclass(v) and v.__module__ == module.__name__)


def _field_help(settings_cls) -> dict[str, str]:
    """The docstring under each field of a settings dataclass (``--help`` text; defaults need one)."""
    import ast
    import inspect
    import textwrap

    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(settings_cls))).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return {}
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from model_zoo import get_recipe

    settings_cls = _recipe_settings(args.recipe)
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_cls)}
    zoo = get_recipe(args.recipe)(args.out, **settings)
    _print_zoo(zoo.summary())


def cmd_zoo_info(args: argparse.Namespace) -> None:
    from d2nwg.zoo import ModelZoo

    summary = ModelZoo.open(args.zoo).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_zoo(summary)


def cmd_zoo_ingest(args: argparse.Namespace) -> None:
    from d2nwg.ingest import BadCheckpointsError, ingest

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
            warn=lambda message: print(f"warning: {message}", file=sys.stderr),
        )
    except BadCheckpointsError as err:
        for bad in err.bad:
            print(f"bad checkpoint {bad.name}: {bad.reason}", file=sys.stderr)
        raise UserError(str(err)) from None
    _print_zoo(zoo.summary())


def _print_zoo(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model zoo {summary['root']}", show_header=False)
    acc = summary["test_acc"]
    rows = [
        ("architecture", json.dumps(summary["architecture"])),
        ("members", f"{summary['members']}  {summary['members_by_split']}"),
        ("tasks", f"{summary['tasks']}  {summary['tasks_by_split']}"),
        ("classes in pool", str(summary["classes"])),
        ("parameters per member", f"{summary['params_per_member']:,}"),
        ("tokens per member", f"{summary['tokens_per_member']} x {summary['chunk_size']}"),
        ("member test accuracy", f"mean {acc['mean']:.4f}  min {acc['min']:.4f}  max {acc['max']:.4f}"),
        ("samples per split", json.dumps(summary["samples_per_split"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


# ----------------------------------------------------------------------------- train
def train_args(config: str | None, zoo: str | None, overrides: list[str]) -> list[str]:
    """LightningCLI arguments for one `d2nwg train` run."""
    args = ["--config", config] if config else []
    if zoo:
        args += ["--data.zoo", zoo]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        args += [f"--{key}", value]
    return args


def cmd_train(args: argparse.Namespace) -> None:
    from d2nwg.lightning_cli import make_cli

    out = Path(args.out)
    if args.config and not Path(args.config).is_file():
        raise UserError(f"config file not found: {args.config}")
    try:
        cli = make_cli(train_args(args.config, args.zoo, args.set), run=False, out=str(out), logger=args.logger)
    except argparse.ArgumentError as err:
        raise UserError(f"invalid training configuration: {err}") from None
    ckpt = out / "checkpoints" / "last.ckpt"
    if args.resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt}")
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(ckpt) if args.resume else None)
    print(f"pipeline: {out / 'pipeline'}")


# ----------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    from d2nwg.evaluate import evaluate
    from d2nwg.pipeline import D2NWGPipeline
    from d2nwg.zoo import ModelZoo

    pipe = D2NWGPipeline.from_pretrained(args.pipeline)
    report = evaluate(
        pipe,
        ModelZoo.open(args.zoo),
        Path(args.out),
        num_samples=args.num_samples,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        max_tasks=args.max_tasks,
    )
    print_summary(report["summary"])
    print(f"report: {Path(args.out) / 'report.md'}")


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out tasks (accuracy on test samples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int) or value is None:
            table.add_row(key, str(value))
    Console().print(table)


# ----------------------------------------------------------------------------- generate / push
def cmd_generate(args: argparse.Namespace) -> None:
    from d2nwg.datasets import load_dataset
    from d2nwg.generate import generate_to_folder, use_base
    from d2nwg.pipeline import D2NWGPipeline

    pipe = D2NWGPipeline.from_pretrained(args.pipeline)
    if args.base:
        use_base(pipe, args.base)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    dataset = load_dataset(args.dataset, pipe.config.target.get("input"), classes, args.label_column, args.text_column)
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
    )
    print(f"wrote {len(result.files)} weight sets to {result.out}")
    if result.best is not None:
        print(f"best: {result.best}  accuracy on {result.num_held_back} held-back samples: {result.best_score:.4f}")
    if result.exported is not None:
        print(f"PEFT adapter + head.safetensors ({result.exported}) in {result.out}: PeftModel.from_pretrained(base, folder)")


def cmd_push(args: argparse.Namespace) -> None:
    from d2nwg.hub import push_pipeline

    url = push_pipeline(args.pipeline, args.repo_id, private=args.private, report_dir=args.report)
    print(f"pushed to {url}")


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from d2nwg.demo import run_demo

    run_demo(Path(args.out), config=args.config, fast=args.fast)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="d2nwg", description="Diffusion-based neural network weight generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="build, ingest or inspect model zoos", formatter_class=fmt)
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="train a zoo from a recipe", formatter_class=fmt)
    recipes = build.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    from model_zoo import RECIPES

    for name in RECIPES:
        settings_cls = _recipe_settings(name)
        p = recipes.add_parser(name, help=(settings_cls.__doc__ or "").strip(), formatter_class=fmt)
        p.add_argument("--out", required=True, help="zoo directory (a killed build resumes here)")
        docs = _field_help(settings_cls)
        for f in dataclasses.fields(settings_cls):
            # ArgumentDefaultsHelpFormatter only shows "(default: ...)" for options that have help.
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                dest=f.name,
                type=type(f.default),
                default=f.default,
                help=docs.get(f.name, f.name.replace("_", " ")),
            )
        p.set_defaults(func=cmd_zoo_build)
    info = zoo_sub.add_parser("info", help="print counts, sizes and accuracy of a zoo", formatter_class=fmt)
    info.add_argument("zoo", help="zoo directory")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=cmd_zoo_info)
    ingest = zoo_sub.add_parser("ingest", help="build a zoo from your own checkpoints and datasets", formatter_class=fmt)
    ingest.add_argument("--checkpoints", required=True, help="folder of *.safetensors, *.pt or *.pth state_dicts")
    ingest.add_argument("--datasets", required=True, help="folder of datasets: class-folder images, .npz (x, y) or .csv")
    ingest.add_argument("--mapping", required=True, help="CSV checkpoint,dataset[,split] or JSON {checkpoint: dataset}")
    ingest.add_argument("--arch", required=True, help="registered architecture name or module:callable")
    ingest.add_argument("--arch-config", default=None, help="JSON object (or a .json file) of builder arguments")
    ingest.add_argument("--include", nargs="+", action="extend", default=None, metavar="GLOB", help="tensors to tokenize (default: all)")
    ingest.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="GLOB", help="tensors to leave out")
    ingest.add_argument("--chunk-size", type=int, default=32, help="numbers per weight token")
    ingest.add_argument("--heldout-fraction", type=float, default=0.1, help="share of checkpoints without a mapped split held out")
    ingest.add_argument("--split-fractions", default="0.6,0.2,0.2", help="per-class train,support,test fractions of each dataset")
    ingest.add_argument("--image-size", default="8,8", help="H,W that image-folder datasets are resized to")
    ingest.add_argument("--label-column", default="label", help="label column of .csv datasets")
    ingest.add_argument("--seed", type=int, default=0, help="seed of data splits, held-out choice and initialisation")
    ingest.add_argument("--skip-bad", action="store_true", help="leave bad checkpoints out (with warnings) instead of failing")
    ingest.add_argument("--out", required=True, help="new zoo directory (must not exist or be empty)")
    ingest.set_defaults(func=cmd_zoo_ingest)

    train = sub.add_parser("train", help="train the hyper-model (VAE, then diffusion)", formatter_class=fmt)
    train.add_argument("--config", default=None, help="LightningCLI YAML, e.g. configs/digits.yaml (default: built-in digits settings)")
    train.add_argument("--out", required=True, help="run directory: logs, checkpoints/last.ckpt, pipeline/")
    train.add_argument("--zoo", default=None, help="zoo directory (overrides data.zoo of the config)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    train.add_argument("--logger", choices=["csv", "wandb"], default="csv", help="training logger")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.diffusion_steps=100")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a pipeline on a zoo's held-out tasks", formatter_class=fmt)
    ev.add_argument("--pipeline", required=True, help="pipeline folder or Hub repo id")
    ev.add_argument("--zoo", required=True, help="zoo directory with held-out tasks")
    ev.add_argument("--out", required=True, help="report folder (report.json, report.md, plots)")
    ev.add_argument("--num-samples", type=int, default=10, help="weight sets generated per task")
    ev.add_argument("--steps", type=int, default=50, help="denoising steps")
    ev.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--max-tasks", type=int, default=None, help="evaluate only the first N held-out tasks")
    ev.set_defaults(func=cmd_evaluate)

    gen = sub.add_parser("generate", help="generate weights for your dataset", formatter_class=fmt)
    gen.add_argument("--pipeline", required=True, help="pipeline folder or Hub repo id")
    gen.add_argument(
        "--dataset", required=True,
        help="folder of class subfolders of images, .npz (x, y) or .csv; text pipelines: .csv with text and label "
        "columns, or class subfolders of .txt files (one sentence per line)",
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
    gen.set_defaults(func=cmd_generate)

    push = sub.add_parser("push", help="upload a pipeline with a model card to the Hugging Face Hub", formatter_class=fmt)
    push.add_argument("--pipeline", required=True, help="saved pipeline folder")
    push.add_argument("--repo-id", required=True, help="user/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--report", default=None, help="evaluation folder whose report.json and plots go in the card")
    push.set_defaults(func=cmd_push)

    demo = sub.add_parser("demo", help="build the digits zoo, train, evaluate and generate", formatter_class=fmt)
    demo.add_argument("--out", default="runs/demo", help="demo directory")
    demo.add_argument("--config", default=None, help="training config (default: the packaged digits config)")
    demo.add_argument("--fast", action="store_true", help="tiny settings for a smoke run (poor quality)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
