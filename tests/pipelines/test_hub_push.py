"""Push a pipeline to a loopback Hub (CLI and `push_to_hub`), read the card, load and generate by repo id."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from d2nwg.commands import main
from d2nwg.evaluation.metrics import METRICS
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline

try:
    from tests.fixtures.hub_server import LoopbackHub
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from tests.fixtures.hub_server import LoopbackHub

pytestmark = pytest.mark.timeout(120)

STEPS = 3
SUMMARY = {"generated_best_acc": 0.91, "generated_mean_acc": 0.8, "zoo_mean_acc": 0.5, "num_tasks": 3}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Iterator[LoopbackHub]:
    """A loopback Hub with huggingface_hub pointed at it and a fresh, empty cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # repo ids must not resolve to local folders
    with LoopbackHub() as server, server.client_env():
        yield server


def repo_files(hub: LoopbackHub, repo_id: str) -> dict[str, bytes]:
    return hub.store.get("model", repo_id).snapshot("main")[1]


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n"), readme[:80]
    header = readme.split("---\n", 2)[1]
    data = yaml.safe_load(header)
    assert isinstance(data, dict)
    return data


def run_cli(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def sample(pipe: D2NWGPipeline, dataset) -> torch.Tensor:
    return pipe(dataset, num_samples=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).tokens


@pytest.fixture(scope="module")
def dataset(tiny_digits_zoo):
    task = tiny_digits_zoo.members("heldout")[0].task
    return tiny_digits_zoo.class_samples(task, "support")


def test_cli_push_card_and_load_by_repo_id(hub, tiny_pipeline_dir, dataset):
    code, stdout = run_cli(["push", "--pipeline", str(tiny_pipeline_dir), "--repo-id", "me/gen"])
    assert code == 0
    assert "me/gen" in stdout
    files = repo_files(hub, "me/gen")
    assert "model_index.json" in files
    assert "denoiser/diffusion_pytorch_model.safetensors" in files
    card = front_matter(files["README.md"].decode())
    assert card["library_name"] == "d2nwg"
    assert "d2nwg" in card["tags"]
    assert "model-index" not in card  # no report, no results
    # the uploaded files are the local ones, byte for byte
    for path in tiny_pipeline_dir.rglob("*"):
        if path.is_file():
            assert files[path.relative_to(tiny_pipeline_dir).as_posix()] == path.read_bytes()

    local = D2NWGPipeline.from_pretrained(tiny_pipeline_dir)
    remote = D2NWGPipeline.from_pretrained("me/gen")
    assert remote.config.target == local.config.target
    assert torch.equal(sample(remote, dataset), sample(local, dataset))
    # it came through the (fresh) cache
    cached = list((Path.cwd() / "hf-home" / "hub").glob("models--me--gen/snapshots/*/model_index.json"))
    assert len(cached) == 1


def test_push_to_hub_method(hub, tiny_pipeline, dataset):
    url = tiny_pipeline.push_to_hub("me/gen2")
    assert url.endswith("me/gen2")
    card = front_matter(repo_files(hub, "me/gen2")["README.md"].decode())
    assert card["library_name"] == "d2nwg" and "d2nwg" in card["tags"]
    remote = D2NWGPipeline.from_pretrained("me/gen2")
    assert torch.equal(sample(remote, dataset), sample(tiny_pipeline, dataset))


def test_generate_from_repo_id(hub, tiny_pipeline_dir, heldout_images, tmp_path):
    assert run_cli(["push", "--pipeline", str(tiny_pipeline_dir), "--repo-id", "me/gen"])[0] == 0
    outs = {}
    for name, source in (("local", str(tiny_pipeline_dir)), ("hub", "me/gen")):
        out = tmp_path / f"out-{name}"
        argv = ["generate", "--pipeline", source, "--dataset", str(heldout_images), "--num-samples", "2", "--out", str(out), "--steps", str(STEPS)]
        code, stdout = run_cli(argv)
        assert code == 0, stdout
        outs[name] = out
    assert json.loads((outs["hub"] / "config.json").read_text())["pipeline"] == "me/gen"
    for f in ("weights_000.safetensors", "weights_001.safetensors"):
        from safetensors.torch import load_file

        a, b = load_file(outs["local"] / f), load_file(outs["hub"] / f)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_card_with_report_has_eval_results(hub, tiny_pipeline_dir, tiny_pipeline, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"summary": SUMMARY}))
    code, _ = run_cli(["push", "--pipeline", str(tiny_pipeline_dir), "--repo-id", "me/gen-report", "--report", str(report)])
    assert code == 0
    files = repo_files(hub, "me/gen-report")
    assert json.loads(files["report.json"]) == {"summary": SUMMARY}
    readme = files["README.md"].decode()
    card = front_matter(readme)
    (entry,) = card["model-index"]
    values = {m["name"]: m["value"] for r in entry["results"] for m in r["metrics"]}
    labels = {m.summary_key: m.label for m in METRICS}
    assert values[labels["generated_best_acc"]] == pytest.approx(0.91)
    assert values[labels["zoo_mean_acc"]] == pytest.approx(0.5)
    assert labels["retrieval_acc"] not in values  # absent from the summary
    assert all(r["metrics"][0]["type"] == "accuracy" for r in entry["results"])
    assert "0.9100" in readme  # the results table

    tiny_pipeline.push_to_hub("me/gen-report2", report_dir=report)
    card2 = front_matter(repo_files(hub, "me/gen-report2")["README.md"].decode())
    assert "model-index" in card2


def test_push_without_report_json_is_a_user_error(hub, tiny_pipeline_dir, tmp_path, capsys):
    code = main(["push", "--pipeline", str(tiny_pipeline_dir), "--repo-id", "me/x", "--report", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "report.json" in err[0]
    with pytest.raises(Exception):
        repo_files(hub, "me/x")  # nothing was created


def test_unknown_repo_is_a_value_error(hub):
    with pytest.raises(ValueError, match="me/missing"):
        D2NWGPipeline.from_pretrained("me/missing")
