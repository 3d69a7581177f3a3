"""Benchmark of a default configuration: zoo build -> train -> evaluate, with wall time per stage.

    python benchmarks/bench_default.py --out runs/bench          # digits; writes runs/bench/bench.json
    python benchmarks/bench_default.py --recipe text-lora --out runs/bench-lora   # configs/text-lora.yaml
    python benchmarks/bench_default.py --zoo-set init=random --align --out runs/bench-aligned  # random inits, aligned
    python benchmarks/bench_default.py --recipe llm-lora --out runs/bench-llm   # causal-LM adapters: exact match + bars

Run it on an otherwise idle machine: the numbers are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench", help="benchmark directory (wiped first)")
    parser.add_argument("--recipe", default="digits", help="zoo recipe: digits, text-lora or text-bone")
    parser.add_argument("--config", default=None, help="training config (default: configs/RECIPE.yaml)")
    parser.add_argument("--keep", action="store_true", help="reuse an existing zoo/pipeline in --out")
    parser.add_argument("--zoo-set", action="append", default=[], metavar="KEY=VALUE", help="recipe setting, e.g. init=random")
    parser.add_argument("--align", action="store_true", help="align the zoo's members (weight matching) before training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override, e.g. model.head_solver=generated")
    parser.add_argument("--max-tasks", type=int, default=None, help="evaluate only the first N held-out tasks of each kind")
    args = parser.parse_args()

    from d2nwg.evaluation.protocol import evaluate
    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
    from d2nwg.targets.causal_lm.evaluate import evaluate_causal_lm
    from d2nwg.training.lightning_cli import train
    from d2nwg.utils.console import print_summary, print_summary_by_kind
    from d2nwg.zoo.alignment import align_zoo_dir
    from d2nwg.zoo.model_zoo import ModelZoo
    from model_zoo import get_recipe

    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    times: dict[str, float] = {}

    recipe = get_recipe(args.recipe)
    types = {f.name: type(f.default) for f in recipe.settings()}
    settings = {}
    for item in args.zoo_set:
        key, _, value = item.partition("=")
        if key not in types:
            parser.error(f"--zoo-set: unknown {args.recipe} setting {key!r}; known: {sorted(types)}")
        settings[key] = types[key](value)
    t = time.perf_counter()
    zoo = recipe(out / "zoo", **settings)
    times["zoo_build_s"] = time.perf_counter() - t
    if args.align:
        t = time.perf_counter()
        if not (out / "zoo-aligned" / "alignment.json").exists():
            align_zoo_dir(zoo.root, out / "zoo-aligned")
        zoo = ModelZoo.open(out / "zoo-aligned")
        times["align_s"] = time.perf_counter() - t

    t = time.perf_counter()
    config = args.config or Path(__file__).resolve().parents[1] / "configs" / f"{args.recipe}.yaml"
    if not (out / "run" / "pipeline" / "model_index.json").exists():
        train(out / "run", str(config), str(zoo.root), args.set, progress_bar=False)
    times["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe = D2NWGPipeline.from_pretrained(out / "run" / "pipeline")
    generative = zoo.input_spec.kind == "generative-text"
    if generative:  # causal-LM adapters: exact match of greedy answers (d2nwg/targets/causal_lm/evaluate.py)
        report = evaluate_causal_lm(pipe, zoo, out / "report", max_tasks=args.max_tasks)
    else:
        report = evaluate(pipe, zoo, out / "report", progress=False, max_tasks=args.max_tasks)
    times["evaluate_s"] = time.perf_counter() - t
    if generative:  # sampling and decoding one adapter for one held-out task's support set (best of 3 runs)
        task = next(tid for tid, r in zoo.tasks.items() if r["split"] != "train")
        support = zoo.class_samples(task, "support")[0]
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            pipe(dataset=[support], num_samples=1, generator=torch.Generator().manual_seed(0))
            runs.append(time.perf_counter() - t)
        times["sample_one_adapter_s"] = min(runs)
    times["total_s"] = sum(v for k, v in times.items() if k != "sample_one_adapter_s")

    result = {
        "recipe": args.recipe,
        "zoo_settings": settings,
        "aligned": args.align,
        "train_overrides": args.set,
        "times": times,
        "summary": report["summary"],
        "summary_by_kind": report["summary_by_kind"],
        "torch_threads": torch.get_num_threads(),
    }
    if generative:
        result["bars"] = {kind: generation_bars(summary) for kind, summary in [("all", report["summary"]), *report["summary_by_kind"].items()]}
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    if generative:
        print(json.dumps(result["bars"], indent=2))
    else:
        print_summary(report["summary"])
        print_summary_by_kind(report["summary_by_kind"])
    print(json.dumps(times, indent=2))


def generation_bars(summary: dict) -> dict:
    """The issue's bars for generated adapters: generated best exact match against the oracle (ratio), the base
    with in-context examples and retrieval (margins), and the multi-task LoRA (margin)."""
    best = summary["generated_best_em"]
    oracle = summary["oracle_em"]
    return {
        "generated_best_em": best,
        "over_oracle": best / oracle if oracle else None,
        "minus_icl": best - summary["icl_em"],
        "minus_retrieval": best - summary["retrieval_em"],
        "minus_multitask": best - summary["multitask_em"],
    }


if __name__ == "__main__":
    main()
