"""An under-trained tiny pipeline (2 VAE + 2 diffusion steps) end to end (issue 15, items 2 and 3): the export records
where it came from, `from_pretrained` exposes it, and `generate`, `evaluate` and the model card say, in one line each
with the figures, that its weights are not to be trusted."""

from __future__ import annotations

import io
import json
import re
import statistics
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from d2nwg.commands import main
from d2nwg.evaluation.trust import COLLAPSE_RATIO, MIN_VAE_RECON_RATIO, flat_tokens, zoo_spacing
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.training.provenance import zoo_fingerprint

TINY = {
    "model.vae.hidden_dim": "16", "model.vae.latent_channels": "8", "model.encoder.dim": "16", "model.denoiser.dim": "16",
    "model.denoiser.depth": "1", "data.batch_size": "4", "trainer.enable_progress_bar": "false",
    "model.vae_steps": "2", "model.diffusion_steps": "2",
}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()  # module fixtures cannot use capsys
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def under_trained(tiny_digits_zoo, tmp_path_factory) -> Path:
    """``d2nwg train`` for 2 + 2 steps on the session zoo; returns the pipeline folder."""
    run = tmp_path_factory.mktemp("under_trained") / "run"
    argv = ["train", "--zoo", str(tiny_digits_zoo.root), "--out", str(run)]
    for key, value in TINY.items():
        argv += ["--set", f"{key}={value}"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    return run / "pipeline"


@pytest.fixture(scope="module")
def evaluated(under_trained, tiny_digits_zoo, tmp_path_factory) -> tuple[Path, int, str, str]:
    """``d2nwg evaluate`` with the decoded heads (an LDA head would hide the untrained body) and three cheap baselines."""
    out = tmp_path_factory.mktemp("eval") / "report"
    code, stdout, stderr = run_cli([
        "evaluate", "--pipeline", str(under_trained), "--zoo", str(tiny_digits_zoo.root), "--out", str(out),
        "--steps", "3", "--num-samples", "3", "--head-solver", "generated", "--baselines", "ncm", "zoo_mean", "prototype",
    ])
    return out, code, stdout, stderr


def test_provenance_is_recorded_and_exposed(under_trained, tiny_digits_zoo):
    pipe = D2NWGPipeline.from_pretrained(under_trained)
    prov = pipe.provenance
    assert prov == json.loads((under_trained / "model_index.json").read_text())["provenance"]
    assert prov["steps"] == {"vae": 2, "diffusion": 2}
    assert prov["d2nwg_version"] == __import__("d2nwg").__version__
    zoo = prov["zoo"]
    assert (zoo["name"], zoo["recipe"], zoo["members"], zoo["trained_on"]) == ("zoo", "digits", len(tiny_digits_zoo), 10)
    assert zoo["fingerprint"] == zoo_fingerprint(tiny_digits_zoo) and zoo["fingerprint"].startswith("sha256:")
    train_tokens = flat_tokens(tiny_digits_zoo.layout, tiny_digits_zoo.state_dicts("train"))
    assert zoo["nn_distance"] == pytest.approx(zoo_spacing(train_tokens)) and zoo["nn_distance"] > 0
    config = prov["config"]
    assert (config["model"]["vae_steps"], config["model"]["vae"]["hidden_dim"], config["data"]["batch_size"]) == (2, 16, 4)
    assert config["seed_everything"] == 0
    assert 0 < prov["vae_recon_ratio"] < MIN_VAE_RECON_RATIO  # 2 VAE steps: far from reconstructing members
    assert pipe.target_spec.base_identity is None  # digits: no base model


def test_zoo_fingerprint_changes_with_one_member(tiny_digits_zoo, tmp_path):
    import shutil

    from d2nwg.zoo.model_zoo import ModelZoo

    copy = ModelZoo.open(shutil.copytree(tiny_digits_zoo.root, tmp_path / "zoo"))
    assert zoo_fingerprint(copy) == zoo_fingerprint(tiny_digits_zoo)  # the path is not part of it
    member = copy.members("train")[0]
    data = bytearray((copy.root / member.file).read_bytes())
    data[-1] ^= 1  # flip one bit of the last weight
    (copy.root / member.file).write_bytes(bytes(data))
    assert zoo_fingerprint(copy) != zoo_fingerprint(tiny_digits_zoo)


def test_generate_warns_with_the_figures(under_trained, heldout_images, tmp_path):
    out = tmp_path / "gen"
    code, stdout, stderr = run_cli([
        "generate", "--pipeline", str(under_trained), "--dataset", str(heldout_images), "--select", "support",
        "--head-solver", "generated", "--steps", "3", "--out", str(out),
    ])
    assert code == 0, stderr
    found = warnings_of(stderr)
    assert len(found) == 3 and len(stderr.strip().splitlines()) == 3, stderr
    baseline, recon, collapse = found
    assert "does not beat the best cheap baseline" in baseline and "nearest class mean at" in baseline
    assert "held-back samples" in baseline
    assert re.search(rf"VAE reconstruction ratio 0\.\d{{3}} is below {MIN_VAE_RECON_RATIO}", recon), recon
    assert "samples collapsed on 1 of 1 task" in collapse and f"below {COLLAPSE_RATIO}" in collapse
    assert json.loads((out / "config.json").read_text())["warnings"] == [w.removeprefix("warning: ") for w in found]


def test_evaluate_prints_provenance_and_warns(evaluated):
    out, code, stdout, stderr = evaluated
    assert code == 0, stderr
    assert "pipeline provenance" in stdout and "VAE 2 + diffusion 2" in stdout and "sha256:" in stdout
    found = warnings_of(stderr)
    assert len(found) == 3, stderr
    baseline, recon, collapse = found
    assert "generated best" in baseline and "nearest class mean on raw features at" in baseline and "3 held-out task" in baseline
    assert "VAE reconstruction ratio" in recon and "samples collapsed on 3 of 3 task" in collapse
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == [w.removeprefix("warning: ") for w in found]
    assert report["provenance"]["steps"] == {"vae": 2, "diffusion": 2}
    per_task = [r["within_task_spread_ratio"] for r in report["per_task"]]
    assert report["summary"]["within_task_spread_ratio"] == pytest.approx(statistics.median(per_task))
    assert max(per_task) < COLLAPSE_RATIO
    markdown = (out / "report.md").read_text()
    assert "## Warnings" in markdown and "within-task spread ratio" in markdown and "VAE 2 + diffusion 2" in markdown


def test_model_card_shows_provenance_spread_and_warnings(evaluated, under_trained):
    from d2nwg.evaluation.model_card import model_card

    out, code, _, stderr = evaluated
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    card = model_card(under_trained, "me/under-trained", report)
    assert "## Trust checks" in card and "## Provenance" in card
    assert f"{report['summary']['within_task_spread_ratio']:.3f}" in card
    assert "training steps: VAE 2 + diffusion 2" in card and report["provenance"]["zoo"]["fingerprint"] in card
    assert all(w in card for w in report["warnings"])
    assert '"vae_steps": 2' in card  # the full training config
