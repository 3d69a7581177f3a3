"""Hugging Face Hub I/O: push a pipeline with the model card its caller writes, and download one by repo id.

Tokens come from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``)
and are never printed. A custom ``DiffusionPipeline`` cannot be loaded straight
from a repo id, so `download_pipeline` runs ``snapshot_download`` first and the
pipeline loads from that folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from d2nwg.errors import one_line

CardWriter = Callable[[Path, str, Mapping | None], str]
"""``card(folder, repo_id, report) -> README.md text`` for the staged folder (pipeline plus report plots), the
repo id and the evaluation report (None without one): `d2nwg.evaluation.model_card.model_card`."""


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


def push_pipeline(
    pipeline_dir: str | Path,
    repo_id: str,
    *,
    card: CardWriter,
    private: bool = False,
    report_dir: str | Path | None = None,
    token: str | None = None,
    commit_message: str = "Upload d2nwg pipeline",
    revision: str | None = None,
) -> str:
    """Upload a saved pipeline folder plus a model card (and report plots if given); returns the repo URL.

    Args:
        card: writes the model card (``README.md``) from the staged folder, ``repo_id`` and the report
            (`CardWriter`; `d2nwg.evaluation.model_card.model_card` for d2nwg's own card).
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
        (staged / "README.md").write_text(card(staged, repo_id, report))
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
