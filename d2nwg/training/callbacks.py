"""The Lightning callbacks of a d2nwg fit: export the pipeline, stop on a signal, save a checkpoint to resume from."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger

from d2nwg.models import ConditionAnchor
from d2nwg.pipelines.input_guard import zoo_statistics
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.targets.adapters.base_identity import base_identity
from d2nwg.training.datamodule import ZooDataModule
from d2nwg.training.lightning_module import D2NWGModule
from d2nwg.training.provenance import training_provenance
from d2nwg.utils.io import atomic_dir
from d2nwg.zoo.specs import TargetSpec


def pipeline_from_module(module: D2NWGModule, datamodule: ZooDataModule) -> D2NWGPipeline:
    """Assemble a sampling pipeline from a trained module (EMA weights) and its zoo."""
    vae, encoder, denoiser = module.export_networks()
    zoo = datamodule.zoo
    target = TargetSpec(
        architecture=zoo.architecture,
        layout=zoo.layout.to_dict(),
        num_classes=datamodule.num_classes,
        input=zoo.input_spec,
        zoo_recipe=(zoo.manifest.get("recipe") or {}).get("name", "custom"),
    )
    scheduler = module.make_sample_scheduler()
    # Generation takes a user's task gradient where the zoo's were taken (causal-LM zoos with gradient pooling).
    anchor = ConditionAnchor.for_zoo(zoo)
    pipe = D2NWGPipeline(
        vae=vae, dataset_encoder=encoder, denoiser=denoiser, scheduler=scheduler, target=target,
        head_solver=module.hparams.head_solver, conditional_mean=module.export_conditional_mean(), condition_anchor=anchor,
    )
    pipe.set_progress_bar_config(disable=True)
    # What `d2nwg generate` compares a user's dataset with: the training tasks' feature range and embeddings.
    tasks = list(dict.fromkeys(m.task for m in zoo.members(datamodule.hparams.split)))
    stats = zoo_statistics(
        pipe, [zoo.class_samples(t, "train") for t in tasks], raw_features=zoo.input_spec.kind in ("vector", "image")
    )
    # The base the adapters sit on (text targets), which `d2nwg generate --base` checks a replacement against.
    identity = base_identity(zoo.architecture)
    pipe.register_to_config(target=dataclasses.replace(target, data_stats=stats, base_identity=identity).to_dict())
    return pipe


def log_artifact(run, path: Path, name: str, kind: str) -> None:
    """Log a file or folder as a ``wandb.Artifact`` (``WandbLogger(log_model=True)`` refuses offline runs)."""
    import wandb

    artifact = wandb.Artifact(name, type=kind)
    if Path(path).is_dir():
        artifact.add_dir(str(path))
    else:
        artifact.add_file(str(path))
    run.log_artifact(artifact)


class ExportPipeline(L.Callback):
    """Saves the trained pipeline to ``dirpath`` (default ``<default_root_dir>/pipeline``) when fit ends
    (global rank zero only: one export, one ``training.json``, one wandb artifact per run)."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.exported = False  # by this process: a pipeline already on disk may be an earlier run's

    def path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "pipeline")

    def on_train_end(self, trainer: L.Trainer, pl_module: D2NWGModule) -> None:
        if trainer.global_step < pl_module.hparams.vae_steps + pl_module.hparams.diffusion_steps:
            return  # interrupted: last.ckpt resumes it
        self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: D2NWGModule) -> None:
        """Write the pipeline of ``pl_module`` (EMA weights) and its zoo; a no-op off global rank zero."""
        if not trainer.is_global_zero:
            self.exported = True
            return
        out = self.path(trainer)
        pipe = pipeline_from_module(pl_module, trainer.datamodule)
        pipe.register_to_config(provenance=training_provenance(trainer, pl_module, pipe))  # `d2nwg.training.provenance`
        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp)
            (tmp / "training.json").write_text(json.dumps({"global_step": trainer.global_step}, indent=2))
        self.exported = True
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_artifact(logger.experiment, out, name="d2nwg-pipeline", kind="model")


class StopRequest:
    """Set by the SIGINT/SIGTERM handlers that `train` installs; `ResumeCheckpoint` honours it between steps."""

    def __init__(self):
        self.signum: int | None = None
        self.active = False  # only a `stop_on_signals` block may stop training

    @property
    def requested(self) -> bool:
        """A signal arrived inside the running `stop_on_signals` block."""
        return self.active and self.signum is not None

    def __call__(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, keep the last saved checkpoint
        self.signum = signum


STOP = StopRequest()
"""The process's one stop request (signal handlers are per process)."""


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to `STOP` while the block runs (main thread only); restore the old handlers after."""
    STOP.signum = None
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    STOP.active = True
    try:
        for s in previous:
            signal.signal(s, STOP)
        yield STOP
    finally:
        # A stop request never outlives its block: a later fit in this process (tests, notebooks) runs in full.
        STOP.active = False
        for s, handler in previous.items():  # also undoes Lightning's SIG_IGN after a hard interrupt
            signal.signal(s, handler)


class ResumeCheckpoint(Checkpoint):
    """Keeps ``last.ckpt`` resumable: saved every ``every_n_train_steps`` steps, at the end of the VAE stage,
    at the last step (before `ExportPipeline` runs), at the end of fit, and at the end of the step during which SIGINT/SIGTERM asked to stop (then training
    stops). Writes go to a temp file renamed into place, so a kill mid-write leaves the previous one.

    Args:
        every_n_train_steps: steps between periodic saves (0: none; the stage and fit ends still save).
        dirpath: folder of ``last.ckpt``; default ``<trainer.default_root_dir>/checkpoints``.
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_train_steps: int = 100, dirpath: str | None = None):
        if every_n_train_steps < 0:
            raise ValueError(f"checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath
        self.saved_step: int | None = None
        self.saved_reason: str | None = None

    def path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.FILENAME

    def save(self, trainer: L.Trainer, reason: str) -> None:
        """Write ``last.ckpt`` for the current step (once per step)."""
        if self.saved_step == trainer.global_step:
            return
        path = self.path(trainer)
        tmp = path.with_name(f".{path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state: optimisers, loops, callbacks
        if trainer.is_global_zero:
            os.replace(tmp, path)
        self.saved_step, self.saved_reason = trainer.global_step, reason

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: D2NWGModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        # Under DDP a signal may reach one rank (or reach ranks a step apart): all stop at the same step if any asked.
        if trainer.strategy.reduce_boolean_decision(STOP.requested, all=False):
            self.save(trainer, "interrupted")
            trainer.should_stop = True
        elif step == pl_module.hparams.vae_steps:
            self.save(trainer, "end of the VAE stage")
        elif step == pl_module.hparams.vae_steps + pl_module.hparams.diffusion_steps:
            # Before the pipeline's export (Lightning runs checkpoint callbacks' hooks last): a run killed while
            # exporting resumes here and only exports again.
            self.save(trainer, "end of fit")
        elif self.every_n_train_steps and step % self.every_n_train_steps == 0:
            self.save(trainer, "periodic")

    def on_train_end(self, trainer: L.Trainer, pl_module: D2NWGModule) -> None:
        self.save(trainer, "end of fit")
