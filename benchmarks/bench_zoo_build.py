"""Time the default digits zoo build (the project's target: at most 3 minutes on 2 cores).

    python benchmarks/bench_zoo_build.py --out runs/bench_zoo
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_zoo", help="zoo directory (wiped first)")
    args = parser.parse_args()

    from model_zoo import get_recipe

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    zoo = get_recipe("digits")(out)
    seconds = time.perf_counter() - t
    summary = zoo.summary()
    result = {
        "build_seconds": round(seconds, 1),
        "members": summary["members"],
        "members_by_split": summary["members_by_split"],
        "mean_test_acc": summary["test_acc"]["mean"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
