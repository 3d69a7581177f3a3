"""The baselines of the evaluation protocol (docs/concepts/evaluation-protocol.md), one registered object each.

A baseline is a function of an `EvalContext` (the zoo, the held-out tasks, their data,
the target module and the zoo's train members) that returns per-task figures:
``{row_key: [value for each task]}``. `d2nwg.evaluation.protocol.evaluate` runs the selected ones
and merges their figures into one row per task. Add a baseline with::

    @baseline("my_baseline", "what it is, in one line")
    def my_baseline(ctx: EvalContext) -> dict[str, list]:
        return {"my_baseline": [...]}

and list its row key in `d2nwg.evaluation.metrics.METRICS` so that reports show it. Baselines
follow Zeng et al. (2025), who found that earlier weight generators beat none of these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from d2nwg.models.conditional_mean import class_means
from d2nwg.registry import Registry
from d2nwg.targets.architectures import build_model
from d2nwg.targets.heads import class_mean_head, head_inputs, head_module_name, lda_cv_head, with_head
from d2nwg.targets.population import mean_state_dict, paired_accuracy, shared_accuracy, train_population
from d2nwg.zoo.model_zoo import Member, ModelZoo

KNN_K = 5
"""Members averaged by the k-nearest weight ensemble (Zeng et al. 2025 use k = 5)."""


# ----------------------------------------------------------------------------- retrieval
def dataset_embedding(per_class: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenated per-class mean features in label order, ``[K * D]`` (the conditional mean's embedding too)."""
    return class_means(list(per_class))


def nearest_members(
    zoo: ModelZoo, task_ids: Sequence[str], *, candidates: Sequence[Member] | None = None, split: str = "support", k: int = 1
) -> list[list[Member]]:
    """For each task, the ``k`` candidate members (default: train members) whose task embeddings are nearest.

    The embedding is `dataset_embedding` of the task's ``split`` samples on both sides, and the
    distance is Euclidean; one member per candidate task, nearest first, ties to the first.
    Only tasks with the same number of classes (and features) are candidates.

    Raises:
        ValueError: no candidates, or no candidate task of a task's shape.
    """
    candidates = list(zoo.members("train") if candidates is None else candidates)
    if not candidates:
        raise ValueError("retrieval needs at least one candidate member; the zoo has no train members")
    first_member: dict[str, Member] = {}
    for m in candidates:
        first_member.setdefault(m.task, m)
    cand_tasks = list(first_member)
    cand_emb = [dataset_embedding(zoo.class_samples(t, split)) for t in cand_tasks]
    by_size: dict[int, list[int]] = {}
    for i, e in enumerate(cand_emb):
        by_size.setdefault(e.numel(), []).append(i)
    stacked = {n: torch.stack([cand_emb[i] for i in idx]) for n, idx in by_size.items()}
    out = []
    for task in task_ids:
        q = dataset_embedding(zoo.class_samples(task, split))
        if q.numel() not in stacked:
            raise ValueError(f"no candidate task has the shape of task '{task}' ({q.numel()} embedding numbers)")
        d = torch.cdist(q[None], stacked[q.numel()], compute_mode="donot_use_mm_for_euclid_dist")[0]
        order = torch.sort(d, stable=True).indices[:k].tolist()
        out.append([first_member[cand_tasks[by_size[q.numel()][i]]] for i in order])
    return out


def retrieve(
    zoo: ModelZoo, task_ids: Sequence[str], *, candidates: Sequence[Member] | None = None, split: str = "support"
) -> list[Member]:
    """For each task, the candidate member whose task embedding is nearest (`nearest_members` with k=1).

    Example:
        >>> [m.id for m in retrieve(zoo, ["task01000"])]  # doctest: +SKIP
        ['task00417-s0']
    """
    return [found[0] for found in nearest_members(zoo, task_ids, candidates=candidates, split=split, k=1)]


