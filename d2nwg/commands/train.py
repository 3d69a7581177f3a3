"""``d2nwg train``: the LightningCLI fit of `d2nwg.training.lightning_cli.train` with device flags."""

from __future__ import annotations

import argparse

from d2nwg.commands.options import FORMATTER, add_trust_flag, positive_int, positive_int_or_auto
from d2nwg.errors import UserError


# ----------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from d2nwg.training.lightning_cli import train

    from lightning.pytorch.utilities import rank_zero_only

    # Device flags go last so that they win over --set and the config.
    if args.strategy == "fsdp":  # before Lightning builds a trainer, whose own accelerator checks come first
        raise UserError("strategy fsdp is not supported yet (EMA and clipping need whole parameters); use --strategy ddp")
    devices = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes, "strategy": args.strategy}
    overrides = [*args.set, *(f"trainer.{k}={v}" for k, v in devices.items() if v is not None)]
    pipeline_dir = train(args.out, args.config, args.zoo, overrides, resume=args.resume, logger=args.logger)
    if rank_zero_only.rank == 0:  # every process of a multi-process run gets here; one line is enough
        print(f"pipeline: {pipeline_dir}")


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train the hyper-model (VAE, then diffusion)", formatter_class=FORMATTER)
    train.add_argument("--config", default=None, help="LightningCLI YAML, e.g. configs/digits.yaml (default: built-in digits settings)")
    train.add_argument("--out", required=True, help="run directory: logs, checkpoints/last.ckpt, pipeline/")
    train.add_argument("--zoo", default=None, help="zoo directory (overrides data.zoo of the config)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    train.add_argument("--logger", choices=["csv", "wandb"], default="csv", help="training logger")
    train.add_argument(
        "--devices", type=positive_int_or_auto, default=None, metavar="N",
        help="devices (GPUs, or CPU processes) per machine, or auto; more than one trains with data parallelism "
        "(default: the config's trainer.devices, else auto)",
    )
    train.add_argument("--num-nodes", type=positive_int, default=None, metavar="M", help="machines (default: 1)")
    train.add_argument(
        "--strategy", choices=["auto", "ddp", "fsdp"], default=None,
        help="auto: ddp on several devices; fsdp (sharding, for a denoiser too large for one device) is refused "
        "for now (README, Several GPUs)",
    )
    train.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default=None, help="device kind (default: auto)")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. model.diffusion_steps=100 or checkpoint.every_n_train_steps=50 "
        "(last.ckpt is also saved at the end of each stage, of fit, and on Ctrl-C/SIGTERM)",
    )
    add_trust_flag(train)
    train.set_defaults(func=cmd_train)
