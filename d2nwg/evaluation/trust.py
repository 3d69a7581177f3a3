"""Trust checks: say, with the figures, when generated weights are not to be trusted.

An under-trained generator gives honest numbers that look like a normal result:
generated accuracy just below the zoo mean, samples that are all alike, a VAE that keeps a third of
the members' accuracy. These checks turn such numbers into one warning line each:

* **no gain over a cheap baseline**: the generated best does not beat the best zero-training or
  memorisation baseline measured in the same run (`d2nwg.evaluation.metrics.METRICS` roles ``zero-training``
  and ``memorisation``, plus the zoo-mean body under an LDA head); in ``d2nwg generate --select
  support``, the nearest-class-mean classifier on the same held-back samples;
* **VAE reconstruction ratio** (accuracy of decode(encode(w)) over that of w) below `MIN_VAE_RECON_RATIO`:
  generated weights cannot be better than what the VAE decodes;
* **collapsed samples**: the median pairwise distance among one task's samples is below
  `COLLAPSE_RATIO` times the zoo's nearest-neighbour spacing (`within_task_spread_ratio`);
* **near-copies of one member** (``d2nwg evaluate`` only: it needs the zoo): a task's samples lie within
  `NEAR_COPY_RATIO` times that spacing of a zoo member (`nearest_member_ratio`).

Distances are Euclidean in the layout's normalised token space (`d2nwg.zoo.layout.WeightLayout.tokenize`,
flattened), the space of the evaluation's novelty figures. The zoo's spacing is the median distance from
a train member to its nearest other train member (`zoo_spacing`). Thresholds are module constants; the
default digits pipeline passes each (spread ratio 0.59, nearest-member ratio 2.4, reconstruction
ratio 0.94, generated best 0.968 against 0.962 for the best cheap baseline, measured on its 200 held-out tasks).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from d2nwg.evaluation.metrics import METRICS

MIN_VAE_RECON_RATIO = 0.8
"""Warn below this reconstruction ratio (default digits pipeline: 0.94; a 2+2-step one: about 0.3)."""
COLLAPSE_RATIO = 0.1
"""Warn when a task's samples are this much closer to each other than zoo members are to their nearest neighbour."""
NEAR_COPY_RATIO = 0.1
"""Warn when a task's samples are this much closer to one zoo member than zoo members are to each other."""
CHEAP_ROLES = ("zero-training", "memorisation")
"""`d2nwg.evaluation.metrics.Metric` roles of the baselines a generator must beat (no gradient step on the task)."""
CHEAP_ABLATIONS = ("lda_zoo_mean",)
"""Ablations that are cheap baselines too: with an LDA head solver, the zoo-mean body under the same head is
what a generator must beat (a 2+2-step digits pipeline reaches 0.956 with LDA heads, zoo mean + LDA 0.971)."""


# ----------------------------------------------------------------------------- distances
def _median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor, halfway between the middle two for an even count (``Tensor.median`` takes the lower)."""
    return float(torch.quantile(values.double(), 0.5))


def flat_tokens(layout, state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``[N, T * chunk]``: weight sets as normalised layout tokens (padding zero), one row each."""
    return layout.tokenize(list(state_dicts)).flatten(1)


def nearest_rows(
    queries: torch.Tensor, reference: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distance [Q], index [Q])`` of each query row's nearest reference row (``exclude[i]``: a row to skip)."""
    values, indices = [], []
    for s in range(0, len(queries), 256):  # bounded memory: [256, R] distances at a time
        d = torch.cdist(queries[s : s + 256].double(), reference.double(), compute_mode="donot_use_mm_for_euclid_dist")
        if exclude is not None:
            d[torch.arange(len(d)), exclude[s : s + 256]] = math.inf
        best = d.min(1)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values), torch.cat(indices)


def zoo_spacing(zoo_tokens: torch.Tensor, seed: int = 0, max_reference: int = 500) -> float | None:
    """Median distance from a zoo member to its nearest other member (``None`` for fewer than two members).

    Args:
        zoo_tokens: ``[N, F]`` flat tokens of the zoo's train members (`flat_tokens`).
        seed: seeds the subset of ``max_reference`` members whose distances are measured when N is larger.
    """
    return streamed_zoo_spacing(len(zoo_tokens), lambda index: zoo_tokens[index], seed, max_reference)


SPACING_BUDGET = 2**27
"""Numbers (float64: 1 GiB) that the reference set, and each chunk, of `streamed_zoo_spacing` may hold."""


