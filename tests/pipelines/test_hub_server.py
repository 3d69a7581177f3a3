"""End-to-end check of the loopback Hub with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

try:
    from tests.fixtures.hub_server import LoopbackHub
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from tests.fixtures.hub_server import LoopbackHub

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hub() -> Iterator[LoopbackHub]:
    """A running loopback Hub with huggingface_hub pointed at it (even under HF_HUB_OFFLINE=1)."""
    with LoopbackHub() as server, server.client_env():
        yield server


def _make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"hidden": 8, "name": "tiny"}).encode(),
        "weights/model.bin": bytes(range(256)) * 8 + b"\x00\xff",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_round_trip(hub: LoopbackHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    api = HfApi(endpoint=hub.url, token="hf_dummy_token")
    url = api.create_repo("loopback/tiny", exist_ok=True, private=True)
    assert url.repo_id == "loopback/tiny"
    assert api.create_repo("loopback/tiny", exist_ok=True).repo_id == "loopback/tiny"

    src = tmp_path / "src"
    files = _make_folder(src)
    info = api.upload_folder(repo_id="loopback/tiny", folder_path=src, commit_message="add files")
    assert len(info.oid) == 40

    assert sorted(api.list_repo_files("loopback/tiny")) == sorted(files)
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree("loopback/tiny")}
    assert top == {("RepoFile", "config.json"), ("RepoFile", "empty.txt"), ("RepoFolder", "weights")}
    (entry,) = api.get_paths_info("loopback/tiny", ["weights/model.bin"])
    assert entry.size == len(files["weights/model.bin"])
    model = api.model_info("loopback/tiny")
    assert model.sha == info.oid and model.private is True
    assert sorted(s.rfilename for s in model.siblings or []) == sorted(files)

    out = snapshot_download("loopback/tiny", cache_dir=tmp_path / "cache", endpoint=hub.url, token="hf_dummy_token")
    assert Path(out).name == info.oid
    for rel, data in files.items():
        assert (Path(out) / rel).read_bytes() == data
    # Same call relying only on the patched constants (no endpoint=), into a fresh cache.
    out2 = snapshot_download("loopback/tiny", cache_dir=tmp_path / "cache2")
    assert (Path(out2) / "weights/model.bin").read_bytes() == files["weights/model.bin"]

    # Second commit: upload_file + delete_file; old revision stays downloadable.
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="config.json", repo_id="loopback/tiny")
    api.delete_file("empty.txt", repo_id="loopback/tiny")
    assert sorted(api.list_repo_files("loopback/tiny")) == ["config.json", "weights/model.bin"]
    new = hf_hub_download("loopback/tiny", "config.json", cache_dir=tmp_path / "cache", endpoint=hub.url)
    assert Path(new).read_bytes() == b"v2"
    old = hf_hub_download("loopback/tiny", "config.json", revision=info.oid, cache_dir=tmp_path / "c3")
    assert Path(old).read_bytes() == files["config.json"]


def test_missing_repo_and_file(hub: LoopbackHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("nobody/missing", cache_dir=tmp_path / "c", endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/missing", "x.json", cache_dir=tmp_path / "c", endpoint=hub.url)
    assert HfApi(endpoint=hub.url).repo_exists("nobody/missing") is False

    hub.store.put("seeded/repo", {"a.txt": b"hello"})
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("seeded/repo", "nope.txt", cache_dir=tmp_path / "c", endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("seeded/repo", "a.txt", revision="no-branch", cache_dir=tmp_path / "c", endpoint=hub.url)
    path = hf_hub_download("seeded/repo", "a.txt", cache_dir=tmp_path / "c", endpoint=hub.url)
    assert Path(path).read_bytes() == b"hello"


def test_subprocess_client(tmp_path: Path) -> None:
    """A child process configured only through ``LoopbackHub.env()`` (HF_ENDPOINT read at import)."""
    with LoopbackHub() as hub:
        hub.store.put("sub/repo", {"w.bin": b"\x01\x02\x03"})
        code = (
            "import sys; from huggingface_hub import snapshot_download; "
            "p = snapshot_download('sub/repo', cache_dir=sys.argv[1]); "
            "print(open(p + '/w.bin', 'rb').read().hex())"
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **hub.env()}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=90
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "010203"
