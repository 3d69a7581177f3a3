"""The evaluation protocol (docs/concepts/evaluation-protocol.md): generated weights vs cheap baselines on held-out tasks.

For every held-out task of a zoo (its member is the oracle), the pipeline is
conditioned on the task's *support* samples and generates N weight sets. We report
their mean test accuracy and the test accuracy of the one with the best *support*
accuracy (selection never looks at test samples), next to the registered baselines
of `d2nwg.evaluation.baselines` (oracle, initialisation, zoo mean, retrieval, retrieval plus
noise, k-nearest weight ensemble, prototype head, nearest class mean, fine-tuning)
that a generator must beat to show it has not merely memorised the zoo (Zeng et al.
2025). Held-out tasks are reported together and per kind (``unseen_order`` and
``unseen_classes``, `d2nwg.zoo.model_zoo.ModelZoo.task_kind`). Novelty (distance to the
nearest zoo member) and the VAE's reconstruction ratio complete the picture.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from d2nwg.evaluation.baselines import BASELINES, EvalContext
from d2nwg.evaluation.diagnostics import novelty_figures, zoo_module, measure_vae_reconstruction
from d2nwg.evaluation.metrics import METRICS
from d2nwg.evaluation.report import summarize, summarize_by_kind, write_report
from d2nwg.evaluation.trust import flat_tokens, median, report_warnings, sample_diversity
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.targets.population import recipe_optimizer, shared_accuracy
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import Member, ModelZoo

SUMMARY_ACCURACIES = tuple(m.summary_key for m in METRICS)
FINETUNE_STEPS = (1, 2, 5, 10, 20, 50, 100)
"""Step counts of the fine-tuning baseline, capped by the members' own training steps."""


def default_finetune_steps(recipe: Mapping) -> list[int]:
    """`FINETUNE_STEPS` up to the recipe's member ``steps`` (included), or all of them without one."""
    steps = recipe.get("steps")
    if not isinstance(steps, int) or steps < 1:
        return list(FINETUNE_STEPS)
    return [k for k in FINETUNE_STEPS if k < steps] + [steps]


def _check_compatible(pipeline: D2NWGPipeline, zoo: ModelZoo) -> None:
    arch = json.loads(json.dumps(pipeline.config.target["architecture"]))
    if arch != json.loads(json.dumps(zoo.architecture)):
        raise ValueError(f"the pipeline generates {arch}, but the zoo holds {zoo.architecture}")
    mine, theirs = pipeline.layout, zoo.layout
    if mine.names != theirs.names or mine.chunk_size != theirs.chunk_size:
        raise ValueError(
            f"the pipeline's layout ({len(mine.names)} tensors, chunk {mine.chunk_size}) does not match "
            f"the zoo's ({len(theirs.names)} tensors, chunk {theirs.chunk_size})"
        )


def _context(
    zoo: ModelZoo, task_ids: list[str], oracles: dict[str, Member], device: torch.device, **settings
) -> EvalContext:
    """The target module (non-layout tensors from the shared init when there is one) and every task's data."""
    init = zoo.init_state()
    module = zoo_module(zoo, init)
    data = {
        split: [tuple(t.to(device) for t in zoo.task_data(task, split)) for task in task_ids]
        for split in ("train", "support", "test")
    }
    return EvalContext(
        zoo=zoo, task_ids=task_ids, oracles=oracles, module=module.to(device).eval(), init=init, data=data,
        optim=recipe_optimizer(zoo.manifest.get("recipe") or {}), raw_features=not zoo.input_spec.is_text, **settings,
    )


