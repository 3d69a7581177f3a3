"""What d2nwg prints to a terminal: rich tables of zoos and reports, and quiet third-party progress bars.

The CLI, the demo and the benchmarks print through these functions; library code returns data.
``rich`` is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


def print_heading(text: str) -> None:
    """Print ``text`` centred in a horizontal rule (a stage heading)."""
    from rich.console import Console

    Console().rule(text)


def print_table(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """Print ``(key, value)`` rows as a two-column table without a header.

    Args:
        title: the table's title.
        rows: pairs whose values are printed with ``str``.
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, str(value))
    Console().print(table)


def print_zoo(summary: dict) -> None:
    """Print a zoo's counts, sizes and member accuracy.

    Args:
        summary: ``ModelZoo.summary()``.
    """
    metric = "test_acc" if "test_acc" in summary else "test_loglik"  # generative zoos: response log-likelihood
    acc = summary[metric]
    label = "member test accuracy" if metric == "test_acc" else "member test log-likelihood (nats/token)"
    print_table(
        f"model zoo {summary['root']}",
        [
            ("architecture", json.dumps(summary["architecture"])),
            ("members", f"{summary['members']}  {summary['members_by_split']}"),
            ("tasks", f"{summary['tasks']}  {summary['tasks_by_split']}"),
            ("classes in pool", str(summary["classes"])),
            ("parameters per member", f"{summary['params_per_member']:,}"),
            ("tokens per member", f"{summary['tokens_per_member']} x {summary['chunk_size']}"),
            ("token bytes (float32)", f"{summary['token_bytes']:,}  {json.dumps(summary['token_bytes_by_split'])}"),
            (label, f"mean {acc['mean']:.4f}  min {acc['min']:.4f}  max {acc['max']:.4f}"),
            ("samples per split", json.dumps(summary["samples_per_split"])),
        ],
    )


def print_summary(summary: dict) -> None:
    """Print an evaluation summary: floats with 4 decimals, ints and missing values as they are.

    Args:
        summary: ``evaluate(...)["summary"]``; entries of other types (lists, dicts) are left out.
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out tasks (accuracy on test samples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int) or value is None:
            table.add_row(key, str(value))
    Console().print(table)


def print_summary_by_kind(by_kind: dict) -> None:
    """Print each metric per kind of held-out task side by side (``evaluate(...)["summary_by_kind"]``)."""
    from rich.console import Console
    from rich.table import Table

    from d2nwg.evaluation.metrics import METRICS

    if not by_kind:
        return
    table = Table(title="by kind of held-out task (test accuracy)")
    table.add_column("metric")
    for kind, summary in by_kind.items():
        table.add_column(f"{kind} ({summary['num_tasks']})", justify="right")
    keys = [m.summary_key for m in METRICS] + ["generated_minus_best_zero_training"]
    for key in keys:
        values = [s.get(key) for s in by_kind.values()]
        if any(v is not None for v in values):
            table.add_row(key, *("n/a" if v is None else f"{v:.4f}" for v in values))
    Console().print(table)


@contextmanager
def hidden_progress_bars(hf_logging) -> Iterator[None]:
    """Hide a Hugging Face library's own progress bars (e.g. "Loading weights") while loading.

    A bar on stderr would break the CLI's one-line errors. The previous setting comes back afterwards.

    Args:
        hf_logging: ``transformers.utils.logging`` or ``diffusers.utils.logging`` (same interface).
    """
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
