"""Hugging Face Hub I/O: push a pipeline with a model card, and download one by repo id.

Tokens come from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``)
and are never printed. A custom ``DiffusionPipeline`` cannot be loaded straight
from a repo id, so `download_pipeline` runs ``snapshot_download`` first and the
pipeline loads from that folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from d2nwg.errors import one_line
from d2nwg.evaluation.metrics import METRICS


def looks_like_local_path(text: str) -> bool:
    """Whether ``text`` can only mean a local path, never a Hub repo id (``user/name`` or ``name``).

    True for paths starting with ``.``, ``/`` or ``~``, holding a backslash, more than one ``/`` or a trailing
    ``/``, and for anything that exists on disk.
    """
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or Path(text).exists()
    )


@dataclass(frozen=True)
class HubSnapshot:
    """Which commit of a Hub repo a download used.

    Attributes:
        repo_id: ``user/name``.
        revision: what was asked for (a branch, tag or commit; ``None`` means ``main``).
        commit: the 40-hex commit sha the files come from (the snapshot folder's name in the cache).
        cached: True when the Hub could not be reached (or ``HF_HUB_OFFLINE`` is set) and the cached
            snapshot of ``revision`` was used, which may be older than the Hub's.
        path: the snapshot folder.
    """

    repo_id: str
    revision: str | None
    commit: str
    cached: bool
    path: Path

    def to_dict(self) -> dict:
        """The JSON record that output folders and reports keep (no local path)."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "cached": self.cached}

    def describe(self) -> str:
        """One line for the console, e.g. ``using cached snapshot 3f2a... of me/gen (the Hub could not be reached)``."""
        if self.cached:
            return f"using cached snapshot {self.commit} of {self.repo_id} (the Hub could not be reached, or HF_HUB_OFFLINE is set)"
        return f"{self.repo_id} at commit {self.commit}" + (f" (revision {self.revision})" if self.revision else "")


def download_pipeline(repo_id: str, revision: str | None = None) -> HubSnapshot:
    """``snapshot_download`` a pipeline repo at ``revision``, recording the commit it resolved to.

    The commit is the name of the snapshot folder the files come from. When the Hub cannot be reached
    (``HfApi.repo_info`` fails on the transport) or ``HF_HUB_OFFLINE`` is set, the cached snapshot of
    ``revision`` is used, as ``snapshot_download`` itself would, and `HubSnapshot.cached` says so.

    Args:
        repo_id: ``user/name`` on the Hub (``HF_ENDPOINT`` selects another Hub).
        revision: a branch, tag or commit sha; ``None`` for ``main``.

    Raises:
        ValueError: one line: ``repo_id`` is a local-looking path that is not a folder ("pipeline folder not
            found"), not a valid repo id, not on the Hub, an unknown revision, or neither reachable nor cached.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # A mistyped local path ("runs/typo/pipeline") would otherwise reach huggingface_hub, whose
    # "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" hides what went wrong.
    if looks_like_local_path(repo_id):
        if Path(repo_id).exists():
            raise ValueError(f"pipeline {repo_id} is a file; pass the pipeline folder (the one holding model_index.json)")
        raise ValueError(f"pipeline folder not found: {repo_id}")
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:  # reachable? (snapshot_download alone falls back to the cache silently)
        online = not constants.HF_HUB_OFFLINE and bool(HfApi().repo_info(repo_id, revision=revision).sha)
    except HFValidationError:
        raise ValueError(f"pipeline folder not found, and not a Hub repo id (user/name) either: {repo_id}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"Hub repo '{repo_id}' not found (or not accessible with your token)") from None
    except RevisionNotFoundError:
        raise ValueError(f"Hub repo '{repo_id}' has no revision '{revision}'") from None
    except Exception:  # noqa: BLE001 - any transport error (requests' are OSError, httpx's are not): use the cache
        online = False
    try:
        # By name, not by the sha just seen, so that the cache records the ref for a later offline run.
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=not online))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"cannot download {where}: no connection to the Hub and no cached copy "
            "(check the path if you meant a local folder)"
        ) from None
    except Exception as err:  # noqa: BLE001 - HTTP, transport and disk errors alike become one line
        raise ValueError(f"cannot download {where}: {one_line(err)}") from None
    return HubSnapshot(repo_id, revision, path.name, not online, path)  # a cache snapshot's folder is its commit


def cache_blobs(snapshot: Path) -> Path:
    """The ``blobs/`` folder that a Hub cache snapshot's files link into (``<repo>/snapshots/<sha>/`` -> ``<repo>/blobs``)."""
    return snapshot.parent.parent / "blobs"


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
    from d2nwg.training.provenance import provenance_rows

    lines = ["## Provenance", ""] + [f"- {label}: {value}" for label, value in provenance_rows(provenance)]
    if provenance and provenance.get("config"):
        config = json.dumps(provenance["config"], indent=2)
        lines += ["", "<details><summary>full training config</summary>", "", "```json", config, "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def push_pipeline(
    pipeline_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    report_dir: str | Path | None = None,
    token: str | None = None,
    commit_message: str = "Upload d2nwg pipeline",
    revision: str | None = None,
) -> str:
    """Upload a saved pipeline folder plus a model card (and report plots if given); returns the repo URL.

    Args:
        revision: the branch to commit to; created from ``main`` when missing (``None``: ``main``).

    Raises:
        d2nwg.security.UnsafePathError: an entry of the folder links outside it (it would upload that file).
        ValueError: not a pipeline folder, no ``report.json`` in ``report_dir``, or a failed push.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from d2nwg.security import check_folder_links
    from d2nwg.utils.io import read_json

    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ValueError(f"{pipeline_dir} is not a saved pipeline (no model_index.json)")
    check_folder_links(pipeline_dir, "pipeline folder")
    report = None
    report_dir = Path(report_dir) if report_dir else None
    if report_dir is not None:
        if not (report_dir / "report.json").is_file():
            raise ValueError(f"no report.json in {report_dir}")
        check_folder_links(report_dir, "report folder")  # its plots are uploaded
        report = read_json(report_dir / "report.json", "evaluation report")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "repo"
        shutil.copytree(pipeline_dir, staged)
        if report_dir is not None:
            shutil.copy2(report_dir / "report.json", staged / "report.json")
            for png in report_dir.glob("*.png"):
                shutil.copy2(png, staged / png.name)
        (staged / "README.md").write_text(model_card(staged, repo_id, report))
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision not in (None, "main"):
                api.create_branch(url, branch=revision, exist_ok=True)
            api.upload_folder(repo_id=url, folder_path=staged, commit_message=commit_message, revision=revision)
        except HfHubHTTPError as err:
            raise ValueError(f"push to '{repo_id}' failed: {one_line(err)}") from None
        except OSError as err:
            raise ValueError(f"push to '{repo_id}' failed (no network?): {one_line(err)}") from None
    return f"{api.endpoint}/{repo_id}"
