"""The LightningCLI entry of training (``train.py`` and ``d2nwg train`` both use it).

Checkpoints you can resume from: `ResumeCheckpoint` keeps ``RUN/checkpoints/last.ckpt``
current every ``checkpoint.every_n_train_steps`` steps (default 100; ``--set
checkpoint.every_n_train_steps=N`` or ``checkpoint:`` in a config), at the end of the VAE
stage, at the last step (before the pipeline's export, so a run killed while exporting
resumes by exporting only) and when SIGINT (Ctrl-C) or SIGTERM asks training to stop:
`train` turns those signals into a request that the callback honours at the end of the
current step (saving, then stopping), so a checkpoint never holds half a step. A second
Ctrl-C aborts at once (the last saved checkpoint stays valid: every write is a temp file
renamed into place). `train` then raises `d2nwg.errors.Interrupted` (the CLI prints one
line and exits 130, or 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from d2nwg.errors import Interrupted, UserError
from d2nwg.training.callbacks import ExportPipeline, ResumeCheckpoint, stop_on_signals
from d2nwg.training.datamodule import ZooDataModule
from d2nwg.training.lightning_module import D2NWGModule
from d2nwg.training.stages import fit_stages


class D2NWGCLI(LightningCLI):
    """LightningCLI whose ``trainer.max_steps`` follows the two stages of the model, with a `ResumeCheckpoint`
    configured under ``checkpoint``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.vae_steps", "model.diffusion_steps"), "trainer.max_steps", compute_fn=lambda a, b: a + b
        )
        parser.add_lightning_class_args(ResumeCheckpoint, "checkpoint")

    def fit(self, model: D2NWGModule, datamodule: ZooDataModule | None = None, ckpt_path: str | None = None, **kwargs) -> None:
        """The ``fit`` subcommand: one fit per stage (`d2nwg.training.stages.fit_stages`), so it also runs under DDP."""
        fit_stages(self.trainer, model, datamodule, ckpt_path=ckpt_path, **{k: v for k, v in kwargs.items() if v is not None})


def make_cli(
    args: list[str] | dict | None = None, run: bool = True, out: str | None = None, logger: str = "csv"
) -> D2NWGCLI:
    """Build the CLI; ``out`` sets the run directory (logs, checkpoints, pipeline).

    ``logger="wandb"`` adds a ``WandbLogger`` next to the CSV logs (``WANDB_MODE=offline`` needs no
    account) and logs the exported pipeline as a ``wandb.Artifact``.
    """
    trainer_defaults = {
        "callbacks": [ExportPipeline()],  # `ResumeCheckpoint` comes from the ``checkpoint`` section
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
    # Lightning warns that a SIGINT/SIGTERM-requested stop happened before min_steps; not an error here.
    warnings.filterwarnings("ignore", message=".*Trainer was signaled to stop.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # Lightning's all_gather (the VAE latents, gathered across DDP ranks) calls a torch function torch now deprecates.
    warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated.*")
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
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        cli = make_cli(args, run=False, out=str(out), logger=logger)
    except argparse.ArgumentError as err:
        # jsonargparse puts the reason ("Expected a <class int>...") on later lines: keep it on the one line.
        raise UserError(f"invalid training configuration: {' '.join(str(err).split())}") from None
    except MisconfigurationException as err:  # e.g. --accelerator gpu on a machine without one
        raise UserError(f"invalid trainer settings: {' '.join(str(err).split())}") from None
    ckpt = out / "checkpoints" / "last.ckpt"
    if resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt}")
    trainer = cli.trainer
    total = cli.model.hparams.vae_steps + cli.model.hparams.diffusion_steps
    with stop_on_signals() as stop:
        try:
            fit_stages(trainer, cli.model, cli.datamodule, ckpt_path=str(ckpt) if resume else None, weights_only=True)
        except RuntimeError as err:
            if resume and "Error(s) in loading state_dict" in str(err):  # a checkpoint of other networks
                raise UserError(
                    f"--resume: {ckpt} holds networks of another shape (a run on another zoo or config?): "
                    f"{' '.join(str(err).split())[:300]}"
                ) from None
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            # Lightning turns a KeyboardInterrupt into sys.exit(1) and SIGTERM into SIGTERMException.
            if isinstance(err, SystemExit) and stop.signum is None and trainer.state.status.value != "interrupted":
                raise
            raise Interrupted(_interrupted_message(trainer, ckpt), stop.signum or signal.SIGINT) from None
    if stop.signum is not None and trainer.global_step < total:
        raise Interrupted(_interrupted_message(trainer, ckpt), stop.signum)
    export = next((c for c in trainer.callbacks if isinstance(c, ExportPipeline)), ExportPipeline())
    if trainer.global_step >= total and not export.exported:
        # Resumed from the last step (a run killed while exporting): Lightning skips a fit with nothing left to
        # train, and with it the callbacks' `on_train_end`, so export here (replacing any earlier pipeline).
        export.export(trainer, cli.model)
    return export.path(trainer)


def _interrupted_message(trainer: L.Trainer, ckpt: Path) -> str:
    """One line: where the run stopped and what resumes it."""
    saved = next((c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint)), None)
    if ckpt.is_file():
        import torch

        step = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")
        where = f"step {step}" if saved is None or saved.saved_step is None else f"step {saved.saved_step}"
        return f"training stopped at step {trainer.global_step}; {ckpt} holds {where}: continue with --resume"
    return f"training stopped at step {trainer.global_step} before any checkpoint was saved"
