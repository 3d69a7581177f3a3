"""Every YAML in configs/ parses with the LightningCLI parser and instantiates without training."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from d2nwg.training.datamodule import ZooDataModule
from d2nwg.training.lightning_cli import make_cli
from d2nwg.training.lightning_module import D2NWGModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml"))


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML files"


def _nested(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_instantiates(config, tiny_digits_zoo, tmp_path):
    raw = yaml.safe_load(config.read_text())
    assert isinstance(raw, dict)
    try:
        cli = make_cli(args=["--config", str(config), "--data.zoo", str(tiny_digits_zoo.root)], run=False, out=str(tmp_path))
    except SystemExit as err:  # jsonargparse reports unknown or mistyped keys by exiting
        pytest.fail(f"{config.name} does not parse: exit {err.code}")
    assert isinstance(cli.model, D2NWGModule)
    assert isinstance(cli.datamodule, ZooDataModule)
    hp = cli.model.hparams
    assert cli.trainer.max_steps == hp.vae_steps + hp.diffusion_steps
    # every value the file sets reaches the objects (data.zoo is overridden by the test)
    for key, value in _leaves(raw):
        section, _, rest = key.partition(".")
        if key == "data.zoo":
            continue
        if section == "model":
            got = hp
            for part in rest.split("."):
                got = got[part] if isinstance(got, dict) else getattr(got, part)
            assert got == value, key
        elif section == "data":
            assert cli.datamodule.hparams[rest] == value, key
        elif section == "trainer" and not isinstance(value, (dict, list)):
            assert getattr(cli.trainer, rest, value) == value, key
    assert not (tmp_path / "pipeline").exists()  # nothing was trained


def test_step_overrides_drive_max_steps(tiny_digits_zoo, tmp_path):
    config = CONFIGS[0]
    args = ["--config", str(config), "--data.zoo", str(tiny_digits_zoo.root), "--model.vae_steps", "7", "--model.diffusion_steps", "5"]
    cli = make_cli(args=args, run=False, out=str(tmp_path))
    assert cli.trainer.max_steps == 12
    assert cli.model.hparams.vae_steps == 7


def test_unknown_key_is_rejected(tiny_digits_zoo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  no_such_setting: 3\n")
    with pytest.raises(argparse.ArgumentError, match="no_such_setting"):
        make_cli(args=["--config", str(bad), "--data.zoo", str(tiny_digits_zoo.root)], run=False, out=str(tmp_path / "run"))


def test_cli_reports_a_bad_override_in_one_line(tiny_digits_zoo, tmp_path, capsys):
    from d2nwg.commands import main

    code = main(["train", "--zoo", str(tiny_digits_zoo.root), "--out", str(tmp_path / "run"), "--set", "model.nope=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]
