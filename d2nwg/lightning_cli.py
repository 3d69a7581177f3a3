"""The LightningCLI entry of training (``train.py`` and ``d2nwg train`` both use it)."""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from d2nwg.datamodule import ZooDataModule
from d2nwg.errors import UserError
from d2nwg.io import atomic_dir
from d2nwg.pipeline import D2NWGPipeline
from d2nwg.specs import TargetSpec
from d2nwg.training import D2NWGModule


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
    pipe = D2NWGPipeline(
        vae=vae, dataset_encoder=encoder, denoiser=denoiser, scheduler=scheduler, target=target,
        head_solver=module.hparams.head_solver,
    )
    pipe.set_progress_bar_config(disable=True)
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
    """Saves the trained pipeline to ``dirpath`` (default ``<default_root_dir>/pipeline``) when fit ends."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: D2NWGModule) -> None:
        if trainer.global_step < pl_module.hparams.vae_steps + pl_module.hparams.diffusion_steps:
            return  # interrupted: last.ckpt resumes it
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "pipeline")
        pipe = pipeline_from_module(pl_module, trainer.datamodule)
        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp)
            (tmp / "training.json").write_text(json.dumps({"global_step": trainer.global_step}, indent=2))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_artifact(logger.experiment, out, name="d2nwg-pipeline", kind="model")


class D2NWGCLI(LightningCLI):
    """LightningCLI whose ``trainer.max_steps`` follows the two stages of the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.vae_steps", "model.diffusion_steps"), "trainer.max_steps", compute_fn=lambda a, b: a + b
        )


def make_cli(
    args: list[str] | dict | None = None, run: bool = True, out: str | None = None, logger: str = "csv"
) -> D2NWGCLI:
    """Build the CLI; ``out`` sets the run directory (logs, checkpoints, pipeline).

    ``logger="wandb"`` adds a ``WandbLogger`` next to the CSV logs (``WANDB_MODE=offline`` needs no
    account) and logs the exported pipeline as a ``wandb.Artifact``.
    """
    trainer_defaults = {
        "callbacks": [
            ModelCheckpoint(
                dirpath=f"{out}/checkpoints" if out else None, save_last=True, every_n_train_steps=500, save_top_k=0
            ),
            ExportPipeline(),
        ],
        "enable_model_summary": False,
        "log_every_n_steps": 10,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    if out is not None:
        trainer_defaults["default_root_dir"] = out
        loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": out, "name": "logs"}}]
        if logger == "wandb":
            loggers.append(
                {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": out, "project": "d2nwg"}}
            )
        trainer_defaults["logger"] = loggers
    elif logger != "csv":
        raise ValueError("a wandb logger needs a run directory (out)")
    # Known-harmless notices: checkpoints of a manually optimised module hold the post-step state,
    # which is what resuming needs.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # Small zoos have fewer batches per epoch than the logging interval; logging counts steps across epochs.
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    if args is not None:  # d2nwg's own sys.argv is not meant for LightningCLI
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
    return D2NWGCLI(
        D2NWGModule,
        ZooDataModule,
        trainer_defaults=trainer_defaults,
        seed_everything_default=0,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": run},
    )


def train_args(config: str | None, zoo: str | None, overrides: Sequence[str]) -> list[str]:
    """LightningCLI arguments for one `d2nwg train` run.

    Args:
        config: a LightningCLI YAML file, or None for the built-in defaults.
        zoo: a zoo directory that replaces the config's ``data.zoo``, or None.
        overrides: ``KEY=VALUE`` items such as ``model.diffusion_steps=100``.

    Returns:
        ``["--config", config, "--data.zoo", zoo, "--KEY", "VALUE", ...]``.

    Raises:
        UserError: an override without ``=``.
    """
    args = ["--config", config] if config else []
    if zoo:
        args += ["--data.zoo", zoo]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        args += [f"--{key}", value]
    return args


def train(
    out: str | Path,
    config: str | None = None,
    zoo: str | None = None,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    logger: str = "csv",
    progress_bar: bool = True,
) -> Path:
    """Train the hyper-model (VAE, then diffusion) into the run directory ``out``.

    Args:
        out: run directory; gets ``logs/``, ``checkpoints/last.ckpt`` and, when training completes, ``pipeline/``.
        config: LightningCLI YAML (e.g. ``configs/digits.yaml``); None: the built-in digits settings.
        zoo: zoo directory that replaces the config's ``data.zoo``.
        overrides: ``KEY=VALUE`` config overrides, e.g. ``model.diffusion_steps=100``.
        resume: continue from ``out/checkpoints/last.ckpt``.
        logger: ``"csv"``, or ``"wandb"`` for a ``WandbLogger`` next to the CSV logs.
        progress_bar: show Lightning's progress bar.

    Returns:
        The pipeline folder ``out/pipeline``.

    Raises:
        UserError: a missing config file, an invalid configuration or override, or ``resume`` without a checkpoint.

    Example:
        >>> pipeline_dir = train("runs/train", "configs/digits.yaml", zoo="runs/zoo")  # doctest: +SKIP
    """
    out = Path(out)
    if config and not Path(config).is_file():
        raise UserError(f"config file not found: {config}")
    args = train_args(config, zoo, overrides)
    if not progress_bar:
        args += ["--trainer.enable_progress_bar", "false"]
    try:
        cli = make_cli(args, run=False, out=str(out), logger=logger)
    except argparse.ArgumentError as err:
        raise UserError(f"invalid training configuration: {err}") from None
    ckpt = out / "checkpoints" / "last.ckpt"
    if resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt}")
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(ckpt) if resume else None)
    return out / "pipeline"