# ----------------------------------------------------------------------------- context
@dataclass
class EvalContext:
    """Everything a baseline may read about one evaluation run (shared, computed once).

    Args:
        zoo: the model zoo.
        task_ids: the held-out tasks, in report order.
        oracles: task id -> its held-out member (the oracle).
        module: the target architecture on the evaluation device (non-layout tensors from the init).
        init: the zoo's shared initialisation, or ``None``.
        data: ``{split: [(x [n, D], y [n]) per task]}`` on the module's device.
        num_samples: N, weight sets per task (retrieval + noise draws as many).
        noise_std: retrieval + noise perturbation, in units of each tensor's zoo std.
        finetune_steps: step counts of the fine-tuning baseline.
        optim: the zoo recipe's optimiser settings (`d2nwg.targets.population.recipe_optimizer`).
        seed: base seed; task i uses ``seed + i``.
        raw_features: whether samples are plain feature vectors (NCM on raw inputs applies).
    """

    zoo: ModelZoo
    task_ids: list[str]
    oracles: dict[str, Member]
    module: nn.Module
    init: dict[str, torch.Tensor] | None
    data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    num_samples: int = 10
    noise_std: float = 0.1
    finetune_steps: list[int] = field(default_factory=list)
    optim: dict = field(default_factory=dict)
    seed: int = 0
    raw_features: bool = True

    @cached_property
    def train_members(self) -> list[Member]:
        members = self.zoo.members("train")
        if not members:
            raise ValueError(f"the zoo at {self.zoo.root} has no train members; the baselines need them")
        return members

    @cached_property
    def train_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Member id -> state_dict of every train member, read once."""
        return {m.id: self.zoo.load_member(m) for m in self.train_members}

    @cached_property
    def zoo_mean(self) -> dict[str, torch.Tensor]:
        """The elementwise mean of every train member."""
        return mean_state_dict(list(self.train_state_dicts.values()))

    @cached_property
    def neighbours(self) -> list[list[Member]]:
        """The `KNN_K` nearest train members of each task (retrieval uses the first)."""
        return nearest_members(self.zoo, self.task_ids, candidates=self.train_members, k=KNN_K)

    @cached_property
    def start(self) -> dict[str, torch.Tensor]:
        """Where training-free and fine-tuning baselines start: the shared init, else a seeded fresh init."""
        if self.init is not None:
            return self.init
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return build_model(self.zoo.architecture).state_dict()

    def accuracy(self, state_dicts: Sequence[Mapping[str, torch.Tensor]], split: str = "test") -> torch.Tensor:
        """Accuracy ``[num_tasks]`` of weight set i on task i's ``split``."""
        return paired_accuracy(self.module, state_dicts, self.data[split])

    def per_class(self, i: int, split: str) -> list[torch.Tensor]:
        """Task i's ``split`` samples per class, on the module's device."""
        device = self.data[split][i][0].device
        return [x.to(device) for x in self.zoo.class_samples(self.task_ids[i], split)]


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: ``run(ctx) -> {row_key: per-task values}``."""

    name: str
    run: Callable[[EvalContext], dict[str, list]]
    description: str


BASELINES: Registry[Baseline] = Registry("evaluation baseline")


def baseline(name: str, description: str) -> Callable:
    """Decorator registering ``fn(ctx) -> {row_key: [per-task value]}`` as baseline ``name``."""

    def wrap(fn: Callable[[EvalContext], dict[str, list]]) -> Callable[[EvalContext], dict[str, list]]:
        BASELINES.register(name, Baseline(name, fn, description))
        return fn

    return wrap


def _values(acc: torch.Tensor) -> list[float]:
    return [float(a) for a in acc]


# ----------------------------------------------------------------------------- reference and memorisation
@baseline("oracle", "the held-out member itself: a model trained on the task")
def oracle(ctx: EvalContext) -> dict[str, list]:
    members = [ctx.oracles[t] for t in ctx.task_ids]
    return {"oracle": _values(ctx.accuracy([ctx.zoo.load_member(m) for m in members])), "oracle_member": [m.id for m in members]}


@baseline("init", "the zoo's shared initialisation (skipped without one)")
def initialisation(ctx: EvalContext) -> dict[str, list]:
    if ctx.init is None:
        return {"init": [None] * len(ctx.task_ids)}
    return {"init": _values(ctx.accuracy([ctx.init] * len(ctx.task_ids)))}


@baseline("zoo_mean", "the elementwise mean of every train member")
def zoo_mean(ctx: EvalContext) -> dict[str, list]:
    return {"zoo_mean": _values(ctx.accuracy([ctx.zoo_mean] * len(ctx.task_ids)))}


@baseline("retrieval", "the train member whose task's support embedding is nearest")
def retrieval(ctx: EvalContext) -> dict[str, list]:
    found = [n[0] for n in ctx.neighbours]
    sds = [ctx.train_state_dicts[m.id] for m in found]
    return {"retrieval": _values(ctx.accuracy(sds)), "retrieval_member": [m.id for m in found]}


@baseline("retrieval_noise", "N noisy copies of the retrieved member, the best on support")
def retrieval_noise(ctx: EvalContext) -> dict[str, list]:
    zoo_std = {spec.name: spec.std for spec in ctx.zoo.layout.tensors}
    # Log-space tensors (running variances, `d2nwg.zoo.layout`) get their noise in log space: they stay positive.
    log_space = {spec.name for spec in ctx.zoo.layout.tensors if spec.transform == "log"}

    def perturb(k: str, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        noise = ctx.noise_std * zoo_std[k] * torch.randn(v.shape, generator=g, dtype=v.dtype)
        return v * noise.exp() if k in log_space else v + noise

    best, mean = [], []
    for i, neighbours in enumerate(ctx.neighbours):
        sd = ctx.train_state_dicts[neighbours[0].id]
        g = torch.Generator().manual_seed(ctx.seed + i)
        noisy = [{k: perturb(k, v, g) if k in zoo_std else v for k, v in sd.items()} for _ in range(ctx.num_samples)]
        support = shared_accuracy(ctx.module, noisy, *ctx.data["support"][i])
        test = shared_accuracy(ctx.module, noisy, *ctx.data["test"][i])
        best.append(float(test[int(support.argmax())]))
        mean.append(float(test.mean()))
    return {"retrieval_noise": best, "retrieval_noise_mean": mean}


@baseline("knn_ensemble", f"the mean weights of the {KNN_K} train members with the nearest task embeddings")
def knn_ensemble(ctx: EvalContext) -> dict[str, list]:
    sds = [mean_state_dict([ctx.train_state_dicts[m.id] for m in found]) for found in ctx.neighbours]
    return {"knn_ensemble": _values(ctx.accuracy(sds))}


# ----------------------------------------------------------------------------- zero-training
def _solved_heads(ctx: EvalContext, body: Mapping[str, torch.Tensor], solver) -> list[dict[str, torch.Tensor]]:
    """For each task, ``body`` with its head solved by ``solver`` on the task's support features."""
    head_names = ctx.zoo.layout.head_names()
    head = head_module_name(head_names)
    body = {k: v.to(ctx.data["support"][0][0].device) for k, v in body.items()}
    sds = []
    for i in range(len(ctx.task_ids)):
        x, y = ctx.data["support"][i]
        weight, bias = solver(head_inputs(ctx.module, head, body, x), y, len(ctx.zoo.tasks[ctx.task_ids[i]]["classes"]))
        sds.append(with_head(body, head_names, weight, bias))
    return sds


