"""The default zoo: small MLPs on 5-class tasks carved out of sklearn's bundled digits.

A task is an *ordered* choice of 5 digits; the order defines the label ids, so
"3,1,6,0,2" and "1,3,6,0,2" are different tasks with different heads. Training
tasks use only the *seen* digits (all but ``unseen_classes``, default 7, 8, 9).
Held-out tasks are of two kinds: *unseen order* (seen digits in a combination and
order no training task uses) and *unseen classes* (at least one digit that no
training task contains).

Every member starts from **one shared initialisation**. Networks trained from
different random seeds differ by a permutation of their hidden units, which a VAE
cannot average over; from a shared start, unit *j* plays a comparable role in
every member, so the zoo is a smooth family that a generator can learn. With
``init="random"`` each member starts from its own seeded initialisation instead, as
collected checkpoints do; align such a zoo with `d2nwg.zoo.alignment.align_zoo_dir`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from d2nwg.targets.architectures import build_model
from d2nwg.targets.population import initial_state, recipe_optimizer
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import ModelZoo
from d2nwg.zoo.specs import InputSpec
from model_zoo import Recipe
from model_zoo.members import train_members
from model_zoo.splits import draw_split_tasks, parse_class_list


@dataclass
class DigitsRecipe:
    """Settings of the digits zoo."""

    num_train_tasks: int = 1000
    """Training tasks (one member each)."""
    num_heldout_tasks: int = 100
    """Held-out tasks of *unseen order*: a combination and order of seen classes that no training task
    uses (their members are the oracles)."""
    num_unseen_class_tasks: int = 100
    """Held-out tasks of *unseen classes*: each contains at least one of ``unseen_classes``."""
    unseen_classes: str = "7,8,9"
    """Comma-separated digits that no training task contains ("" for none): held-out tasks with them
    test generation for a genuinely new dataset, not a recombination of memorised classes."""
    classes_per_task: int = 5
    """Classes per task (K): the head size of every member."""
    hidden: int = 32
    """Hidden width of the 64-hidden-K MLP; also the token size, so one token is one head row."""
    samples_train: int = 100
    """Per-class samples to train on; then support and test take the next ones."""
    samples_support: int = 30
    """Per-class samples a generated model is conditioned on (and selected with) at evaluation."""
    samples_test: int = 44
    """Per-class samples that measure test accuracy."""
    steps: int = 100
    """Full-batch steps per member (reaches ~0.98 test accuracy)."""
    optimizer: str = "adamw"
    """"adamw" or "sgd". An SGD zoo (lr 0.5, momentum 0.9) is more compressible (lower VAE error)
    but its members were measured less robust to reconstruction error, and generated worse."""
    lr: float = 1e-2
    """Learning rate of the member optimiser."""
    momentum: float = 0.9
    """Used by "sgd" only."""
    weight_decay: float = 0.0
    """Weight decay of the member optimiser."""
    group_size: int = 128
    """Members trained together in one batched run; also the unit of resuming."""
    seed: int = 0
    """Seed of the data splits, the task draw and the shared initialisation."""
    init: str = "shared"
    """"shared" (every member from one initialisation) or "random" (each member from its own seeded
    initialisation, the common case for collected checkpoints; align with d2nwg zoo align)."""


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
    """Distinct ordered class tuples: training tasks, then the two kinds of held-out task.

    Training and unseen-order tasks use only the seen digits; every unseen-class task
    contains at least one of ``recipe.unseen_classes``, so no training task ever sees them.
    """
    k = recipe.classes_per_task
    if not 1 <= k <= 10:
        raise ValueError(f"classes_per_task must be between 1 and 10, got {k}")
    digits = [str(d) for d in range(10)]
    unseen = parse_class_list(recipe.unseen_classes, digits)
    seen_count = 10 - len(unseen)
    seen_total = recipe.num_train_tasks + recipe.num_heldout_tasks
    available = math.perm(seen_count, k) if k <= seen_count else 0
    if seen_total > available:
        # Otherwise the drawing loop never finds enough distinct class orders.
        raise ValueError(
            f"{seen_total} train + unseen-order tasks requested but only {available} ordered choices of "
            f"{k} of the {seen_count} seen digits exist"
        )
    novel_available = math.perm(10, k) - available
    if recipe.num_unseen_class_tasks > novel_available:
        raise ValueError(
            f"{recipe.num_unseen_class_tasks} unseen-class tasks requested but only {novel_available} ordered "
            f"choices of {k} digits contain one of {unseen}"
        )
    g = torch.Generator().manual_seed(recipe.seed + 1)
    return draw_split_tasks(
        digits, unseen,
        num_train=recipe.num_train_tasks, num_unseen_order=recipe.num_heldout_tasks,
        num_unseen_classes=recipe.num_unseen_class_tasks,
        draw=lambda pool: tuple(pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()),
    )


def build(out: str | Path, **settings) -> ModelZoo:
    """Build (or resume building) the digits zoo in ``out``."""
    recipe = DigitsRecipe(**settings)
    # Every setting is checked before the zoo folder exists: a fixed retry must not meet a half-made zoo.
    if recipe.init not in ("shared", "random"):
        raise ValueError(f"init must be 'shared' or 'random', got {recipe.init!r}")
    for name in ("num_train_tasks", "steps", "group_size", "hidden", "samples_train", "samples_support", "samples_test"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(recipe, name)}")
    for name in ("num_heldout_tasks", "num_unseen_class_tasks"):
        if getattr(recipe, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(recipe, name)}")
    if recipe.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {recipe.optimizer!r}")
    tasks = digits_tasks(recipe)
    arch = {"name": "mlp", "config": {"in_features": 64, "hidden": [recipe.hidden], "num_classes": recipe.classes_per_task}}
    model = build_model(arch)
    init = initial_state(lambda: build_model(arch), recipe.seed)
    layout = WeightLayout.from_state_dict(init, chunk_size=recipe.hidden)
    zoo = ModelZoo.create(
        out,
        architecture=arch,
        layout=layout,
        classes=digits_pool(recipe),
        tasks=tasks,
        init_state=init if recipe.init == "shared" else None,  # none: baselines must not assume a shared start
        input_spec=InputSpec(kind="image", image_size=(8, 8), grayscale=True),
        recipe={"name": "digits", **asdict(recipe)},
    )
    task_index = {t: i for i, t in enumerate(zoo.tasks)}

    def own_init(task: str) -> dict[str, torch.Tensor]:
        # Seeded by the task's index (never recipe.seed itself), so a resumed build redraws the same inits.
        return initial_state(lambda: build_model(arch), recipe.seed + task_index[task] + 1)

    train_members(
        zoo, model, init if recipe.init == "shared" else own_init, steps=recipe.steps, optim=recipe_optimizer(asdict(recipe)),
        group_size=recipe.group_size, seed=recipe.seed,
    )
    zoo.fit_layout("train")
    return zoo


RECIPE = Recipe("digits", DigitsRecipe, build)
