"""Guard the condition: is a user's dataset like the data the pipeline's zoo was trained on?

A pipeline records, at export (`zoo_statistics`, stored as ``target.data_stats`` in
``model_index.json``):

* ``features``: the range and spread (``min``, ``max``, ``mean``, ``std``, over every value of
  every feature) of the zoo's training samples, for inputs whose numbers the user supplies
  (``vector`` and ``image`` kinds; text goes through the frozen base model, so it has none).
  Global rather than per-feature numbers: a feature that is constant in the zoo (a border pixel)
  would otherwise reject every dataset in which it varies a little.
* ``embeddings``: the dataset encoder's pooled embedding of each training task (its train
  split; at most `MAX_REFERENCE_TASKS`, 5 significant digits) and ``nn_distance``, the
  distances from each of them to its nearest other training task (``median``, ``max``).

`d2nwg generate` then

* **rejects** a dataset whose values lie outside the zoo's range (more than `OUT_OF_RANGE_SHARE`
  of them beyond the range widened by half its span on each side, e.g. 0-255 pixels for a [0, 1]
  zoo): one ``error:`` line with both ranges; it does not rescale, since the right rescaling
  (divide by 255? standardise?) is the user's to choose;
* **warns** when the dataset's embedding is farther from every training task than training tasks
  are from each other (more than `FAR_FACTOR` times the largest nearest-neighbour distance between
  them: `embedding_distance`, `far_from_zoo_message`), with both numbers;
* says that ``best.safetensors`` is **at chance** when its held-back accuracy is not clearly above
  ``1/K``, given that it is the best of N picked on those same samples (`chance_threshold`).

Pipelines exported before these statistics existed have none, and generate as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import torch

MAX_REFERENCE_TASKS = 256
"""Training-task embeddings kept in a pipeline (a seeded subset beyond this): bounds ``model_index.json``."""
RANGE_MARGIN = 0.5
"""A value is out of range when it lies beyond the zoo's ``[min, max]`` by more than this share of ``max - min``."""
FAR_FACTOR = 1.5
"""`far_from_zoo_message` warns beyond this multiple of the largest nearest-neighbour distance between training
tasks: with few training tasks that largest spacing is itself a noisy estimate (pure noise lands 10x and more
beyond it on digits, held-out digit tasks below it)."""
OUT_OF_RANGE_SHARE = 0.01
"""`check_feature_range` rejects a dataset when more than this share of its values is out of range."""


def _round(values: torch.Tensor) -> list:
    """Nested lists of floats with 5 significant digits (small JSON, precise enough for distances)."""
    return [[float(f"{v:.5g}") for v in row] for row in values.tolist()]


