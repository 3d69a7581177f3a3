"""Checkpoints you can trust to resume (issue 12, item 4): kill training anywhere, resume, get the same pipeline.

Runs go through `d2nwg.commands.main` in-process. A patched ``training_step`` sends a real SIGINT (or SIGTERM)
to this process in the middle of a chosen step, or raises KeyboardInterrupt there (a second Ctrl-C).
Tolerance: the resumed run's pipeline must equal the uninterrupted run's **exactly** (``torch.equal``), since
the checkpoint carries the RNG state and the data loader's place in its epoch.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from d2nwg.commands import main
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.training.lightning_module import D2NWGModule

VAE_STEPS, DIFFUSION_STEPS, EVERY = 6, 6, 4
TINY = {
    "model.vae.hidden_dim": 16, "model.vae.latent_channels": 8, "model.encoder.dim": 16, "model.denoiser.dim": 16,
    "model.denoiser.depth": 1, "data.batch_size": 4, "trainer.enable_progress_bar": "false",
    "model.vae_steps": VAE_STEPS, "model.diffusion_steps": DIFFUSION_STEPS, "checkpoint.every_n_train_steps": EVERY,
}  # fmt: skip


def train(zoo: Path, out: Path, *extra: str) -> int:
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    return main(["train", "--zoo", str(zoo), "--out", str(out), *sets, *extra])


def interrupt_at(monkeypatch, step: int, how: str) -> None:
    """During the training step that starts at ``global_step == step``: send SIGINT/SIGTERM, or raise KeyboardInterrupt."""
    original = D2NWGModule.training_step

    def step_then_maybe_interrupt(self, batch, batch_idx):
        if self.global_step == step:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(D2NWGModule, "training_step", step_then_maybe_interrupt)


def checkpoint_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def pipeline_tensors(run: Path) -> dict[str, torch.Tensor]:
    pipe = D2NWGPipeline.from_pretrained(run / "pipeline")
    return {f"{n}.{k}": v for n in ("vae", "dataset_encoder", "denoiser") for k, v in getattr(pipe, n).state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_digits_zoo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "full"
    assert train(tiny_digits_zoo.root, run) == 0
    return run


def test_uninterrupted_run_leaves_a_checkpoint_of_its_last_step(uninterrupted):
    assert checkpoint_step(uninterrupted) == VAE_STEPS + DIFFUSION_STEPS
    assert json.loads((uninterrupted / "pipeline" / "training.json").read_text())["global_step"] == VAE_STEPS + DIFFUSION_STEPS
    assert not list((uninterrupted / "checkpoints").glob(".*"))  # no temp file left behind


def test_checkpoints_at_every_n_steps_and_at_the_end_of_the_vae_stage(tiny_digits_zoo, tmp_path, monkeypatch):
    from d2nwg.training.callbacks import ResumeCheckpoint

    saved: list[tuple[int, str]] = []
    original = ResumeCheckpoint.save

    def record(self, trainer, reason):
        before = self.saved_step
        original(self, trainer, reason)
        if self.saved_step != before:
            saved.append((checkpoint_step(tmp_path / "run"), reason))

    monkeypatch.setattr(ResumeCheckpoint, "save", record)
    assert train(tiny_digits_zoo.root, tmp_path / "run") == 0
    assert saved == [(4, "periodic"), (6, "end of the VAE stage"), (8, "periodic"), (12, "end of fit")]


def test_killed_while_exporting_resumes_by_exporting_only(tiny_digits_zoo, uninterrupted, tmp_path, monkeypatch, capsys):
    from d2nwg.training import callbacks

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        def killed(module, datamodule):
            raise KeyboardInterrupt  # e.g. Ctrl-C, or the OOM killer, while the pipeline is assembled

        patch.setattr(callbacks, "pipeline_from_module", killed)
        assert train(tiny_digits_zoo.root, run) == 130
    assert checkpoint_step(run) == VAE_STEPS + DIFFUSION_STEPS  # saved before the export started
    assert not (run / "pipeline").exists()
    capsys.readouterr()
    stale = run / "pipeline"  # an earlier run's pipeline in the same folder must not pass for this one's
    stale.mkdir()
    (stale / "model_index.json").write_text("{}")
    (stale / "training.json").write_text(json.dumps({"global_step": 5}))

    def no_training(self, batch, batch_idx):
        raise AssertionError("resuming from the last step must not train")

    monkeypatch.setattr(D2NWGModule, "training_step", no_training)
    assert train(tiny_digits_zoo.root, run, "--resume") == 0
    expected, resumed = pipeline_tensors(uninterrupted), pipeline_tensors(run)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)  # the EMA weights, not the raw ones
    assert json.loads((run / "pipeline" / "training.json").read_text())["global_step"] == VAE_STEPS + DIFFUSION_STEPS


@pytest.mark.parametrize(
    "step, how, saved_at",
    [
        pytest.param(1, "sigint", 2, id="sigint-before-first-periodic-save"),
        pytest.param(4, "sigint", 5, id="sigint-mid-vae", marks=pytest.mark.slow),
        pytest.param(8, "sigint", 9, id="sigint-mid-diffusion"),
        pytest.param(9, "sigterm", 10, id="sigterm-mid-diffusion", marks=pytest.mark.slow),
        pytest.param(10, "raise", 8, id="second-ctrl-c-mid-step-keeps-last-periodic-save", marks=pytest.mark.slow),
    ],
)
def test_kill_then_resume_gives_the_uninterrupted_pipeline(
    tiny_digits_zoo, uninterrupted, tmp_path, monkeypatch, capsys, step, how, saved_at
):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with monkeypatch.context() as patch:
        interrupt_at(patch, step, how)
        code = train(tiny_digits_zoo.root, run)
    assert code == (143 if how == "sigterm" else 130)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "--resume" in lines[0], err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert checkpoint_step(run) == saved_at
    assert not (run / "pipeline").exists()

    assert train(tiny_digits_zoo.root, run, "--resume") == 0
    assert checkpoint_step(run) == VAE_STEPS + DIFFUSION_STEPS
    expected, resumed = pipeline_tensors(uninterrupted), pipeline_tensors(run)
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