def streamed_zoo_spacing(
    num_members: int, tokens_of, seed: int = 0, max_reference: int = 500, chunk: int = 256
) -> float | None:
    """`zoo_spacing` over a zoo read ``chunk`` members at a time (zoos larger than memory); the same number.

    Args:
        num_members: N, the zoo's train members.
        tokens_of: ``index [n] -> flat tokens [n, F]`` of those members.

    Memory stays bounded for large members: the reference set and the chunks hold at most `SPACING_BUDGET`
    float64 numbers each, so for members of more than ``SPACING_BUDGET / max_reference`` numbers (about 270k)
    the reference is a smaller random subset and the figure an estimate from fewer members.
    """
    if num_members < 2:
        return None
    width = tokens_of(torch.arange(1)).shape[1]  # F, numbers per member
    max_reference = min(max_reference, max(2, SPACING_BUDGET // width))
    chunk = min(chunk, max(1, SPACING_BUDGET // width))
    ref = torch.randperm(num_members, generator=torch.Generator().manual_seed(seed))[:max_reference]
    reference = tokens_of(ref)
    best = torch.full((len(ref),), math.inf, dtype=torch.float64)
    for start in range(0, num_members, chunk):
        index = torch.arange(start, min(start + chunk, num_members))
        d = torch.cdist(reference.double(), tokens_of(index).double(), compute_mode="donot_use_mm_for_euclid_dist")
        d[ref[:, None] == index[None, :]] = math.inf  # a member is not its own neighbour
        best = torch.minimum(best, d.min(1).values)
    return _median(best)


def median_pairwise_distance(tokens: torch.Tensor) -> float | None:
    """Median Euclidean distance over the ``N (N - 1) / 2`` pairs of rows of ``tokens [N, F]`` (``None`` if N < 2)."""
    if len(tokens) < 2:
        return None
    d = torch.cdist(tokens.double(), tokens.double(), compute_mode="donot_use_mm_for_euclid_dist")
    i, j = torch.triu_indices(len(tokens), len(tokens), offset=1)
    return _median(d[i, j])


def within_task_spread_ratio(tokens: torch.Tensor, spacing: float | None) -> float | None:
    """`median_pairwise_distance` of one task's samples ``[N, F]`` over the zoo's nearest-neighbour ``spacing``.

    0.59 on the default digits pipeline (median over its tasks); near 0 when the generator returns one weight set
    N times (a 2+2-step pipeline: 1e-5).
    ``None`` without a spacing, with fewer than two samples, or when a sample is not finite.
    """
    if not spacing or not torch.isfinite(tokens).all():
        return None
    spread = median_pairwise_distance(tokens)
    return None if spread is None else spread / spacing


def sample_diversity(
    per_task: Sequence[torch.Tensor], zoo_tokens: torch.Tensor, member_ids: Sequence[str], spacing: float | None
) -> list[dict]:
    """Per task: how far its samples are from each other and from the nearest zoo member, in zoo spacings.

    Args:
        per_task: each task's generated samples as flat tokens ``[N, F]`` (`flat_tokens`).
        zoo_tokens: ``[M, F]`` the zoo's train members; ``member_ids``: their ids, in the same order.
        spacing: `zoo_spacing` of ``zoo_tokens``.

    Returns:
        One dict per task: ``within_task_spread_ratio`` (see `within_task_spread_ratio`),
        ``nearest_member_ratio`` (median over the samples of the distance to their nearest member, over
        ``spacing``) and ``nearest_member`` (the member most samples are nearest to); ``None`` values
        where a figure cannot be computed (no spacing, non-finite samples).
    """
    rows = []
    for tokens in per_task:
        row = {
            "within_task_spread_ratio": within_task_spread_ratio(tokens, spacing),
            "nearest_member_ratio": None,
            "nearest_member": None,
        }
        if spacing and len(tokens) and len(zoo_tokens) and torch.isfinite(tokens).all():
            distance, index = nearest_rows(tokens, zoo_tokens)
            row["nearest_member_ratio"] = _median(distance) / spacing
            row["nearest_member"] = member_ids[int(index.mode().values)]
        rows.append(row)
    return rows


def median(values: Sequence[float | None]) -> float | None:
    """Median of the finite values, ``None`` when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(kept)) if kept else None


# ----------------------------------------------------------------------------- warnings
def baseline_message(
    generated: float | None, baselines: Mapping[str, float | None], where: str, generated_mean: float | None = None
) -> str | None:
    """The warning when ``generated`` accuracy does not beat the best of ``baselines`` ({label: accuracy}), else None."""
    known = {label: acc for label, acc in baselines.items() if acc is not None and math.isfinite(acc)}
    if generated is None or not known:
        return None
    label, best = max(known.items(), key=lambda item: item[1])
    if generated > best:
        return None
    mean = "" if generated_mean is None else f" (mean {generated_mean:.3f})"
    return (
        f"generated best {generated:.3f}{mean} does not beat the best cheap baseline measured in the same run, "
        f"{label} at {best:.3f}, {where}; the generated weights add nothing over it"
    )


def residual_message(generated: float | None, conditional_mean: float | None, where: str) -> str | None:
    """The warning when the generated weights do not beat the pipeline's conditional mean alone
    (`d2nwg.models.ConditionalMean`), i.e. the diffusion residual adds nothing; else None."""
    if generated is None or conditional_mean is None or generated > conditional_mean:
        return None
    return (
        f"generated best {generated:.3f} does not beat the pipeline's conditional mean alone, {conditional_mean:.3f}, "
        f"{where}; the diffusion residual adds nothing over the regression"
    )


def recon_message(ratio: float | None, recon_acc: float | None = None, original_acc: float | None = None) -> str | None:
    """The warning when the VAE reconstruction ratio is below `MIN_VAE_RECON_RATIO`, else None."""
    if ratio is None or ratio >= MIN_VAE_RECON_RATIO:
        return None
    accs = "" if recon_acc is None or original_acc is None else f" ({recon_acc:.3f} vs {original_acc:.3f})"
    return (
        f"VAE reconstruction ratio {ratio:.3f} is below {MIN_VAE_RECON_RATIO}: decoded zoo members keep {ratio:.0%} of "
        f"their accuracy{accs}, and generated weights cannot do better than the VAE decodes; train the VAE longer"
    )


def collapse_message(ratios: Sequence[float | None]) -> str | None:
    """The warning when some tasks' `within_task_spread_ratio` is below `COLLAPSE_RATIO`, else None."""
    known = [r for r in ratios if r is not None]
    low = [r for r in known if r < COLLAPSE_RATIO]
    if not low:
        return None
    return (
        f"samples collapsed on {len(low)} of {len(known)} task(s): median pairwise distance {median(low):.3g}x the zoo's "
        f"nearest-neighbour spacing (below {COLLAPSE_RATIO}); the samples are near-identical, so picking the best of "
        "them chooses nothing"
    )


def near_copy_message(rows: Sequence[Mapping]) -> str | None:
    """The warning when some tasks' samples sit within `NEAR_COPY_RATIO` zoo spacings of one member (`sample_diversity` rows)."""
    known = [r for r in rows if r.get("nearest_member_ratio") is not None]
    close = [r for r in known if r["nearest_member_ratio"] < NEAR_COPY_RATIO]
    if not close:
        return None
    example = min(close, key=lambda r: r["nearest_member_ratio"])
    where = f"{example['task']}: " if example.get("task") else ""
    task = f" ({where}member {example['nearest_member']})"
    return (
        f"samples of {len(close)} of {len(known)} task(s) are near-copies of one zoo member: median distance to it "
        f"{median([r['nearest_member_ratio'] for r in close]):.3g}x the zoo's nearest-neighbour spacing "
        f"(below {NEAR_COPY_RATIO}){task}; the generator recalls members instead of generating"
    )


def report_warnings(summary: Mapping, rows: Sequence[Mapping]) -> list[str]:
    """Every trust warning for an evaluation report (`d2nwg.evaluation.protocol.evaluate`'s summary and per-task rows), one line each."""
    cheap = {m.label: summary.get(m.summary_key) for m in METRICS if m.role in CHEAP_ROLES or m.key in CHEAP_ABLATIONS}
    where = f"on the same {summary.get('num_tasks', len(rows))} held-out task(s)"
    found = [
        baseline_message(summary.get("generated_best_acc"), cheap, where, summary.get("generated_mean_acc")),
        recon_message(summary.get("vae_recon_ratio"), summary.get("vae_recon_acc"), summary.get("vae_original_acc")),
        collapse_message([r.get("within_task_spread_ratio") for r in rows]),
        near_copy_message(rows),
    ]
    return [m for m in found if m]


def ncm_accuracy(
    support: Sequence[torch.Tensor], held: Sequence[torch.Tensor], num_features: int | None = None
) -> float:
    """Accuracy on ``held`` (per-class ``[n_c, D]``) of the nearest class mean of ``support`` (per class, label order).

    Only the first ``num_features`` numbers of each sample are used (text samples: the pooled sentence embedding).
    """
    means = torch.stack([x[:, :num_features].double().mean(0) for x in support])  # (K, D)
    x = torch.cat([h[:, :num_features].double() for h in held])
    y = torch.cat([torch.full((len(h),), k) for k, h in enumerate(held)])
    return float((torch.cdist(x, means).argmin(1) == y).double().mean())


def generation_warnings(
    pipe,
    weights: Sequence[Mapping[str, torch.Tensor]],
    best_score: float | None = None,
    ncm_score: float | None = None,
    num_held_back: int = 0,
) -> list[str]:
    """The trust warnings `d2nwg generate` can state without the zoo, one line each.

    Args:
        pipe: the `d2nwg.pipelines.pipeline_d2nwg.D2NWGPipeline`; its ``provenance`` (recorded at export) gives the VAE
            reconstruction ratio and the zoo's spacing. Pipelines without provenance skip those two checks.
        weights: the generated weight sets of one dataset.
        best_score, ncm_score: held-back accuracy of the best generated set and of the nearest class mean
            (``--select support`` only); ``num_held_back``: how many samples they were measured on.
    """
    provenance = getattr(pipe, "provenance", None) or {}
    spacing = (provenance.get("zoo") or {}).get("nn_distance")
    ratio = within_task_spread_ratio(flat_tokens(pipe.layout, weights), spacing) if len(weights) > 1 else None
    found = [
        baseline_message(best_score, {"nearest class mean": ncm_score}, f"on the same {num_held_back} held-back samples"),
        recon_message(provenance.get("vae_recon_ratio")),
        collapse_message([ratio]),
    ]
    return [m for m in found if m]
