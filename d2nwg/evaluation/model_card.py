"""The model card of a pushed pipeline: results, plot, trust checks, provenance and usage."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from d2nwg.evaluation.metrics import METRICS


def model_card(pipeline_dir: Path, repo_id: str, report: Mapping | None = None) -> str:
    """A model card (YAML front matter from ``ModelCardData``) with results, plot, trust checks, provenance and usage."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from d2nwg.utils.io import read_json

    index = read_json(pipeline_dir / "model_index.json", "pipeline index")
    target = index.get("target") or {}
    recipe = target.get("zoo_recipe", "custom")
    summary = (report or {}).get("summary", {})
    eval_results = [
        EvalResult(
            task_type="weight-generation",
            dataset_type=f"d2nwg-zoo-{recipe}",
            dataset_name=f"{recipe} zoo, held-out tasks",
            metric_type="accuracy",
            metric_name=metric.label,
            metric_value=float(summary[metric.summary_key]),
        )
        for metric in METRICS
        if metric.role != "ablation" and summary.get(metric.summary_key) is not None
    ]
    data = ModelCardData(
        library_name="d2nwg",
        license="apache-2.0",
        tags=["d2nwg", "weight-generation", "diffusion", "hypernetwork", f"zoo-{recipe}"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, dict))
    results = f"## Results on held-out tasks\n\n| metric | value |\n|---|---|\n{rows}\n" if rows else ""
    by_kind = (report or {}).get("summary_by_kind") or {}
    if by_kind:
        kinds = list(by_kind)
        header = " | ".join(f"{k} ({by_kind[k]['num_tasks']} tasks)" for k in kinds)
        lines = [f"| metric | {header} |", "|---|" + "---|" * len(kinds)]
        for metric in METRICS:
            values = [by_kind[k].get(metric.summary_key) for k in kinds]
            if any(v is not None for v in values):
                lines.append(f"| {metric.label} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + " |")
        results += "\n### By kind of held-out task\n\n" + "\n".join(lines) + "\n"
    plot = "![accuracy by method](accuracy_by_method.png)\n" if (pipeline_dir / "accuracy_by_method.png").exists() else ""
    trust = _trust_section(report) + _provenance_section(index.get("provenance"))
    arch = json.dumps(target.get("architecture", {}))
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split('/')[-1]}

A [d2nwg](https://pypi.org/project/d2nwg/) weight generator (D2NWG: a weight VAE plus a latent diffusion model
conditioned on a dataset embedding). Given a labelled dataset it generates weights for the target
architecture `{arch}` with zero gradient steps.

{results}
{plot}
{trust}
## Usage

```python
import torch
from d2nwg import D2NWGPipeline

pipe = D2NWGPipeline.from_pretrained("{repo_id}")
out = pipe(dataset=per_class_samples, num_samples=10, generator=torch.Generator().manual_seed(0))
model = pipe.build_model(out.weights[0])
```

or from the command line:

```bash
d2nwg generate --pipeline {repo_id} --dataset my_images/ --num-samples 10 --select support --out generated/
```
"""
    return ModelCard(content).content


def _trust_section(report: Mapping | None) -> str:
    """The evaluation's sample spread and trust warnings (`d2nwg.evaluation.trust`), or nothing without a report."""
    if not report:
        return ""
    ratio = (report.get("summary") or {}).get("within_task_spread_ratio")
    lines = [
        "## Trust checks",
        "",
        "- within-task spread ratio (median pairwise distance among a task's samples over the zoo's nearest-neighbour "
        "spacing; near 0: the samples collapsed): " + ("n/a" if ratio is None else f"{ratio:.3f}"),
    ]
    lines += [f"- **warning:** {m}" for m in report.get("warnings") or []]
    return "\n".join(lines) + "\n\n"


def _provenance_section(provenance: Mapping | None) -> str:
    """Where the pipeline came from (`d2nwg.training.provenance`): versions, steps per stage, the zoo and the training config."""
    from d2nwg.evaluation.report import provenance_rows

    lines = ["## Provenance", ""] + [f"- {label}: {value}" for label, value in provenance_rows(provenance)]
    if provenance and provenance.get("config"):
        config = json.dumps(provenance["config"], indent=2)
        lines += ["", "<details><summary>full training config</summary>", "", "```json", config, "```", "", "</details>"]
    return "\n".join(lines) + "\n"
