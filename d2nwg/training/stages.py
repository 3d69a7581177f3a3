"""Training as two fits of one `D2NWGModule`, the VAE stage then the diffusion stage, sharing ``last.ckpt``.

One fit over both stages leaves one stage's networks idle in every step, which Lightning's default
``ddp`` strategy refuses (unused parameters). A fit per stage lets the module freeze the other stage's
networks before the strategy wraps it (`D2NWGModule.freeze_idle_stage`), so every step's graph uses
exactly the parameters DDP synchronises. The second fit resumes from the checkpoint that the first wrote
at the stage boundary (`d2nwg.training.callbacks.ResumeCheckpoint`); that resume is exact, so in one process
the two fits train bit for bit as the single fit did.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from d2nwg.training.callbacks import STOP, ResumeCheckpoint
from d2nwg.training.lightning_module import D2NWGModule


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` a Lightning checkpoint was saved at."""
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def fit_stages(
    trainer: L.Trainer,
    model: D2NWGModule,
    datamodule: L.LightningDataModule | None = None,
    ckpt_path: str | Path | None = None,
    **fit_kwargs,
) -> None:
    """Run the stages that remain, each as one ``trainer.fit``; the second resumes from the first's ``last.ckpt``.

    Args:
        trainer: a trainer with a `d2nwg.training.callbacks.ResumeCheckpoint` callback (it writes the hand-over
            checkpoint); its ``max_steps`` is set per stage.
        model: the module; its ``fit_stage`` is set per fit.
        datamodule: the zoo data.
        ckpt_path: a checkpoint to resume from, or None for a fresh run.
        **fit_kwargs: passed on to ``Trainer.fit`` (e.g. ``weights_only``).

    Returns when training is complete or was stopped (``trainer.global_step`` says where).

    Raises:
        ValueError: the trainer has no ``ResumeCheckpoint`` to hand the VAE stage over to the diffusion stage.
    """
    saver = next((c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint)), None)
    if saver is None:
        raise ValueError("fit_stages needs a ResumeCheckpoint callback: the diffusion stage resumes from its last.ckpt")
    vae_steps = model.hparams.vae_steps
    total = vae_steps + model.hparams.diffusion_steps
    start = checkpoint_step(ckpt_path) if ckpt_path is not None else 0
    if start < vae_steps:
        model.fit_stage, trainer.fit_loop.epoch_loop.max_steps = "vae", vae_steps
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **fit_kwargs)
        if trainer.global_step < vae_steps or trainer.should_stop or STOP.requested:
            return  # stopped early (a signal, a callback): last.ckpt resumes it
        ckpt_path = saver.path(trainer)
    model.fit_stage, trainer.fit_loop.epoch_loop.max_steps = "diffusion", total
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **fit_kwargs)
    finally:
        model.fit_stage = None
