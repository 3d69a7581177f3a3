"""Checkpoints grouped into tasks (one dataset each) and tasks split into training and held-out ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from d2nwg.ingest.datasets import ZooDataset
from d2nwg.ingest.validation import ValidCheckpoint


@dataclass
class IngestTask:
    """One zoo task: a dataset's classes in label order, and the checkpoints that become its members."""

    id: str
    dataset: str
    members: list[ValidCheckpoint]
    split: str | None
    """``"train"``/``"heldout"`` from the mapping, or None: `split_tasks` chooses."""
    order_key: str
    """Sorts the tasks whose split `split_tasks` chooses, so the choice ignores the mapping's order."""
    groups: tuple[str, ...] = ()
    """The mapping's run/group values of the members: tasks sharing one land on the same side of the split."""


def group_into_tasks(checkpoints: Sequence[ValidCheckpoint]) -> list[IngestTask]:
    """Stage 4: one task per dataset, named by the dataset, whose members are every checkpoint mapped to it
    (several epochs of a run, several runs), in the order datasets first appear.

    A task is the unit of the held-out choice, so all of a dataset's checkpoints land on one side: an "unseen"
    task never uses a dataset that training used.

    Returns:
        The tasks; a task's split is the split its checkpoints are mapped to (if any).

    Raises:
        ValueError: checkpoints of one dataset are mapped to different splits.
    """
    by_dataset: dict[str, list[ValidCheckpoint]] = {}
    for c in checkpoints:
        by_dataset.setdefault(c.dataset, []).append(c)
    tasks = []
    for dataset, members in by_dataset.items():
        splits = {c.entry.split: c.entry.checkpoint for c in members if c.entry.split}
        if len(splits) > 1:
            named = " and ".join(f"{split} ({name})" for split, name in sorted(splits.items()))
            raise ValueError(
                f"checkpoints of dataset '{dataset}' are mapped to {named}; a dataset is one task on one side of "
                "the split, so give all of its checkpoints the same split (or none)"
            )
        groups = tuple(sorted({c.entry.group for c in members if c.entry.group}))
        tasks.append(IngestTask(dataset, dataset, members, next(iter(splits), None), dataset, groups))
    return tasks


def split_units(tasks: Sequence[IngestTask]) -> list[list[IngestTask]]:
    """The tasks joined by shared run/group values (connected components), each unit in task order."""
    parent = list(range(len(tasks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, task in enumerate(tasks):
        for group in task.groups:
            j = first_with.setdefault(group, i)
            parent[root(i)] = root(j)
    units: dict[int, list[IngestTask]] = {}
    for i, task in enumerate(tasks):
        units.setdefault(root(i), []).append(task)
    return list(units.values())


def split_tasks(tasks: Sequence[IngestTask], heldout_fraction: float, seed: int) -> dict[str, str]:
    """Stage 5: ``"train"`` or ``"heldout"`` per task id, chosen per dataset, never per checkpoint.

    Tasks (datasets) that share a run/group value form one unit that lands on one side. Units keep a split given
    in the mapping; of the others a seeded ``heldout_fraction`` is held out, always leaving at least one
    training task.

    Raises:
        ValueError: a unit's tasks are mapped to different splits, or every task is held out.
    """
    task_split: dict[str, str] = {}
    free: list[tuple[str, list[IngestTask]]] = []
    for unit in split_units(tasks):
        mapped = {t.split: t.id for t in unit if t.split}
        if len(mapped) > 1:
            shared = sorted(set.intersection(*(set(t.groups) for t in unit)) or {g for t in unit for g in t.groups})
            named = " and ".join(f"'{task}' ({split})" for split, task in sorted(mapped.items()))
            raise ValueError(
                f"run/group {', '.join(repr(g) for g in shared[:3])} joins datasets {named}; checkpoints of one "
                "run/group must land on one side of the split"
            )
        if mapped:
            task_split.update({t.id: next(iter(mapped)) for t in unit})
        else:
            free.append((min(t.order_key for t in unit), unit))
    free.sort(key=lambda item: item[0])
    n_heldout = round(heldout_fraction * len(free))
    if "train" not in task_split.values():
        n_heldout = min(n_heldout, len(free) - 1)
    perm = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed)).tolist()
    for rank, i in enumerate(perm):
        for task in free[i][1]:
            task_split[task.id] = "heldout" if rank < max(n_heldout, 0) else "train"
    if "train" not in task_split.values():
        raise ValueError("every usable checkpoint is held out; a zoo needs at least one 'train' member")
    return task_split


def check_head_size(tasks: Sequence[IngestTask], datasets: Mapping[str, ZooDataset]) -> None:
    """Every task must have the same number of classes: the zoo's members share one head size.

    Raises:
        ValueError: the tasks' class counts differ.
    """
    counts = {datasets[t.dataset].data.num_classes for t in tasks}
    if len(counts) != 1:
        raise ValueError(f"checkpoints have different class counts {sorted(counts)}; one zoo needs one head size")
