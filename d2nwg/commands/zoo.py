"""``d2nwg zoo build|info|ingest|align``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from d2nwg.commands.options import FORMATTER, add_trust_flag, warn
from d2nwg.errors import UserError
from d2nwg.utils.console import print_zoo


# ----------------------------------------------------------------------------- zoo
def cmd_zoo_build(args: argparse.Namespace) -> None:
    from model_zoo import get_recipe

    recipe = get_recipe(args.recipe)
    zoo = recipe(args.out, **{f.name: getattr(args, f.name) for f in recipe.settings()})
    print_zoo(zoo.summary())


def cmd_zoo_info(args: argparse.Namespace) -> None:
    from d2nwg.zoo.model_zoo import ModelZoo

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
    from d2nwg.ingest.build import ingest
    from d2nwg.ingest.checkpoints import BadCheckpointsError
    from d2nwg.targets.causal_lm.ingest import find_adapter_folders, ingest_adapters

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
    from d2nwg.zoo.alignment import align_zoo_dir

    zoo = align_zoo_dir(args.zoo, args.out, reference=args.reference, seed=args.seed)
    print_zoo(zoo.summary())
    print(f"alignment: {zoo.root / 'alignment.json'}")


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
