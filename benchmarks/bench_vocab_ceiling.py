"""How many of a generative zoo's held-out test answers use only words that some data source writes.

A method can only write a word it has seen or the base already knows. For each held-out task of a
``causal-lm-adapter`` zoo, this counts the fraction of test references (in [0, 1]) whose words (letters only,
lower-cased; digits are copied from the prompt) all occur in

* ``support``: the task's own support references, what a user hands `d2nwg generate`, in-context examples and
  fine-tuning see;
* ``train``: the task's own training references, what its oracle member trained on;
* ``zoo``: the references of every *training* task, what any member of the zoo writes.

A generated adapter stays close to the members' span (`d2nwg.models.ConditionalMean` plus a small residual), so
``zoo`` coverage bounds what it can get right on its own unless the base knows the missing words. With
``--report`` (a ``report.json`` of ``d2nwg evaluate``) each row also shows the measured exact match of a few
methods, to set them against these ceilings.

    python benchmarks/bench_vocab_ceiling.py --zoo runs/llm-lora [--report runs/llm-lora-eval/report.json]

Measured on a from-scratch build of the default llm-lora recipe: docs/results/llm-lora.md, "Where it falls short:
Italian".
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

METHODS = ("icl", "finetune", "generated_best", "generated_finetune", "oracle")


def words(text: str) -> set[str]:
    """The lower-cased runs of letters in ``text`` (any script; digits and punctuation are not words here)."""
    return {w.lower() for w in re.findall(r"[^\W\d_]+", text)}


def coverage(references: Sequence[str], vocabulary: set[str]) -> float:
    """Fraction of ``references`` whose words all occur in ``vocabulary``, in [0, 1] (0 for no references)."""
    return sum(words(r) <= vocabulary for r in references) / max(len(references), 1)


def vocabulary(texts: Iterable[str]) -> set[str]:
    """Every word of ``texts``."""
    return set().union(*(words(t) for t in texts))


def ceilings(zoo) -> list[dict]:
    """One row per held-out task of ``zoo``: ``task``, ``kind`` and the ``support``/``train``/``zoo`` coverage of its
    test references (module docstring)."""
    from d2nwg.targets.causal_lm.decoding import references
    from d2nwg.targets.causal_lm.evaluate import read_split

    def refs(task: str, split: str) -> list[str]:
        return references(read_split(zoo, task, split))

    training = [t for t, r in zoo.tasks.items() if r["split"] == "train"]
    zoo_words = vocabulary(w for t in training for w in refs(t, "train"))
    rows = []
    for task, record in zoo.tasks.items():
        if record["split"] == "train":
            continue
        test = refs(task, "test")
        rows.append({
            "task": task, "kind": zoo.task_kind(task),
            "support": coverage(test, vocabulary(refs(task, "support"))),
            "train": coverage(test, vocabulary(refs(task, "train"))),
            "zoo": coverage(test, zoo_words),
        })  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    from d2nwg.zoo.model_zoo import ModelZoo

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", required=True, help="a causal-lm-adapter zoo (d2nwg zoo build llm-lora)")
    p.add_argument("--report", help="report.json of d2nwg evaluate on that zoo: adds measured exact match per task")
    args = p.parse_args(argv)
    rows = ceilings(ModelZoo.open(args.zoo))
    measured = {}
    if args.report:
        measured = {r["task"]: r for r in json.loads(Path(args.report).read_text())["tasks"]}
    cols = ["support", "train", "zoo"] + ([f"{m}_em" for m in METHODS] if measured else [])
    print("| task | kind | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for row in sorted(rows, key=lambda r: (r["kind"], r["task"])):
        row.update({c: measured[row["task"]][c] for c in cols[3:] if row["task"] in measured})
        print(f"| {row['task']} | {row['kind']} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols) + " |")
    groups = {"all": rows, "zoo coverage < 1": [r for r in rows if r["zoo"] < 1], "zoo coverage = 1": [r for r in rows if r["zoo"] == 1]}
    for name, group in groups.items():
        if group:
            means = [sum(r.get(c, float("nan")) for r in group) / len(group) for c in cols]
            print(f"| mean, {name} ({len(group)}) | | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
