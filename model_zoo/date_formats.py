"""A family of generative tasks made offline: date format conversions.

A task is a pair (input format, output format): the prompt is a date written in the
input format and the response is the same date in the output format, e.g.
``"2023-04-17" -> "17 avril 2023"`` for ``ymd-dash -> long-fr``. Every prompt has exactly one
right answer, so exact match is meaningful, and the task is defined by its examples only
(the prompt never says which format is wanted): the adapter must carry it.

Formats:

- **numeric**: the orders ``ymd``, ``dmy``, ``mdy`` with the separators ``-``, ``/``, ``.``, space
  (zero-padded; 12 formats, named ``dmy-slash`` etc.);
- **long** and **medium** dates in CLDR locales, through Babel's ``format_date`` (``long-fr`` is
  "17 avril 2023", ``medium-de`` "17.04.2023"; month names and word order per language).

Numeric formats and the long English/French/German ones can be inputs (a small LM can read
them); every format can be an output. With the default 8 long and 4 medium locales that is
16 input x 24 output formats, 368 tasks with different input and output.

*Unseen* held-out tasks use an output format that no training task outputs: a language
(``long-it``) or a numeric format whose order and separator each appear in training, but
never together (``dmy-space``). *New-combination* held-out tasks pair an input and an output
format that both occur in training, never together.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Sequence

ORDERS = {"ymd": ("%Y", "%m", "%d"), "dmy": ("%d", "%m", "%Y"), "mdy": ("%m", "%d", "%Y")}
SEPARATORS = {"dash": "-", "slash": "/", "dot": ".", "space": " "}
LONG_LOCALES = ("en_US", "en_GB", "fr", "de", "es", "it", "pt", "nl")
MEDIUM_LOCALES = ("en_US", "fr", "de", "es")
INPUT_NAMED = ("long-en_US", "long-en_GB", "long-fr", "long-de")
FIRST_DAY = datetime.date(1950, 1, 1)
DAYS = 365 * 100  # dates from 1950 to 2049


def formats() -> dict[str, Callable[[datetime.date], str]]:
    """Every format name -> ``render(date) -> str`` (numeric first, then long, then medium)."""
    from babel.dates import format_date

    out: dict[str, Callable[[datetime.date], str]] = {}
    for order, fields in ORDERS.items():
        for sep_name, sep in SEPARATORS.items():
            pattern = sep.join(fields)
            out[f"{order}-{sep_name}"] = lambda d, p=pattern: d.strftime(p)
    for style, locales in (("long", LONG_LOCALES), ("medium", MEDIUM_LOCALES)):
        for locale in locales:
            out[f"{style}-{locale}"] = lambda d, s=style, loc=locale: format_date(d, s, locale=loc)
    return out


def input_formats() -> list[str]:
    """The formats a prompt may be written in: every numeric format and `INPUT_NAMED`."""
    return [f for f in formats() if f.split("-")[0] in ORDERS] + list(INPUT_NAMED)


def all_tasks() -> list[tuple[str, str]]:
    """Every ``(input format, output format)`` pair with different formats, in a fixed order."""
    return [(i, o) for i in input_formats() for o in formats() if i != o]


def task_id(pair: tuple[str, str]) -> str:
    """``("ymd-dash", "long-fr")`` -> ``"ymd-dash__long-fr"`` (safe as a file name)."""
    return f"{pair[0]}__{pair[1]}"


def split_tasks(
    unseen_outputs: Sequence[str], num_new_combinations: int, num_train: int | None, seed: int, num_unseen: int | None = None
) -> dict[str, dict]:
    """``{task_id: {"classes": [task_id], "split": ..., "kind": ...}}`` for the zoo manifest.

    Args:
        unseen_outputs: output formats no training task uses; every task with one of them is held out as
            ``"unseen_output"``.
        num_new_combinations: held-out tasks (kind ``"new_combination"``) drawn from the remaining pairs, each of
            whose input and output formats still occurs in some training task.
        num_train: training tasks kept (``None``: all the remaining pairs).
        num_unseen: unseen-output tasks kept, a seeded draw (``None``: all of them).
        seed: seeds the draw.

    Raises:
        ValueError: an unknown format name, or too few pairs for the counts asked.
    """
    known = formats()
    unknown = [f for f in unseen_outputs if f not in known]
    if unknown:
        raise ValueError(f"unknown output formats {unknown}; expected names from {list(known)}")
    rng = random.Random(seed)
    pairs = all_tasks()
    unseen = [p for p in pairs if p[1] in set(unseen_outputs)]
    rest = [p for p in pairs if p[1] not in set(unseen_outputs)]
    rng.shuffle(rest)
    if num_unseen is not None:
        unseen = sorted(random.Random(f"{seed}:unseen").sample(unseen, min(num_unseen, len(unseen))))
    combos: list[tuple[str, str]] = []
    train = list(rest)
    for pair in rest:
        if len(combos) == num_new_combinations:
            break
        others = [p for p in train if p != pair]
        # Hold a pair out only if both of its formats stay in training (else it would be an unseen format).
        if any(p[0] == pair[0] for p in others) and any(p[1] == pair[1] for p in others):
            combos.append(pair)
            train.remove(pair)
    if len(combos) < num_new_combinations:
        raise ValueError(f"only {len(combos)} new-combination tasks can be held out, {num_new_combinations} asked")
    if num_train is not None:
        if num_train > len(train):
            raise ValueError(f"num_train_tasks={num_train} but only {len(train)} training pairs exist")
        train, spare = train[:num_train], train[num_train:]
        # The cut may drop the only training task of a held-out pair's format: swap in a spare pair still covered.
        inputs, outputs = {p[0] for p in train}, {p[1] for p in train}
        spare = [p for p in spare if p[0] in inputs and p[1] in outputs]
        combos = [p if p[0] in inputs and p[1] in outputs else (spare.pop(0) if spare else None) for p in combos]
        if None in combos:
            raise ValueError(f"num_train_tasks={num_train} is too few to hold out {num_new_combinations} new-combination tasks")
    tasks: dict[str, dict] = {}
    for pair in train:
        tasks[task_id(pair)] = {"classes": [task_id(pair)], "split": "train"}
    for kind, group in (("new_combination", combos), ("unseen_output", unseen)):
        for pair in group:
            tasks[task_id(pair)] = {"classes": [task_id(pair)], "split": "heldout", "kind": kind}
    return tasks


def conversations(task: str, count: int, seed: int, system: str = "") -> list[list[dict]]:
    """``count`` chat conversations of ``task`` on distinct random dates (seeded by ``seed`` and the task).

    The system message is the same for every task (empty by default: the task lives in the examples, and the
    chat template's default system prompt would only cost tokens).
    """
    source, target = task.split("__")
    render = formats()
    rng = random.Random(f"{seed}:{task}")
    days = rng.sample(range(DAYS), count)
    out = []
    for day in days:
        date = FIRST_DAY + datetime.timedelta(days=day)
        out.append([
            {"role": "system", "content": system},
            {"role": "user", "content": render[source](date)},
            {"role": "assistant", "content": render[target](date)},
        ])  # fmt: skip
    return out
