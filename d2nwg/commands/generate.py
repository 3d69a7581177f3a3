"""``d2nwg generate``: weights (or a PEFT adapter) for a user's dataset, written to a folder."""

from __future__ import annotations

import argparse

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


# ----------------------------------------------------------------------------- generate / push
def cmd_generate(args: argparse.Namespace) -> None:
    from d2nwg.data.labelled import load_dataset
    from d2nwg.pipelines.output_folder import generate_to_folder, use_base

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
    from d2nwg.data.instructions import read_instructions
    from d2nwg.targets.causal_lm.generate import generate_adapter_folder

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