@torch.no_grad()
def task_embeddings(pipe, tasks: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The pooled dataset embedding ``[len(tasks), D]`` of each task's per-class samples (`D2NWGPipeline.encode_dataset`)."""
    return torch.cat([pipe.encode_dataset(per_class)[1].float().cpu() for per_class in tasks])


def nearest_other_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """``[N]``: Euclidean distance from each row to its nearest other row (needs N >= 2)."""
    d = torch.cdist(embeddings.double(), embeddings.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    return d.min(1).values


def zoo_statistics(pipe, tasks: Sequence[Sequence[torch.Tensor]], raw_features: bool, seed: int = 0) -> dict:
    """What `check_feature_range` and `embedding_distance` compare a user's dataset with.

    Args:
        pipe: the exported `d2nwg.pipelines.pipeline_d2nwg.D2NWGPipeline` (its dataset encoder embeds the tasks).
        tasks: each training task's per-class samples ``[n_c, D]`` (label order), e.g. its train split.
        raw_features: whether users supply the numbers themselves (vector/image inputs): then ``features``.
        seed: seeds the subset of tasks kept when there are more than `MAX_REFERENCE_TASKS`.

    Returns:
        ``{"features": {...} (raw_features only), "embeddings": [[...]], "nn_distance": {"median", "max"}}``;
        without ``embeddings`` when there are fewer than two tasks.
    """
    stats: dict = {}
    n = pipe.target_spec.input.condition_features
    if raw_features:
        values = torch.cat([x[:, :n].reshape(-1).float() for per_class in tasks for x in per_class])
        stats["features"] = {
            k: float(f"{float(v):.6g}")
            for k, v in {"min": values.min(), "max": values.max(), "mean": values.mean(), "std": values.std()}.items()
        }
    if len(tasks) >= 2:
        emb = task_embeddings(pipe, tasks)
        nn_d = nearest_other_distances(emb)
        if len(emb) > MAX_REFERENCE_TASKS:
            keep = torch.randperm(len(emb), generator=torch.Generator().manual_seed(seed))[:MAX_REFERENCE_TASKS]
            emb = emb[keep.sort().values]
        stats["embeddings"] = _round(emb)
        stats["nn_distance"] = {"median": float(nn_d.median()), "max": float(nn_d.max())}
    return stats


def check_feature_range(stats: Mapping | None, per_class: Sequence[torch.Tensor], condition_features: int | None = None) -> None:
    """Reject a dataset whose values lie outside the zoo's range (see the module docstring).

    Args:
        stats: the pipeline's ``data_stats`` (None or without ``features``: nothing to check).
        per_class: the dataset's samples per class, ``[n_c, D]``.
        condition_features: only the first this many features are compared (None: all).

    Raises:
        ValueError: one line with the dataset's and the zoo's ranges and what to do.
    """
    ranges = (stats or {}).get("features")
    if not ranges:
        return
    values = torch.cat([x[:, :condition_features].reshape(-1).float() for x in per_class])
    lo, hi = ranges["min"], ranges["max"]
    margin = RANGE_MARGIN * max(hi - lo, 1e-12)
    outside = ((values < lo - margin) | (values > hi + margin)).float().mean().item()
    if outside > OUT_OF_RANGE_SHARE:
        got_lo, got_hi = values.min().item(), values.max().item()
        raise ValueError(
            f"the dataset's features lie in [{got_lo:.4g}, {got_hi:.4g}] but this pipeline's zoo was trained on features "
            f"in [{lo:.4g}, {hi:.4g}] ({outside:.0%} of the values fall outside [{lo - margin:.4g}, {hi + margin:.4g}]); "
            "rescale them to the zoo's range (e.g. divide 0-255 pixels by 255) and run again"
        )


def embedding_distance(pipe, stats: Mapping | None, per_class: Sequence[torch.Tensor]) -> tuple[float, float] | None:
    """``(distance from the dataset's embedding to the nearest training task, largest nearest-neighbour distance
    between training tasks)``, or None when the pipeline recorded no task embeddings."""
    if not stats or not stats.get("embeddings"):
        return None
    reference = torch.tensor(stats["embeddings"], dtype=torch.float64)
    emb = task_embeddings(pipe, [per_class]).double()
    d = torch.cdist(emb, reference, compute_mode="donot_use_mm_for_euclid_dist").min().item()
    return d, float(stats["nn_distance"]["max"])


def far_from_zoo_message(distance: float, spacing: float) -> str | None:
    """The warning for `embedding_distance`'s numbers, or None unless the dataset is more than `FAR_FACTOR` times
    as far from its nearest training task as any training task is from its nearest neighbour."""
    if distance <= FAR_FACTOR * spacing:
        return None
    return (
        f"the dataset is far from every training task of this pipeline: its embedding is {distance:.3g} from the "
        f"nearest one, while training tasks are at most {spacing:.3g} from their nearest neighbour "
        f"({distance / max(spacing, 1e-12):.1f}x); generated weights may be poor"
    )


def chance_threshold(num_classes: int, num_samples: int, candidates: int = 1) -> float:
    """Held-back accuracy below which the best of ``candidates`` weight sets, picked on the same
    ``num_samples`` samples, cannot be told from guessing among ``num_classes``.

    ``1/K`` plus the one-sided 97.5% quantile of the best of ``candidates`` chance-level accuracies
    (normal approximation of the binomial, Bonferroni over the candidates): picking the best of 10
    guessers on 24 samples of 5 classes reaches 0.43 one time in 40.
    """
    p = 1.0 / num_classes
    z = NormalDist().inv_cdf(1 - 0.025 / max(candidates, 1))
    return p + z * math.sqrt(p * (1 - p) / max(num_samples, 1))


def at_chance(accuracy: float, num_classes: int, num_samples: int, candidates: int = 1) -> bool:
    """Whether ``accuracy`` on ``num_samples`` held-back samples is not clearly above chance (`chance_threshold`)."""
    return accuracy < chance_threshold(num_classes, num_samples, candidates)
