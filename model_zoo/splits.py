"""Task splits shared by the recipes: training tasks and the two kinds of held-out task.

Every recipe draws *ordered* class tuples (the order is the label order). Training
and *unseen-order* tasks use only the seen classes; every *unseen-class* task holds
at least one class that no training task contains, so that evaluation can tell a
generator that handles a new dataset from one that recombines memorised classes
(`d2nwg.zoo.model_zoo.ModelZoo.task_kind` derives the kind back from the tasks alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def parse_class_list(text: str, known: Sequence[str], what: str = "unseen_classes") -> list[str]:
    """``"7,8,9"`` -> ``["7", "8", "9"]``, each one of ``known`` and distinct; ``""`` -> ``[]``.

    Raises:
        ValueError: an unknown or repeated class name.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"{what} must be distinct names from {list(known)}, got {text!r}")
    return names


def draw_split_tasks(
    classes: Sequence[str],
    unseen: Sequence[str],
    *,
    num_train: int,
    num_unseen_order: int,
    num_unseen_classes: int,
    draw: Callable[[Sequence[str]], tuple[str, ...]],
    accept: Callable[[tuple[str, ...]], bool] = lambda order: True,
) -> dict[str, dict]:
    """``{"task00000": {"classes": [...], "split": "train"|"heldout"}}``: distinct ordered tuples.

    Args:
        classes: every class of the pool; unseen: those no training task may contain.
        num_train, num_unseen_order, num_unseen_classes: how many tasks of each kind, in this order.
        draw: ``draw(pool) -> ordered tuple`` of the recipe's size, from the recipe's seeded generator.
        accept: extra constraint on a drawn tuple (e.g. text tasks need mirrored class pairs).

    The caller checks that enough distinct tuples exist; otherwise this loop would not end.
    """
    hidden = set(unseen)
    seen_pool = [c for c in classes if c not in hidden]
    used: set[tuple[str, ...]] = set()
    tasks: dict[str, dict] = {}

    def fill(pool: Sequence[str], count: int, split: str, need_unseen: bool) -> None:
        drawn = 0
        while drawn < count:
            order = draw(pool)
            if order in used or not accept(order) or (need_unseen and not hidden & set(order)):
                continue
            used.add(order)
            tasks[f"task{len(tasks):05d}"] = {"classes": list(order), "split": split}
            drawn += 1

    fill(seen_pool, num_train, "train", False)
    fill(seen_pool, num_unseen_order, "heldout", False)
    fill(list(classes), num_unseen_classes, "heldout", True)
    return tasks
