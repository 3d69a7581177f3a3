"""Train the D2NWG hyper-model with LightningCLI.

    python train.py fit --config configs/digits.yaml --data.zoo runs/zoo --trainer.default_root_dir runs/train

The same run, plus evaluation-ready export to ``RUN/pipeline``, is ``d2nwg train``.
"""

from d2nwg.training.lightning_cli import make_cli

if __name__ == "__main__":
    make_cli()
