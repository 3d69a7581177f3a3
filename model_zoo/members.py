"""Training a zoo's members in vmapped groups, from one shared initialisation or one per task, resumably."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from rich.progress import Progress
from torch import nn

from d2nwg.targets.population import population_accuracy, stack_state_dicts, train_population, unstack_state_dict
from d2nwg.zoo.model_zoo import SPLITS, ModelZoo, member_groups


def stacked_task_data(zoo: ModelZoo, task_ids: list[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, n, D]``, ``y [N, n]`` for tasks whose classes have equal sample counts."""
    data = [zoo.task_data(t, split) for t in task_ids]
    return torch.stack([x for x, _ in data]), torch.stack([y for _, y in data])


def train_members(
    zoo: ModelZoo,
    model: nn.Module,
    init: Mapping[str, torch.Tensor] | Callable[[str], Mapping[str, torch.Tensor]],
    *,
    steps: int,
    optim: Mapping,
    group_size: int,
    seed: int,
    description: str = "training zoo members",
) -> None:
    """Train one member per task of ``zoo`` and add it with its train/support/test accuracy.

    ``init`` is the shared initial state_dict, or a callable ``task_id -> state_dict`` giving each
    member its own initialisation (it must be deterministic, so a resumed build trains the same members).

    Groups of ``group_size`` consecutive tasks train together and are the unit of resuming:
    a group whose members are all in the zoo is skipped, so a killed build redoes only the rest.
    """
    task_ids = list(zoo.tasks)
    with Progress(transient=True) as progress:
        bar = progress.add_task(description, total=len(task_ids))
        for group in member_groups(task_ids, group_size):
            if all(f"{t}-s{seed}" in zoo for t in group):
                progress.advance(bar, len(group))
                continue
            x, y = stacked_task_data(zoo, group, "train")
            if callable(init):
                stacked = stack_state_dicts([init(t) for t in group])
                params, _ = train_population(model, stacked, x, y, steps=steps, stacked_init=True, **optim)
            else:
                params, _ = train_population(model, init, x, y, steps=steps, **optim)
            accs = {s: population_accuracy(model, params, *stacked_task_data(zoo, group, s)) for s in SPLITS}
            for i, (task, sd) in enumerate(zip(group, unstack_state_dict(params))):
                zoo.add(sd, task, {f"{s}_acc": float(acc[i]) for s, acc in accs.items()}, seed=seed, flush=False)
            zoo.flush()
            progress.advance(bar, len(group))
