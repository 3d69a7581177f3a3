"""The default zoo: small MLPs on 5-class tasks carved out of sklearn's bundled digits.

A task is an *ordered* choice of 5 of the 10 digits; the order defines the label
ids, so "3,1,7,0,9" and "1,3,7,0,9" are different tasks with different heads.
Held-out tasks use class orders that no training task uses.

Every member starts from **one shared initialisation**. Networks trained from
different random seeds differ by a permutation of their hidden units, which a VAE
cannot average over; from a shared start, unit *j* plays a comparable role in
every member, so the zoo is a smooth family that a generator can learn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from d2nwg.architectures import build_model
from d2nwg.ensemble import initial_state, recipe_optimizer
from d2nwg.weights import WeightLayout
from d2nwg.zoo import ModelZoo
from model_zoo.members import train_members


@dataclass
class DigitsRecipe:
    """Settings of the digits zoo."""

    num_train_tasks: int = 1000
    """Training tasks (one member each)."""
    num_heldout_tasks: int = 100
    """Unseen tasks kept for evaluation (their members are the oracles)."""
    classes_per_task: int = 5
    hidden: int = 32
    """Hidden width of the 64-hidden-K MLP; also the token size, so one token is one head row."""
    samples_train: int = 100
    """Per-class samples to train on; then support and test take the next ones."""
    samples_support: int = 30
    samples_test: int = 44
    steps: int = 100
    """Full-batch steps per member (reaches ~0.98 test accuracy)."""
    optimizer: str = "adamw"
    """"adamw" or "sgd". An SGD zoo (lr 0.5, momentum 0.9) is more compressible (lower VAE error)
    but its members were measured less robust to reconstruction error, and generated worse."""
    lr: float = 1e-2
    momentum: float = 0.9
    """Used by "sgd" only."""
    weight_decay: float = 0.0
    group_size: int = 128
    """Members trained together in one batched run; also the unit of resuming."""
    seed: int = 0


def digits_pool(recipe: DigitsRecipe) -> dict[str, dict[str, torch.Tensor]]:
    """Per-class train/support/test splits of ``load_digits`` (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(recipe.seed)
    a, b = recipe.samples_train, recipe.samples_train + recipe.samples_support
    c = b + recipe.samples_test
    pool = {}
    for digit in range(10):
        idx = (y == digit).nonzero().squeeze(1)
        if len(idx) < c:
            raise ValueError(f"digit {digit} has {len(idx)} samples, the recipe needs {c}")
        idx = idx[torch.randperm(len(idx), generator=g)]
        pool[str(digit)] = {"train": x[idx[:a]], "support": x[idx[a:b]], "test": x[idx[b:c]]}
    return pool


def digits_tasks(recipe: DigitsRecipe) -> dict[str, dict]:
    """Distinct ordered class tuples: the first ones train, the rest are held out."""
    g = torch.Generator().manual_seed(recipe.seed + 1)
    total = recipe.num_train_tasks + recipe.num_heldout_tasks
    if not 1 <= recipe.classes_per_task <= 10:
        raise ValueError(f"classes_per_task must be between 1 and 10, got {recipe.classes_per_task}")
    available = math.perm(10, recipe.classes_per_task)
    if total > available:
        # Otherwise the loop below never finds enough distinct class orders.
        raise ValueError(
            f"{total} tasks requested but only {available} ordered choices of {recipe.classes_per_task} of 10 digits exist"
        )
    seen: set[tuple[int, ...]] = set()
    tasks = {}
    while len(tasks) < total:
        order = tuple(torch.randperm(10, generator=g)[: recipe.classes_per_task].tolist())
        if order in seen:
            continue
        seen.add(order)
        i = len(tasks)
        split = "train" if i < recipe.num_train_tasks else "heldout"
        tasks[f"task{i:05d}"] = {"classes": [str(d) for d in order], "split": split}
    return tasks


def build(out: str | Path, **settings) -> ModelZoo:
    """Build (or resume building) the digits zoo in ``out``."""
    recipe = DigitsRecipe(**settings)
    arch = {"name": "mlp", "config": {"in_features": 64, "hidden": [recipe.hidden], "num_classes": recipe.classes_per_task}}
    model = build_model(arch)
    init = initial_state(lambda: build_model(arch), recipe.seed)
    layout = WeightLayout.from_state_dict(init, chunk_size=recipe.hidden)
    zoo = ModelZoo.create(
        out,
        architecture=arch,
        layout=layout,
        classes=digits_pool(recipe),
        tasks=digits_tasks(recipe),
        init_state=init,
        feature="identity",
        input_spec={"image_size": [8, 8], "grayscale": True},
        recipe={"name": "digits", **asdict(recipe)},
    )
    train_members(
        zoo, model, init, steps=recipe.steps, optim=recipe_optimizer(asdict(recipe)),
        group_size=recipe.group_size, seed=recipe.seed,
    )
    zoo.fit_layout("train")
    return zoo