@baseline("prototype", "init body with a head of support class means in its feature space (weight imprinting)")
def prototype(ctx: EvalContext) -> dict[str, list]:
    return {"prototype": _values(ctx.accuracy(_solved_heads(ctx, ctx.start, class_mean_head)))}


@baseline("lda_init", "init body with the pipeline's shrinkage-LDA head on the support features (no zoo, no gradient step)")
def lda_init(ctx: EvalContext) -> dict[str, list]:
    return {"lda_init": _values(ctx.accuracy(_solved_heads(ctx, ctx.start, lda_cv_head)))}


@baseline("lda_zoo_mean", "zoo-mean body with a shrinkage-LDA head: the generator's head rule without the generator")
def lda_zoo_mean(ctx: EvalContext) -> dict[str, list]:
    return {"lda_zoo_mean": _values(ctx.accuracy(_solved_heads(ctx, ctx.zoo_mean, lda_cv_head)))}


@baseline("ncm", "nearest class mean of the support samples on raw input features (vector inputs only)")
def ncm(ctx: EvalContext) -> dict[str, list]:
    if not ctx.raw_features:
        return {"ncm": [None] * len(ctx.task_ids)}
    out = []
    for i in range(len(ctx.task_ids)):
        means = torch.stack([c.float().mean(0) for c in ctx.per_class(i, "support")])  # (K, D)
        x, y = ctx.data["test"][i]
        d = torch.cdist(x.float(), means, compute_mode="donot_use_mm_for_euclid_dist")
        out.append(float((d.argmin(1) == y).float().mean()))
    return {"ncm": out}


@baseline("finetune", "k optimiser steps of the zoo recipe from the init on the task's train split")
def finetune(ctx: EvalContext) -> dict[str, list]:
    steps = ctx.finetune_steps
    n = len(ctx.task_ids)
    if not steps:
        return {"finetune": [{} for _ in range(n)]}
    device = ctx.data["train"][0][0].device
    start = {k: v.to(device=device, dtype=torch.float32) for k, v in ctx.start.items() if v.is_floating_point()}
    groups: dict[tuple, list[int]] = {}
    for i, ((x, y), (tx, ty)) in enumerate(zip(ctx.data["train"], ctx.data["test"])):
        groups.setdefault((x.shape, y.shape, tx.shape, ty.shape), []).append(i)
    rows: list[dict[int, float]] = [{} for _ in range(n)]
    for idx in groups.values():  # tasks of equal shapes train together in one vmapped run
        x, y = (torch.stack([ctx.data["train"][i][j] for i in idx]) for j in (0, 1))  # (N, n, D), (N, n)
        tx, ty = (torch.stack([ctx.data["test"][i][j] for i in idx]) for j in (0, 1))
        with torch.enable_grad():
            _, recorded = train_population(ctx.module, start, x, y, steps=max(steps), **ctx.optim, record_at=steps, eval_x=tx, eval_y=ty)
        for k in steps:
            for pos, i in enumerate(idx):
                rows[i][k] = float(recorded[k][pos])
    return {"finetune": rows}