def evaluate(
    pipeline: D2NWGPipeline,
    zoo: ModelZoo,
    out: Path | None = None,
    *,
    num_samples: int = 10,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    max_tasks: int | None = None,
    noise_std: float = 0.1,
    finetune_steps: Sequence[int] | None = None,
    baselines: Sequence[str] | None = None,
    allow_split_leak: bool = False,
    progress: bool = True,
) -> dict:
    """Run the evaluation protocol on every held-out task of ``zoo``.

    Args:
        pipeline: the trained generator; it is conditioned on each task's support samples.
        zoo: the model zoo; its held-out members are the oracles, its train members the baselines' source.
        out: if given, write ``report.json``, ``report.md`` and PNG plots into this folder.
        num_samples: N, weight sets generated per task (and noisy copies for retrieval+noise).
        num_inference_steps: denoising steps; guidance_scale: classifier-free guidance (1.0 = off).
        seed: task i samples with ``torch.Generator().manual_seed(seed + i)``.
        max_tasks: evaluate only the first this many held-out tasks of each kind.
        noise_std: retrieval+noise perturbation, in units of each tensor's zoo std.
        finetune_steps: step counts k of the fine-tuning baseline. Default: those of
            `FINETUNE_STEPS` below the zoo recipe's member ``steps``, then ``steps`` itself
            (fine-tuning that long is the oracle's own training, so longer runs add nothing);
            all of `FINETUNE_STEPS` when the recipe does not say.
        baselines: names from `d2nwg.evaluation.baselines.BASELINES` to run (default: all of them).
        allow_split_leak: evaluate even when a held-out task shares a dataset with a train task
            (`d2nwg.zoo.model_zoo.ModelZoo.split_leaks`); the report then records it as ``summary["split_leak"]``.
        progress: show a rich progress bar.

    Returns:
        ``{"summary": {...}, "summary_by_kind": {"unseen_order": {...}, "unseen_classes": {...}},
        "per_task": [...], "finetune_curve": {k: mean acc}}``. Summaries hold ``<metric>_acc``
        for every metric of `d2nwg.evaluation.metrics.METRICS` (test accuracies in [0, 1]; ``None`` where a
        baseline cannot run, e.g. no shared init), ``generated_minus_best_zero_training`` and the
        generated best's accuracy on seen and unseen classes; the overall one also ``within_task_spread_ratio`` (median over
        tasks of the median pairwise distance among a task's samples over the zoo's nearest-neighbour
        spacing; per task in each row, with ``nearest_member_ratio``, `d2nwg.evaluation.trust.sample_diversity`).
        The report also holds ``"warnings"`` (`d2nwg.evaluation.trust.report_warnings`: one line each, with the
        figures) and the pipeline's ``"provenance"``.

    Raises:
        ValueError: bad settings, an unknown baseline, a pipeline that does not fit the zoo, a zoo
            without held-out or train members, or one whose splits leak (unless ``allow_split_leak``).

    Example:
        >>> pipe = D2NWGPipeline.from_pretrained("runs/demo/run/pipeline")   # doctest: +SKIP
        >>> report = evaluate(pipe, ModelZoo.open("runs/zoo"), Path("runs/eval"))  # doctest: +SKIP
        >>> report["summary_by_kind"]["unseen_classes"]["generated_best_acc"]  # doctest: +SKIP
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if finetune_steps is None:
        finetune_steps = default_finetune_steps(zoo.manifest.get("recipe") or {})
    finetune_steps = sorted({int(k) for k in finetune_steps})
    if any(k < 0 for k in finetune_steps):
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    selected = [BASELINES.get(name) for name in (BASELINES.names() if baselines is None else baselines)]
    _check_compatible(pipeline, zoo)
    leak = zoo.split_leak_message()
    if leak and not allow_split_leak:
        raise ValueError(f"{leak}; allow_split_leak=True evaluates anyway")

    # 1. Tasks: one per held-out task (its first member is the oracle), one report row each.
    oracles = _oracles(zoo, max_tasks)
    task_ids = list(oracles)
    device = pipeline.device
    ctx = _context(
        zoo, task_ids, oracles, device, num_samples=num_samples, noise_std=noise_std, finetune_steps=finetune_steps, seed=seed
    )
    rows = _task_rows(zoo, task_ids)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        # 2. Baselines, each over all tasks at once.
        job = bar.add_task("baselines", total=len(selected))
        for entry in selected:
            bar.update(job, description=f"baseline: {entry.name}")
            for key, values in entry.run(ctx).items():
                for row, value in zip(rows, values):
                    row[key] = value
            bar.advance(job)
        # 3. Generation, task by task: sample on support, select on support, report test.
        job = bar.add_task("generating", total=len(task_ids))
        generated_sds, sample_seconds = _generate(pipeline, ctx, rows, num_inference_steps, guidance_scale, lambda: bar.advance(job))
        # 4. Novelty in normalised token space, and the VAE's reconstruction ratio.
        bar.add_task("novelty and VAE reconstruction", total=None)
        novelty = novelty_figures(pipeline.layout, generated_sds, list(ctx.train_state_dicts.values()), seed)
        vae = measure_vae_reconstruction(pipeline, zoo, ctx.module, seed)
        # Per task: spread of its samples and distance to the nearest member, in zoo spacings (`d2nwg.evaluation.trust`).
        n, train = ctx.num_samples, ctx.train_state_dicts
        per_task = [flat_tokens(pipeline.layout, generated_sds[i * n : (i + 1) * n]) for i in range(len(rows))]
        zoo_tokens = flat_tokens(pipeline.layout, list(train.values()))
        for row, figures in zip(rows, sample_diversity(per_task, zoo_tokens, list(train), novelty["zoo_nn_distance"])):
            row.update(figures)

    # 5. Summaries: over all tasks and per kind of held-out task.
    summary = summarize(rows, finetune_steps)
    finetune_curve = summary.pop("finetune_curve")
    by_kind = summarize_by_kind(rows, finetune_steps)
    summary.update(
        {
            "finetune_from": "zoo init" if ctx.init is not None else "random init",
            "split_leak": leak,
            **vae,
            **novelty,
            "within_task_spread_ratio": median([r["within_task_spread_ratio"] for r in rows]),
            "nearest_member_ratio": median([r["nearest_member_ratio"] for r in rows]),
            "sample_seconds_per_task": float(statistics.fmean(sample_seconds)),
            "settings": {
                "num_samples": num_samples,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "head_solver": pipeline.config.head_solver,
                "seed": seed,
                "noise_std": noise_std,
                "finetune_steps": finetune_steps,
                "baselines": [b.name for b in selected],
                **{f"finetune_{k}": v for k, v in ctx.optim.items()},
                "device": str(device),
                "zoo": str(zoo.root),
            },
        }
    )
    report = {"summary": summary, "summary_by_kind": by_kind, "per_task": rows, "finetune_curve": finetune_curve}
    report["warnings"] = report_warnings(summary, rows)  # one line each, with the figures (`d2nwg.evaluation.trust`)
    report["provenance"] = pipeline.provenance  # where the pipeline came from; None for pipelines exported before it
    report["pipeline_hub"] = pipeline.hub_record
    if out is not None:
        write_report(report, Path(out))
    return report


def _oracles(zoo: ModelZoo, max_tasks: int | None) -> dict[str, Member]:
    """Held-out task -> its first member (the oracle), for the first ``max_tasks`` tasks of each kind.

    Raises:
        ValueError: ``max_tasks < 1``, or the zoo has no held-out or no train members.
    """
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    oracles: dict[str, Member] = {}
    per_kind: dict[str, int] = {}
    for m in zoo.members("heldout"):
        if m.task in oracles:
            continue
        kind = zoo.task_kind(m.task)
        if max_tasks is None or per_kind.get(kind, 0) < max_tasks:  # the first tasks of *each* kind
            oracles[m.task] = m
            per_kind[kind] = per_kind.get(kind, 0) + 1
    if not oracles:
        raise ValueError(f"the zoo at {zoo.root} has no held-out members to evaluate on")
    if not zoo.members("train"):
        raise ValueError(f"the zoo at {zoo.root} has no train members; the baselines need them")
    return oracles


def _task_rows(zoo: ModelZoo, task_ids: Sequence[str]) -> list[dict]:
    """The start of each task's report row: its kind, classes and which of them training tasks contain."""
    seen = zoo.train_classes()
    return [
        {
            "task": t,
            "kind": zoo.task_kind(t),
            "classes": list(zoo.tasks[t]["classes"]),
            "class_seen": [c in seen for c in zoo.tasks[t]["classes"]],
        }
        for t in task_ids
    ]


