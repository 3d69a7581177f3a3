"""How much permutation alignment tightens a random-init zoo (`d2nwg.zoo.alignment.align_zoo_dir`).

Builds a digits zoo whose members start from independent random initialisations
(``init="random"``), aligns it to its first train member, and prints for the zoo
before and after alignment, next to a shared-init zoo of the same tasks:

- mean pairwise and mean nearest-neighbour L2 distance between train members;
- the same two distances over the hidden layer only (``fc0``), which holds most of
  the weights and all of the permutation symmetry's effect on rows;
- the wall time of the alignment.

    python benchmarks/bench_align.py --out runs/bench-align [--train 200 --steps 100 --hidden 32]

Run it on an otherwise idle machine: times are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def describe(zoo) -> dict:
    from d2nwg.zoo.alignment import distance_summary

    sds = zoo.state_dicts("train")
    hidden = distance_summary(sds, names=["fc0.weight", "fc0.bias"])
    accs = [m.metrics["test_acc"] for m in zoo.members()]
    return {
        **distance_summary(sds),
        "hidden_mean_pairwise": hidden["mean_pairwise"],
        "hidden_mean_nearest": hidden["mean_nearest"],
        "member_test_acc": sum(accs) / len(accs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-align", help="benchmark directory (wiped first)")
    parser.add_argument("--train", type=int, default=200, help="train tasks")
    parser.add_argument("--heldout", type=int, default=20, help="held-out tasks of each kind")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="weight-matching seed")
    args = parser.parse_args()

    from d2nwg.zoo.alignment import align_zoo_dir
    from model_zoo.digits import build

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    settings = {
        "num_train_tasks": args.train, "num_heldout_tasks": args.heldout, "num_unseen_class_tasks": args.heldout,
        "steps": args.steps, "hidden": args.hidden,
    }
    results = {"settings": settings}
    for init in ("random", "shared"):
        start = time.perf_counter()
        zoo = build(out / init, init=init, **settings)
        results[f"{init}_build_s"] = time.perf_counter() - start
        results[init] = describe(zoo)
    start = time.perf_counter()
    aligned = align_zoo_dir(out / "random", out / "random-aligned", seed=args.seed)
    results["align_s"] = time.perf_counter() - start
    results["random_aligned"] = describe(aligned)
    results["members"] = len(aligned)
    (out / "bench_align.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"{len(aligned)} members, hidden {args.hidden}, {args.steps} steps; alignment took {results['align_s']:.2f} s")
    print(f"{'zoo':<16}{'mean pairwise':>15}{'mean nearest':>14}{'fc0 pairwise':>14}{'fc0 nearest':>13}{'member acc':>12}")
    for name in ("random", "random_aligned", "shared"):
        r = results[name]
        print(
            f"{name:<16}{r['mean_pairwise']:>15.3f}{r['mean_nearest']:>14.3f}{r['hidden_mean_pairwise']:>14.3f}"
            f"{r['hidden_mean_nearest']:>13.3f}{r['member_test_acc']:>12.3f}"
        )


if __name__ == "__main__":
    main()
