"""``--revision`` on commands that take a Hub repo id: the commit used is printed and recorded, also when an
offline run falls back to the cache. Against the loopback Hub of the tests."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.security.hostile import assert_one_error, run_cli

pytestmark = pytest.mark.timeout(120)
STEPS = ["--steps", "2", "--num-samples", "2"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback Hub with huggingface_hub pointed at it and a fresh cache; repo ids never resolve locally."""
    from huggingface_hub import constants

    from tests.fixtures.hub_server import LoopbackHub

    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with LoopbackHub() as server, server.client_env():
        yield server


@pytest.fixture
def two_commits(hub, tmp_path, tiny_digits_zoo, tiny_pipeline_dir, make_tiny_pipeline, capsys):
    """``me/gen`` with two pushes: the session pipeline, then another seed's; returns their commit shas."""
    assert run_cli(["push", "--pipeline", tiny_pipeline_dir, "--repo-id", "me/gen"], capsys)[0] == 0
    first = hub.store.get("model", "me/gen").refs["main"]
    other = tmp_path / "other"
    make_tiny_pipeline(tiny_digits_zoo, seed=1).save_pretrained(other)
    assert run_cli(["push", "--pipeline", other, "--repo-id", "me/gen"], capsys)[0] == 0
    return first, hub.store.get("model", "me/gen").refs["main"]


def generate(source, images, out, capsys, *extra):
    code, stdout, err = run_cli(["generate", "--pipeline", source, "--dataset", images, "--out", out, *STEPS, *extra], capsys)
    assert code == 0, err
    return stdout, json.loads((out / "config.json").read_text())["pipeline_hub"]


def test_revision_picks_the_commit_and_records_it(two_commits, tiny_pipeline_dir, heldout_images, tmp_path, capsys):
    first, second = two_commits
    stdout, record = generate("me/gen", heldout_images, tmp_path / "latest", capsys)
    assert record == {"repo_id": "me/gen", "revision": None, "commit": second, "cached": False}
    assert f"me/gen at commit {second}" in stdout
    stdout, record = generate("me/gen", heldout_images, tmp_path / "old", capsys, "--revision", first)
    assert record["commit"] == first and f"at commit {first}" in stdout
    generate(tiny_pipeline_dir, heldout_images, tmp_path / "local", capsys)
    a, b = load_file(tmp_path / "old" / "weights_000.safetensors"), load_file(tmp_path / "local" / "weights_000.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the first commit is the session pipeline, bit for bit
    c = load_file(tmp_path / "latest" / "weights_000.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unreachable_hub_falls_back_to_the_cache_and_says_so(two_commits, hub, heldout_images, tmp_path, capsys):
    _, second = two_commits
    generate("me/gen", heldout_images, tmp_path / "online", capsys)
    from huggingface_hub.utils import _http

    hub.stop()  # the Hub is gone (and the client's kept-alive connection with it): the cache is used
    _http.close_session()
    stdout, record = generate("me/gen", heldout_images, tmp_path / "offline", capsys)
    assert f"using cached snapshot {second}" in stdout
    assert record == {"repo_id": "me/gen", "revision": None, "commit": second, "cached": True}


def test_hf_hub_offline_uses_the_cache_and_says_so(two_commits, heldout_images, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    _, second = two_commits
    generate("me/gen", heldout_images, tmp_path / "online", capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    stdout, record = generate("me/gen", heldout_images, tmp_path / "offline", capsys)
    assert f"using cached snapshot {second}" in stdout and record["cached"] is True


def test_unknown_revision_and_revision_of_a_local_folder_are_one_line(
    two_commits, tiny_pipeline_dir, tiny_digits_zoo, heldout_images, tmp_path, capsys
):
    out = tmp_path / "g"
    code, _, err = run_cli(["generate", "--pipeline", "me/gen", "--revision", "nope", "--dataset", heldout_images, "--out", out], capsys)
    assert_one_error(code, err, "has no revision 'nope'")
    code, _, err = run_cli(["evaluate", "--pipeline", tiny_pipeline_dir, "--revision", "main", "--zoo", tiny_digits_zoo.root, "--out", out], capsys)
    assert_one_error(code, err, "--revision applies to Hub repo ids")
    assert not out.exists()


def test_push_to_a_branch_leaves_main_alone(two_commits, hub, tiny_pipeline_dir, capsys):
    _, second = two_commits
    code, _, err = run_cli(["push", "--pipeline", tiny_pipeline_dir, "--repo-id", "me/gen", "--revision", "dev"], capsys)
    assert code == 0, err
    repo = hub.store.get("model", "me/gen")
    assert repo.refs["main"] == second and repo.refs["dev"] != second
    assert repo.commits[repo.refs["dev"]]["model_index.json"] == (tiny_pipeline_dir / "model_index.json").read_bytes()
