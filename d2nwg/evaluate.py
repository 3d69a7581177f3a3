"""The evaluation protocol (DESIGN.md §4): generated weights vs cheap baselines on held-out tasks.

For every held-out task of a zoo (its member is the oracle), the pipeline is
conditioned on the task's *support* samples and generates N weight sets. We report
their mean test accuracy and the test accuracy of the one with the best *support*
accuracy (selection never looks at test samples), next to the baselines that a
generator must beat to show it has not merely memorised the zoo (Zeng et al. 2025):
the shared initialisation, the zoo mean, retrieval of the nearest zoo member,
retrieval plus noise, fine-tuning from the initialisation for k steps, and the
oracle. Novelty (distance to the nearest zoo member) and the VAE's reconstruction
ratio complete the picture.

Every accuracy is computed with `ensemble_accuracy` over stacked weight sets, so a
whole group of models runs in one vmapped forward.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from d2nwg.architectures import build_model
from d2nwg.ensemble import ensemble_accuracy, recipe_optimizer, stack_state_dicts, train_ensemble
from d2nwg.io import atomic_write_json, atomic_write_text
from d2nwg.pipeline import D2NWGPipeline
from d2nwg.weights import WeightLayout
from d2nwg.zoo import Member, ModelZoo

SUMMARY_ACCURACIES = (
    "oracle_acc",
    "init_acc",
    "zoo_mean_acc",
    "retrieval_acc",
    "retrieval_noise_acc",
    "generated_mean_acc",
    "generated_best_acc",
    "generated_head_only_acc",
)
FINETUNE_STEPS = (1, 2, 5, 10, 20, 50, 100)
"""Step counts of the fine-tuning baseline, capped by the members' own training steps."""
EVAL_BATCH = 256  # weight sets per vmapped forward: bounds memory for larger targets
MAX_NOVELTY_REFERENCE = 500  # zoo members whose nearest-neighbour distance is the novelty reference
MAX_VAE_MEMBERS = 200  # members whose reconstruction accuracy is measured


# ----------------------------------------------------------------------------- accuracy helpers
def _to_float(sd: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device) for k, v in sd.items()}