def _generate(
    pipeline: D2NWGPipeline, ctx: EvalContext, rows: list[dict], num_inference_steps: int, guidance_scale: float, advance
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Fill each row's generated figures; returns every generated weight set and the seconds per task."""
    head_only = _head_only(pipeline.layout, ctx.init)
    generated_sds, seconds = [], []
    previous_bar = getattr(pipeline, "_progress_bar_config", None)
    pipeline.set_progress_bar_config(disable=True)
    try:
        for i, (task, row) in enumerate(zip(ctx.task_ids, rows)):
            start = time.perf_counter()
            output = pipeline(
                dataset=ctx.zoo.class_samples(task, "support"),
                num_samples=ctx.num_samples,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(ctx.seed + i),
            )
            if pipeline.device.type == "cuda":
                torch.cuda.synchronize(pipeline.device)
            seconds.append(time.perf_counter() - start)
            gen = output.weights
            decoded = pipeline.layout.detokenize(output.tokens)  # the decoder's own heads, before any head solver
            generated_sds.extend(gen)
            gen_support = shared_accuracy(ctx.module, gen, *ctx.data["support"][i])
            gen_test = shared_accuracy(ctx.module, gen, *ctx.data["test"][i])
            best = int(gen_support.argmax())
            x, y = ctx.data["test"][i]
            per_class = [shared_accuracy(ctx.module, [gen[best]], x[y == k], y[y == k])[0] for k in range(len(row["classes"]))]
            row.update(
                {
                    "generated_mean": float(gen_test.mean()),
                    "generated_best": float(gen_test[best]),
                    "generated_best_support": float(gen_support[best]),
                    "generated_best_class_acc": [float(a) for a in per_class],
                    "generated_head_only": (
                        float(shared_accuracy(ctx.module, [head_only(decoded[best])], x, y)[0]) if head_only else None
                    ),
                    "generated": [float(a) for a in gen_test],
                    "sample_seconds": seconds[-1],
                }
            )
            advance()
    finally:
        if previous_bar is None:
            pipeline.__dict__.pop("_progress_bar_config", None)
        else:
            pipeline._progress_bar_config = previous_bar
    return generated_sds, seconds


def _head_only(layout: WeightLayout, init: Mapping[str, torch.Tensor] | None):
    """``sd -> sd`` keeping the decoded classifier head (the layout's last module) and resetting every
    other generated tensor to the shared init: the ablation that shows what the body (e.g. an adapter)
    adds. ``None`` when the zoo has no init or the layout is only the head."""
    head = set(layout.head_names())
    body = {n for n in layout.names if n not in head}
    if init is None or not body:
        return None
    return lambda sd: {k: init[k] if k in body else v for k, v in sd.items()}
