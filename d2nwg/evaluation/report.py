"""The evaluation report: summaries over tasks, the Markdown page and the files on disk.

`summarize` turns the per-task rows of `d2nwg.evaluation.protocol.evaluate` into means (keys
``<metric>_acc`` from `d2nwg.evaluation.metrics.METRICS`), the fine-tuning curve and the margins a
generator has to show; `summarize_by_kind` does the same per kind of held-out task
(``unseen_order`` / ``unseen_classes``, see `d2nwg.zoo.model_zoo.ModelZoo.task_kind`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from d2nwg.evaluation.metrics import METRICS, ZERO_TRAINING_BARS
from d2nwg.utils.io import atomic_write_json, atomic_write_text

TASK_KINDS = ("unseen_order", "unseen_classes")


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values, ``None`` when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(kept) / len(kept)) if kept else None


def _lookup(mapping: Mapping, k: int):
    """``mapping[k]`` with int keys, or ``mapping[str(k)]`` after a JSON round trip."""
    return mapping.get(k, mapping.get(str(k)))


def summarize(rows: Sequence[Mapping], finetune_steps: Sequence[int]) -> dict:
    """Means over ``rows`` of every metric, the fine-tuning curve and the generator's margins.

    Returns:
        ``{"num_tasks", "<metric>_acc" for each of METRICS, "finetune_curve": {k: acc},
        "finetune_steps_to_match", "generated_minus_best_zero_training",
        "generated_best_acc_seen_classes", "generated_best_acc_unseen_classes"}``; accuracies
        in [0, 1], ``None`` where no task has the figure.
    """
    summary: dict = {"num_tasks": len(rows)}
    for metric in METRICS:
        summary[metric.summary_key] = mean([r.get(metric.key) for r in rows])
    curve = {k: mean([_lookup(r.get("finetune") or {}, k) for r in rows]) for k in finetune_steps}
    summary["finetune_curve"] = curve
    target = summary["generated_best_acc"]
    summary["finetune_steps_to_match"] = next(
        (k for k in finetune_steps if target is not None and curve[k] is not None and curve[k] >= target), None
    )
    bars = [summary[f"{k}_acc"] for k in ZERO_TRAINING_BARS if summary.get(f"{k}_acc") is not None]
    summary["generated_minus_best_zero_training"] = target - max(bars) if target is not None and bars else None
    # Per class: the generated best's test accuracy on classes the zoo has seen vs classes it has not.
    for kind in ("seen", "unseen"):
        values = [
            acc
            for r in rows
            for acc, seen in zip(r.get("generated_best_class_acc") or [], r.get("class_seen") or [])
            if seen == (kind == "seen")
        ]
        summary[f"generated_best_acc_{kind}_classes"] = mean(values)
    return summary


def summarize_by_kind(rows: Sequence[Mapping], finetune_steps: Sequence[int]) -> dict[str, dict]:
    """`summarize` over the rows of each kind of held-out task that has any."""
    return {
        kind: summarize([r for r in rows if r.get("kind") == kind], finetune_steps)
        for kind in TASK_KINDS
        if any(r.get("kind") == kind for r in rows)
    }


# ----------------------------------------------------------------------------- Markdown
KIND_TITLES = {"unseen_order": "Unseen order (seen classes, new combination)", "unseen_classes": "Unseen classes"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary_table(summary: Mapping, finetune_from: str) -> list[str]:
    oracle = summary.get("oracle_acc")
    lines = ["| method | test accuracy | / oracle |", "|---|---:|---:|"]
    for metric in METRICS:
        value = summary.get(metric.summary_key)
        if value is None:
            continue
        ratio = value / oracle if oracle else None
        label = f"**{metric.label}**" if metric.role == "generated" else metric.label
        lines.append(f"| {label} | {_fmt(value)} | {_fmt(ratio)} |")
    for k, value in (summary.get("finetune_curve") or {}).items():
        ratio = value / oracle if value is not None and oracle else None
        lines.append(f"| fine-tune {_count(int(k), 'step')} from {finetune_from} | {_fmt(value)} | {_fmt(ratio)} |")
    lines += [
        "",
        f"- generated best minus the best zero-training baseline: {_fmt(summary.get('generated_minus_best_zero_training'))}",
        f"- generated best on seen / unseen classes: {_fmt(summary.get('generated_best_acc_seen_classes'))} / "
        f"{_fmt(summary.get('generated_best_acc_unseen_classes'))}",
        "- fine-tuning steps to match generated best: "
        + (str(summary["finetune_steps_to_match"]) if summary.get("finetune_steps_to_match") is not None else "not reached"),
    ]
    return lines


def report_markdown(report: Mapping) -> str:
    """The Markdown report: a summary table per kind of held-out task, diagnostics, plots, per-task rows."""
    s = report["summary"]
    finetune_from = s.get("finetune_from", "init")
    lines = ["# D2NWG evaluation", "", f"{_count(s['num_tasks'], 'held-out task')}; accuracies on each task's test samples.", ""]
    if report.get("warnings"):  # trust checks (`d2nwg.evaluation.trust`) first: they qualify every figure below
        lines += ["## Warnings", ""] + [f"- **warning:** {m}" for m in report["warnings"]] + [""]
    lines += ["## All held-out tasks", ""] + _summary_table({**s, "finetune_curve": report["finetune_curve"]}, finetune_from)
    for kind, sub in (report.get("summary_by_kind") or {}).items():
        title = KIND_TITLES.get(kind, kind)
        lines += ["", f"## {title}: {_count(sub['num_tasks'], 'task')}", ""] + _summary_table(sub, finetune_from)
    settings = s.get("settings", {})
    lines += [
        "",
        "## Diagnostics",
        "",
        f"- novelty ratio (median nearest-zoo distance of generated / of zoo members): {_fmt(s.get('novelty_ratio'))}",
        f"- VAE reconstruction ratio (acc of decode(encode(w)) / acc of w, {s.get('vae_members')} members): {_fmt(s.get('vae_recon_ratio'))}",
        "- VAE reconstruction ratio by kind of member: "
        + (", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("vae_recon_ratio_by_kind") or {}).items()) or "n/a"),
        "- within-task spread ratio (median pairwise distance among a task's samples / the zoo's nearest-neighbour "
        f"spacing; median over tasks): {_fmt(s.get('within_task_spread_ratio'))}",
        "- nearest-member ratio (median distance of a task's samples to their nearest zoo member / that spacing): "
        f"{_fmt(s.get('nearest_member_ratio'))}",
        f"- sampling time per task: {_fmt(s.get('sample_seconds_per_task'), 2)} s",
        f"- non-finite generated weight sets: {s.get('generated_nonfinite', 0)}",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "![accuracy by method](accuracy_by_method.png)",
        "",
        "![accuracy vs fine-tuning steps](finetune_curve.png)",
        "",
        "## Provenance of the pipeline",
        "",
        *[f"- {label}: {value}" for label, value in provenance_rows(report.get("provenance"))],
        "",
        "## Per task",
        "",
    ]
    shown = [m for m in METRICS if m.role != "ablation" and s.get(m.summary_key) is not None]
    lines += [
        "| task | kind | classes | " + " | ".join(m.key for m in shown) + " |",
        "|---|---|---|" + "---:|" * len(shown),
    ]
    for r in report["per_task"]:
        cells = [_fmt(r.get(m.key)) for m in shown]
        lines.append(f"| {r['task']} | {r.get('kind', '')} | {','.join(map(str, r['classes']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: Path) -> None:
    """Write ``report.json``, ``report.md``, ``accuracy_by_method.png`` and ``finetune_curve.png`` into ``out``."""
    from d2nwg.utils.plots import plot_accuracy_by_method, plot_finetune_curve

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = report["summary"].get("settings", {}).get("finetune_steps", [])
    shown = sorted({k for k in (report["summary"].get("finetune_steps_to_match"), max(steps, default=None)) if k is not None})
    plot_accuracy_by_method(report["per_task"], out / "accuracy_by_method.png", finetune_steps=shown)
    plot_finetune_curve(report["finetune_curve"], report["summary"], out / "finetune_curve.png")
    atomic_write_text(out / "report.md", report_markdown(report))
    atomic_write_json(out / "report.json", report)


def provenance_rows(provenance: Mapping | None) -> list[tuple[str, str]]:
    """``(label, value)`` rows describing a provenance for a terminal table or a model card.

    The config row lists the top-level scalar settings of ``model`` and ``data`` (steps, learning rates,
    head solver, batch size, zoo) and the seed; network sizes and the rest stay in ``model_index.json``.
    """
    if not provenance:
        return [("provenance", "none recorded (exported before d2nwg recorded provenance)")]
    steps = provenance.get("steps") or {}
    zoo = provenance.get("zoo") or {}
    ratio = provenance.get("vae_recon_ratio")
    config = provenance.get("config") or {}
    settings = [
        f"{section}.{key}={value}"
        for section in ("model", "data")
        if isinstance(config.get(section), Mapping)
        for key, value in config[section].items()
        if not isinstance(value, (Mapping, list))
    ]
    if "seed_everything" in config:
        settings.append(f"seed_everything={config['seed_everything']}")
    return [
        ("d2nwg version", str(provenance.get("d2nwg_version"))),
        ("training steps", f"VAE {steps.get('vae')} + diffusion {steps.get('diffusion')}"),
        (
            "zoo",
            f"{zoo.get('name')} (recipe {zoo.get('recipe')}): {zoo.get('members')} members, trained on "
            f"{zoo.get('trained_on')} ({zoo.get('split')}), fingerprint {zoo.get('fingerprint')}, at {zoo.get('path')}",
        ),
        ("VAE reconstruction ratio at export", "n/a" if ratio is None else f"{ratio:.3f}"),
        ("training config", ", ".join(settings) or "n/a"),
    ]