def shared_accuracy(
    module: nn.Module, state_dicts: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Accuracy ``[N]`` of N weight sets on one dataset ``x [n, D]``, ``y [n]`` (batched on ``x``'s device)."""
    device = x.device
    out = []
    for i in range(0, len(state_dicts), EVAL_BATCH):
        stacked = stack_state_dicts([_to_float(sd, device) for sd in state_dicts[i : i + EVAL_BATCH]])
        out.append(ensemble_accuracy(module, stacked, x, y).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def paired_accuracy(
    module: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Accuracy ``[N]`` of weight set i on dataset i; datasets of equal shape run in one batch."""
    if len(state_dicts) != len(data):
        raise ValueError(f"got {len(state_dicts)} weight sets for {len(data)} datasets")
    groups: dict[tuple, list[int]] = {}
    for i, (x, y) in enumerate(data):
        groups.setdefault((tuple(x.shape), tuple(y.shape)), []).append(i)
    acc = torch.zeros(len(data))
    for idx in groups.values():
        for s in range(0, len(idx), EVAL_BATCH):
            chunk = idx[s : s + EVAL_BATCH]
            device = data[chunk[0]][0].device
            stacked = stack_state_dicts([_to_float(state_dicts[i], device) for i in chunk])
            x = torch.stack([data[i][0] for i in chunk])
            y = torch.stack([data[i][1] for i in chunk])
            acc[chunk] = ensemble_accuracy(module, stacked, x, y).cpu()
    return acc


def default_finetune_steps(recipe: Mapping) -> list[int]:
    """`FINETUNE_STEPS` up to the recipe's member ``steps`` (included), or all of them without one."""
    steps = recipe.get("steps")
    if not isinstance(steps, int) or steps < 1:
        return list(FINETUNE_STEPS)
    return [k for k in FINETUNE_STEPS if k < steps] + [steps]


# ----------------------------------------------------------------------------- retrieval
def dataset_embedding(per_class: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenated per-class mean features in label order, ``[K * D]``."""
    return torch.cat([c.float().mean(0) for c in per_class])


def retrieve(
    zoo: ModelZoo, task_ids: Sequence[str], *, candidates: Sequence[Member] | None = None, split: str = "support"
) -> list[Member]:
    """For each task, the candidate member (default: the train members) whose task embedding is nearest.

    The embedding is `dataset_embedding` of the task's ``split`` samples on both sides, and
    the distance is Euclidean. Only tasks with the same number of classes (and features)
    are candidates; ties go to the first member.

    Example:
        >>> [m.id for m in retrieve(zoo, ["task01000"])]  # doctest: +SKIP
        ['task00417-s0']
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
        out.append(first_member[cand_tasks[by_size[q.numel()][int(d.argmin())]]])
    return out


# ----------------------------------------------------------------------------- novelty
def _flat_tokens(layout: WeightLayout, state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    return layout.tokenize(list(state_dicts)).flatten(1)  # (N, T * chunk), normalised, padding zero


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest reference row (``exclude[i]``: a row to skip)."""
    out = []
    for s in range(0, len(queries), 256):
        d = torch.cdist(queries[s : s + 256], reference, compute_mode="donot_use_mm_for_euclid_dist")
        if exclude is not None:
            d[torch.arange(len(d)), exclude[s : s + 256]] = math.inf
        out.append(d.min(1).values)
    return torch.cat(out)


# ----------------------------------------------------------------------------- evaluation
def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(kept) / len(kept)) if kept else None


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
        max_tasks: evaluate only the first held-out tasks.
        noise_std: retrieval+noise perturbation, in units of each tensor's zoo std.
        finetune_steps: step counts k of the fine-tuning baseline. Default: those of
            `FINETUNE_STEPS` below the zoo recipe's member ``steps``, then ``steps`` itself
            (fine-tuning that long is the oracle's own training, so longer runs add nothing);
            all of `FINETUNE_STEPS` when the recipe does not say.
        progress: show a rich progress bar.

    Returns:
        ``{"summary": {...}, "per_task": [...], "finetune_curve": {k: mean acc}}``. Accuracies
        are test accuracies in [0, 1]; ``None`` marks a baseline that cannot run (no shared init).

    Example:
        >>> pipe = D2NWGPipeline.from_pretrained("runs/demo/run/pipeline")   # doctest: +SKIP
        >>> report = evaluate(pipe, ModelZoo.open("runs/zoo"), Path("runs/eval"))  # doctest: +SKIP
        >>> report["summary"]["generated_best_acc"], report["summary"]["retrieval_acc"]  # doctest: +SKIP
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if finetune_steps is None:
        finetune_steps = default_finetune_steps(zoo.manifest.get("recipe") or {})
    finetune_steps = sorted({int(k) for k in finetune_steps})
    if any(k < 0 for k in finetune_steps):
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    _check_compatible(pipeline, zoo)
    layout = pipeline.layout

    # 1. Tasks: one per held-out member (the first member of a task is its oracle).
    oracles: dict[str, Member] = {}
    for m in zoo.members("heldout"):
        oracles.setdefault(m.task, m)
    task_ids = list(oracles)[:max_tasks] if max_tasks is not None else list(oracles)
    if not task_ids:
        raise ValueError(f"the zoo at {zoo.root} has no held-out members to evaluate on")
    train_members = zoo.members("train")
    if not train_members:
        raise ValueError(f"the zoo at {zoo.root} has no train members; the baselines need them")

    # 2. The target model, with non-layout tensors taken from the shared init when there is one.
    device = pipeline.device
    init = zoo.init_state()
    module = build_model(zoo.architecture)
    if init is not None:
        module.load_state_dict(init, strict=False)
    module = module.to(device).eval()
    data = {
        split: [tuple(t.to(device) for t in zoo.task_data(task, split)) for task in task_ids]
        for split in ("train", "support", "test")
    }
    recipe = zoo.manifest.get("recipe") or {}
    optim = recipe_optimizer(recipe)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    previous_bar = getattr(pipeline, "_progress_bar_config", None)
    pipeline.set_progress_bar_config(disable=True)
    try:
        with Progress(*columns, disable=not progress, transient=True) as bar:
            job = bar.add_task("baselines", total=len(task_ids))

            # 3. Oracle, init and zoo mean, each a batch over tasks.
            train_sds = [zoo.load_member(m) for m in train_members]
            train_sd_by_id = {m.id: sd for m, sd in zip(train_members, train_sds)}
            oracle_sds = [zoo.load_member(oracles[t]) for t in task_ids]
            oracle_acc = paired_accuracy(module, oracle_sds, data["test"])
            init_acc = paired_accuracy(module, [init] * len(task_ids), data["test"]) if init is not None else None
            zoo_mean = _mean_state_dict(train_sds)
            zoo_mean_acc = paired_accuracy(module, [zoo_mean] * len(task_ids), data["test"])

            # 4. Retrieval of the nearest train member, and N noisy copies of it.
            retrieved = retrieve(zoo, task_ids, candidates=train_members)
            retrieved_sds = [train_sd_by_id[m.id] for m in retrieved]  # already loaded, not re-read
            retrieval_acc = paired_accuracy(module, retrieved_sds, data["test"])
            zoo_std = {spec.name: spec.std for spec in layout.tensors}
            head_only = _head_only(layout, init)

            # 5. Generation, task by task: sample on support, select on support, report test.
            rows, generated_sds, sample_seconds = [], [], []
            bar.update(job, description="generating")
            for i, task in enumerate(task_ids):
                support = zoo.class_samples(task, "support")
                start = time.perf_counter()
                output = pipeline(
                    dataset=support,
                    num_samples=num_samples,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed + i),
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                sample_seconds.append(time.perf_counter() - start)
                gen = output.weights
                generated_sds.extend(gen)
                gen_support = shared_accuracy(module, gen, *data["support"][i])
                gen_test = shared_accuracy(module, gen, *data["test"][i])
                best = int(gen_support.argmax())

                g = torch.Generator().manual_seed(seed + i)
                noisy = [
                    {
                        k: v + noise_std * zoo_std[k] * torch.randn(v.shape, generator=g, dtype=v.dtype)
                        if k in zoo_std
                        else v
                        for k, v in retrieved_sds[i].items()
                    }
                    for _ in range(num_samples)
                ]
                head_only_test = shared_accuracy(module, [head_only(gen[best])], *data["test"][i]) if head_only else None
                noisy_support = shared_accuracy(module, noisy, *data["support"][i])
                noisy_test = shared_accuracy(module, noisy, *data["test"][i])

                rows.append(
                    {
                        "task": task,
                        "classes": list(zoo.tasks[task]["classes"]),
                        "oracle_member": oracles[task].id,
                        "retrieval_member": retrieved[i].id,
                        "oracle": float(oracle_acc[i]),
                        "init": float(init_acc[i]) if init_acc is not None else None,
                        "zoo_mean": float(zoo_mean_acc[i]),
                        "retrieval": float(retrieval_acc[i]),
                        "retrieval_noise": float(noisy_test[int(noisy_support.argmax())]),
                        "retrieval_noise_mean": float(noisy_test.mean()),
                        "generated_mean": float(gen_test.mean()),
                        "generated_best": float(gen_test[best]),
                        "generated_best_support": float(gen_support[best]),
                        "generated_head_only": float(head_only_test[0]) if head_only else None,
                        "generated": [float(a) for a in gen_test],
                        "sample_seconds": sample_seconds[-1],
                    }
                )
                bar.advance(job)

            # 6. Fine-tuning from the init on each task's train split (all tasks in one batch when shapes match).
            bar.update(job, description="fine-tuning")
            curve_per_task = _finetune(module, init, zoo, data, finetune_steps, optim, seed)
            for i, row in enumerate(rows):
                row["finetune"] = {k: float(curve_per_task[k][i]) for k in finetune_steps}

            # 7. Novelty in normalised token space, and the VAE's reconstruction ratio.
            bar.update(job, description="novelty and VAE reconstruction")
            novelty = _novelty(layout, generated_sds, train_sds, seed)
            vae = _vae_reconstruction(pipeline, zoo, module, seed)
    finally:
        if previous_bar is None:
            pipeline.__dict__.pop("_progress_bar_config", None)
        else:
            pipeline._progress_bar_config = previous_bar

    # 8. Summary: means over tasks.
    finetune_curve = {k: _mean([r["finetune"][k] for r in rows]) for k in finetune_steps}
    summary = {
        "num_tasks": len(task_ids),
        "oracle_acc": _mean([r["oracle"] for r in rows]),
        "init_acc": _mean([r["init"] for r in rows]),
        "zoo_mean_acc": _mean([r["zoo_mean"] for r in rows]),
        "retrieval_acc": _mean([r["retrieval"] for r in rows]),
        "retrieval_noise_acc": _mean([r["retrieval_noise"] for r in rows]),
        "generated_mean_acc": _mean([r["generated_mean"] for r in rows]),
        "generated_best_acc": _mean([r["generated_best"] for r in rows]),
        "generated_head_only_acc": _mean([r["generated_head_only"] for r in rows]),
    }
    target = summary["generated_best_acc"]
    summary["finetune_steps_to_match"] = next(
        (k for k in finetune_steps if target is not None and finetune_curve[k] is not None and finetune_curve[k] >= target),
        None,
    )
    summary.update(
        {
            "finetune_from": "zoo init" if init is not None else "random init",
            **vae,
            **novelty,
            "sample_seconds_per_task": float(statistics.fmean(sample_seconds)),
            "settings": {
                "num_samples": num_samples,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "seed": seed,
                "noise_std": noise_std,
                "finetune_steps": finetune_steps,
                **{f"finetune_{k}": v for k, v in optim.items()},
                "device": str(device),
                "zoo": str(zoo.root),
            },
        }
    )
    report = {"summary": summary, "per_task": rows, "finetune_curve": finetune_curve}
    if out is not None:
        write_report(report, Path(out))
    return report


def _head_only(layout: WeightLayout, init: Mapping[str, torch.Tensor] | None):
    """``sd -> sd`` keeping the generated classifier head (the layout's last module) and resetting every
    other generated tensor to the shared init: the ablation that shows what the body (e.g. an adapter)
    adds. ``None`` when the zoo has no init or the layout is only the head."""
    head = set(layout.head_names())
    body = {n for n in layout.names if n not in head}
    if init is None or not body:
        return None
    return lambda sd: {k: init[k] if k in body else v for k, v in sd.items()}


def _mean_state_dict(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Elementwise mean of floating tensors (float64 running sum); other tensors from the first."""
    first = state_dicts[0]
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in first.items() if v.is_floating_point()}
    for sd in state_dicts:
        for k in total:
            total[k] += sd[k].double()
    return {k: (total[k] / len(state_dicts)).to(v.dtype) if k in total else v for k, v in first.items()}


def _finetune(
    module: nn.Module,
    init: Mapping[str, torch.Tensor] | None,
    zoo: ModelZoo,
    data: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]],
    steps: Sequence[int],
    optim: Mapping,
    seed: int,
) -> dict[int, torch.Tensor]:
    """Test accuracy ``{k: [num_tasks]}`` after k AdamW steps from the init (a seeded fresh init if the zoo has none)."""
    num_tasks = len(data["train"])
    if not steps:
        return {}
    if init is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init = build_model(zoo.architecture).state_dict()
    device = data["train"][0][0].device
    start = {k: v.to(device=device, dtype=torch.float32) for k, v in init.items() if v.is_floating_point()}
    groups: dict[tuple, list[int]] = {}
    for i, ((x, y), (tx, ty)) in enumerate(zip(data["train"], data["test"])):
        groups.setdefault((x.shape, y.shape, tx.shape, ty.shape), []).append(i)
    curves = {k: torch.zeros(num_tasks) for k in steps}
    for idx in groups.values():
        x, y = (torch.stack([data["train"][i][j] for i in idx]) for j in (0, 1))  # (N, n, D), (N, n)
        tx, ty = (torch.stack([data["test"][i][j] for i in idx]) for j in (0, 1))
        with torch.enable_grad():
            _, recorded = train_ensemble(
                module, start, x, y, steps=max(steps), **optim,
                record_at=steps, eval_x=tx, eval_y=ty,
            )
        for k in steps:
            curves[k][idx] = recorded[k].cpu()
    return curves


def _novelty(
    layout: WeightLayout, generated: Sequence[Mapping[str, torch.Tensor]], train: Sequence[Mapping[str, torch.Tensor]], seed: int
) -> dict:
    """Generated sets' nearest-train-member distances vs the zoo's own nearest-neighbour distances."""
    finite = [sd for sd in generated if all(torch.isfinite(sd[n]).all() for n in layout.names)]
    zoo_tokens = _flat_tokens(layout, train)
    result = {
        "novelty_ratio": None,
        "generated_nn_distance": None,
        "zoo_nn_distance": None,
        "generated_nonfinite": len(generated) - len(finite),
    }
    if finite:
        result["generated_nn_distance"] = float(nearest_distances(_flat_tokens(layout, finite), zoo_tokens).median())
    if len(zoo_tokens) > 1:
        g = torch.Generator().manual_seed(seed)
        ref = torch.randperm(len(zoo_tokens), generator=g)[:MAX_NOVELTY_REFERENCE]
        result["zoo_nn_distance"] = float(nearest_distances(zoo_tokens[ref], zoo_tokens, exclude=ref).median())
    if result["generated_nn_distance"] is not None and result["zoo_nn_distance"]:
        result["novelty_ratio"] = result["generated_nn_distance"] / result["zoo_nn_distance"]
    return result


@torch.no_grad()
def _vae_reconstruction(pipeline: D2NWGPipeline, zoo: ModelZoo, module: nn.Module, seed: int) -> dict:
    """Mean test accuracy of decode(encode(w)) (posterior mean) over that of w, on up to 200 members."""
    heldout, train = zoo.members("heldout"), zoo.members("train")
    members = heldout[:MAX_VAE_MEMBERS]
    if len(members) < MAX_VAE_MEMBERS and train:
        g = torch.Generator().manual_seed(seed)
        picks = torch.randperm(len(train), generator=g)[: MAX_VAE_MEMBERS - len(members)].sort().values
        members += [train[int(i)] for i in picks]
    layout, vae = pipeline.layout, pipeline.vae
    originals = [zoo.load_member(m) for m in members]
    tokens = layout.tokenize(originals)  # (M, T, chunk), normalised as the VAE saw them in training
    recon = []
    for s in range(0, len(tokens), 64):
        mean, _ = vae.encode(tokens[s : s + 64].to(device=vae.device, dtype=vae.dtype))
        recon.append(vae.decode(mean).float().cpu())  # the posterior mean is unscaled: decode it directly
    recon_sds = [{**orig, **rec} for orig, rec in zip(originals, layout.detokenize(torch.cat(recon)))]
    device = next(module.parameters()).device
    test = [tuple(t.to(device) for t in zoo.task_data(m.task, "test")) for m in members]
    orig_acc = float(paired_accuracy(module, originals, test).mean())
    recon_acc = float(paired_accuracy(module, recon_sds, test).mean())
    return {
        "vae_recon_ratio": recon_acc / orig_acc if orig_acc > 0 else None,
        "vae_recon_acc": recon_acc,
        "vae_original_acc": orig_acc,
        "vae_members": len(members),
    }


# ----------------------------------------------------------------------------- report files
def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(report: Mapping) -> str:
    """The Markdown report: summary table with ratios to the oracle, settings, plots and per-task rows."""
    s = report["summary"]
    oracle = s.get("oracle_acc")
    names = {
        "oracle_acc": "oracle (trained on the task)",
        "init_acc": "initialisation",
        "zoo_mean_acc": "zoo mean",
        "retrieval_acc": "retrieval (nearest zoo member)",
        "retrieval_noise_acc": "retrieval + noise (best of N on support)",
        "generated_mean_acc": "**generated, mean of N**",
        "generated_best_acc": "**generated, best of N on support**",
        "generated_head_only_acc": "generated head only (rest at init)",
    }
    lines = ["# D2NWG evaluation", "", f"{s['num_tasks']} held-out tasks; accuracies on each task's test samples.", ""]
    lines += ["| method | test accuracy | / oracle |", "|---|---:|---:|"]
    for key, label in names.items():
        value = s.get(key)
        ratio = value / oracle if value is not None and oracle else None
        lines.append(f"| {label} | {_fmt(value)} | {_fmt(ratio)} |")
    for k, value in report["finetune_curve"].items():
        ratio = value / oracle if value is not None and oracle else None
        lines.append(f"| fine-tune {k} steps from {s.get('finetune_from', 'init')} | {_fmt(value)} | {_fmt(ratio)} |")
    settings = s.get("settings", {})
    lines += [
        "",
        f"- fine-tuning steps to match generated best: {s['finetune_steps_to_match'] if s['finetune_steps_to_match'] is not None else 'not reached'}",
        f"- novelty ratio (median nearest-zoo distance of generated / of zoo members): {_fmt(s.get('novelty_ratio'))}",
        f"- VAE reconstruction ratio (acc of decode(encode(w)) / acc of w, {s.get('vae_members')} members): {_fmt(s.get('vae_recon_ratio'))}",
        f"- sampling time per task: {_fmt(s.get('sample_seconds_per_task'), 2)} s",
        f"- non-finite generated weight sets: {s.get('generated_nonfinite', 0)}",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "![accuracy by method](accuracy_by_method.png)",
        "",
        "![accuracy vs fine-tuning steps](finetune_curve.png)",
        "",
        "## Per task",
        "",
        "| task | classes | oracle | init | zoo mean | retrieval | retrieval+noise | gen mean | gen best |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["per_task"]:
        cells = [_fmt(r.get(k)) for k in ("oracle", "init", "zoo_mean", "retrieval", "retrieval_noise", "generated_mean", "generated_best")]
        lines.append(f"| {r['task']} | {','.join(map(str, r['classes']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: Path) -> None:
    """Write ``report.json``, ``report.md``, ``accuracy_by_method.png`` and ``finetune_curve.png`` into ``out``."""
    from d2nwg.plots import plot_accuracy_by_method, plot_finetune_curve

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = report["summary"].get("settings", {}).get("finetune_steps", [])
    shown = sorted({k for k in (report["summary"].get("finetune_steps_to_match"), max(steps, default=None)) if k is not None})
    plot_accuracy_by_method(report["per_task"], out / "accuracy_by_method.png", finetune_steps=shown)
    plot_finetune_curve(report["finetune_curve"], report["summary"], out / "finetune_curve.png")
    atomic_write_text(out / "report.md", report_markdown(report))
    atomic_write_json(out / "report.json", report)
