"""PNG plots of an evaluation report and of training logs (matplotlib, Agg canvas).

Figures are drawn on an explicit ``FigureCanvasAgg`` instead of ``pyplot``, so that
importing this module never switches the user's backend (notebooks keep theirs),
and every PNG is written atomically.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from d2nwg.evaluation.metrics import METRICS
from d2nwg.utils.io import atomic_path

TRAINING_COLUMNS = ("vae/loss", "diffusion/loss")


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


# ----------------------------------------------------------------------------- evaluation
def _lookup(mapping: Mapping, k: int):
    """``mapping[k]`` with int keys, or ``mapping[str(k)]`` after a JSON round trip."""
    return mapping.get(k, mapping.get(str(k)))


def plot_accuracy_by_method(per_task: Sequence[Mapping], out_png: Path, finetune_steps: Sequence[int] = ()) -> Path:
    """Box plot plus jittered points of per-task test accuracy for every method.

    Args:
        per_task: rows of `d2nwg.evaluation.protocol.evaluate` (``row[method]`` accuracies, ``row["finetune"][k]``).
        out_png: where to write the PNG.
        finetune_steps: fine-tuning step counts to show as extra columns (``ft@k``).
    """
    columns: list[tuple[str, list[float]]] = []
    for metric in METRICS:
        if metric.role == "ablation":
            continue
        values = [float(r[metric.key]) for r in per_task if r.get(metric.key) is not None]
        if values:
            columns.append((metric.key.replace("_", " "), values))
    for k in finetune_steps:
        found = (_lookup(r.get("finetune") or {}, k) for r in per_task)
        values = [float(v) for v in found if v is not None]
        if values:
            columns.append((f"ft@{k}", values))
    fig, (ax,) = _new_figure(max(6.0, 0.9 * len(columns) + 2), 4.5)
    if columns:
        rng = np.random.default_rng(0)
        ax.boxplot([v for _, v in columns], widths=0.5, showfliers=False)
        for i, (label, values) in enumerate(columns, start=1):
            color = "tab:red" if label.startswith("generated") else "tab:green" if label == "oracle" else "tab:blue"
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6, color=color, zorder=3)
        ax.set_xticks(range(1, len(columns) + 1), [c for c, _ in columns], rotation=30, ha="right")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Held-out tasks (n={len(per_task)})")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_png)


def plot_finetune_curve(curve: Mapping[int, float | None], summary: Mapping, out_png: Path) -> Path:
    """Mean test accuracy vs fine-tuning steps (log x), with generated best/mean and oracle as lines."""
    fig, (ax,) = _new_figure(6.5, 4.5)
    points = sorted((int(k), float(v)) for k, v in curve.items() if v is not None and int(k) > 0)
    if points:
        ax.plot([k for k, _ in points], [v for _, v in points], "o-", color="tab:blue", label="fine-tune from init")
        ax.set_xscale("log")
    lines = (
        ("generated_best_acc", "generated best", "tab:red", "-"),
        ("generated_mean_acc", "generated mean", "tab:red", "--"),
        ("oracle_acc", "oracle", "tab:green", "-"),
        ("retrieval_acc", "retrieval", "tab:gray", ":"),
    )
    for key, label, color, style in lines:
        value = summary.get(key)
        if value is not None and math.isfinite(value):
            ax.axhline(value, color=color, linestyle=style, label=label)
    steps = summary.get("finetune_steps_to_match")
    title = "Fine-tuning steps to match generated best: " + (str(steps) if steps is not None else "not reached")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("fine-tuning steps (AdamW, zoo recipe)")
    ax.set_ylabel("mean test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- training logs
def _read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _as_float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def plot_training_curves(metrics_csv: Path, out_png: Path, columns: Sequence[str] = TRAINING_COLUMNS) -> Path:
    """Plot Lightning ``CSVLogger`` losses (``vae/loss``, ``diffusion/loss``) against ``step``.

    One panel per column. A column that is missing (``<name>_step`` / ``<name>_epoch``
    are accepted in its place) or holds only NaN/empty cells gives a "no data" panel
    instead of an error; a missing CSV file raises ``ValueError``.

    Example:
        >>> plot_training_curves("runs/demo/logs/version_0/metrics.csv", "curves.png")  # doctest: +SKIP
    """
    fields, rows = _read_metrics(metrics_csv)
    steps = [_as_float(r.get("step")) if "step" in fields else float(i) for i, r in enumerate(rows)]
    fig, axes = _new_figure(5.0 * len(columns), 4.0, ncols=len(columns))
    for ax, name in zip(axes, columns):
        column = next((c for c in (name, f"{name}_step", f"{name}_epoch") if c in fields), None)
        points = []
        if column is not None:
            points = [(s, v) for s, v in ((s, _as_float(r.get(column))) for s, r in zip(steps, rows)) if math.isfinite(v)]
            points = [(s if math.isfinite(s) else float(i), v) for i, (s, v) in enumerate(points)]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, lw=1.0)
            if min(y) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(column or name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, out_png)
