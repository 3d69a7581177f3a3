"""Tiny end-to-end training: LightningCLI fit -> exported pipeline -> generation; and `d2nwg train --resume`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2nwg.commands import main
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.training.lightning_cli import make_cli
from d2nwg.training.lightning_module import D2NWGModule

TINY = {
    "model.vae.hidden_dim": "16",
    "model.vae.latent_channels": "8",
    "model.encoder.dim": "16",
    "model.denoiser.dim": "16",
    "model.denoiser.depth": "1",
    "data.batch_size": "4",
    "trainer.enable_progress_bar": "false",
}


def cli_args(**extra: str) -> list[str]:
    args = []
    for key, value in {**TINY, **extra}.items():
        args += [f"--{key}", value]
    return args


def set_args(**extra: str) -> list[str]:
    args = []
    for key, value in {**TINY, **extra}.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def trained_run(tiny_digits_zoo, tmp_path_factory):
    """One fit of 3 VAE + 3 diffusion steps; yields (run dir, cli)."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    args = ["--data.zoo", str(tiny_digits_zoo.root), *cli_args(**{"model.vae_steps": "3", "model.diffusion_steps": "3"})]
    cli = make_cli(args=args, run=False, out=str(out))
    cli.trainer.fit(cli.model, cli.datamodule)
    return out, cli


def test_fit_runs_both_stages(trained_run):
    out, cli = trained_run
    assert cli.trainer.max_steps == 6
    assert cli.trainer.global_step == 6
    module = cli.model
    assert isinstance(module, D2NWGModule)
    # the diffusion stage ran: the VAE is frozen and the latent scale was fitted
    assert not any(p.requires_grad for p in module.vae.parameters())
    assert module.latent_scale.item() != 1.0
    assert json.loads((out / "pipeline" / "training.json").read_text())["global_step"] == 6


def test_exported_pipeline_loads_generates_and_injects(trained_run, tiny_digits_zoo):
    out, cli = trained_run
    pipe = D2NWGPipeline.from_pretrained(out / "pipeline")
    assert pipe.num_classes == 5
    assert pipe.vae.config.hidden_dim == 16 and pipe.vae.config.latent_channels == 8
    assert pipe.dataset_encoder.config.dim == 16 and pipe.denoiser.config.depth == 1
    assert pipe.vae.config.scaling_factor == pytest.approx(cli.model.latent_scale.item())
    assert pipe.scheduler.config.clip_sample is False
    task = tiny_digits_zoo.members("heldout")[0].task
    dataset = tiny_digits_zoo.class_samples(task, "support")
    result = pipe(dataset, num_samples=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert len(result.weights) == 2
    model = pipe.build_model(result.weights[0])
    x, _ = tiny_digits_zoo.task_data(task, "test")
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(x), 5)
    assert torch.isfinite(logits).all()
    # the pipeline carries the zoo's target
    assert pipe.config.target["architecture"] == tiny_digits_zoo.architecture
    assert pipe.config.target["layout"] == tiny_digits_zoo.layout.to_dict()


def test_last_checkpoint_loads_with_weights_only(trained_run):
    out, _ = trained_run
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert "ema" in state
    assert any(k.startswith("denoiser.") for k in state["state_dict"])
    assert "latent_scale" in state["state_dict"]


def run_train(zoo: Path, out: Path, vae_steps: int, diffusion_steps: int, *extra: str) -> int:
    steps = {"model.vae_steps": str(vae_steps), "model.diffusion_steps": str(diffusion_steps)}
    argv = ["train", "--config", "configs/digits.yaml", "--zoo", str(zoo), "--out", str(out), *set_args(**steps), *extra]
    return main(argv)


def test_cli_train_then_resume_with_more_steps(tiny_digits_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # configs/ is relative to the repo root
    run = tmp_path / "run"
    assert run_train(tiny_digits_zoo.root, run, 2, 2) == 0
    assert f"pipeline: {run / 'pipeline'}" in capsys.readouterr().out
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    assert json.loads((run / "pipeline" / "training.json").read_text())["global_step"] == 4
    first = D2NWGPipeline.from_pretrained(run / "pipeline")

    assert run_train(tiny_digits_zoo.root, run, 2, 5, "--resume") == 0
    assert torch.load(ckpt, weights_only=True)["global_step"] == 7
    assert json.loads((run / "pipeline" / "training.json").read_text())["global_step"] == 7
    resumed = D2NWGPipeline.from_pretrained(run / "pipeline")
    # the VAE trained only in steps 0-1 and was not retrained: same weights and latent scale
    for (name, a), (_, b) in zip(first.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.vae.config.scaling_factor == first.vae.config.scaling_factor
    # the diffusion networks kept training
    assert any(not torch.equal(a, b) for a, b in zip(first.denoiser.parameters(), resumed.denoiser.parameters()))


def test_cli_resume_without_checkpoint_is_a_user_error(tiny_digits_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    code = run_train(tiny_digits_zoo.root, tmp_path / "fresh", 1, 1, "--resume")
    assert code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "last.ckpt" in error_lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "fresh" / "pipeline").exists()


def test_cli_train_missing_config_is_a_user_error(tmp_path, capsys):
    code = main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope.yaml" in err[0]


def test_function_space_loss_is_zero_for_exact_reconstruction_and_trains_the_decoder(trained_run):
    """The VAE's KL term compares the member's predictions with the reconstruction's on the member's samples."""
    _, cli = trained_run
    module = cli.model
    dm = cli.datamodule
    index, tokens, samples = next(iter(dm.train_dataloader()))
    forward = module.vae.forward
    try:
        module.vae.forward = lambda t: (t, torch.zeros(1), torch.zeros(1))  # a perfect reconstruction
        assert module.vae_loss(tokens, samples)["function_kl"].item() == pytest.approx(0.0, abs=1e-6)
        noise = torch.randn_like(tokens)
        module.vae.forward = lambda t: (t + noise, torch.zeros(1), torch.zeros(1))
        assert module.vae_loss(tokens, samples)["function_kl"].item() > 1e-3
        # function_samples=1 runs members on each class's first drawn sample only
        module.vae_settings.function_samples = 1
        changed = samples.clone()
        changed[:, :, 1:] = torch.rand_like(changed[:, :, 1:])
        assert torch.equal(module.vae_loss(tokens, samples)["function_kl"], module.vae_loss(tokens, changed)["function_kl"])
        changed[:, :, 0] = torch.rand_like(changed[:, :, 0])
        assert not torch.equal(module.vae_loss(tokens, samples)["function_kl"], module.vae_loss(tokens, changed)["function_kl"])
    finally:
        module.vae.forward = forward
        module.vae_settings.function_samples = 0
    # the term reaches the decoder's parameters
    module.vae.train().requires_grad_(True)
    try:
        module.vae.zero_grad()
        module.vae_loss(tokens, samples)["function_kl"].backward()
        assert module.vae.decoder.proj_out.weight.grad.abs().sum() > 0
    finally:
        module.vae.eval().requires_grad_(False)
        module.vae.zero_grad()


def test_resume_with_networks_of_another_shape_is_a_user_error(tiny_digits_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    run = tmp_path / "run"
    assert run_train(tiny_digits_zoo.root, run, 1, 1) == 0
    capsys.readouterr()
    from model_zoo import RECIPES
    from tests.conftest import TINY_DIGITS

    other = RECIPES.get("digits")(tmp_path / "other", **{**TINY_DIGITS, "hidden": 8})  # members of another shape
    code = run_train(other.root, run, 1, 2, "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: --resume:") and "another shape" in line]
