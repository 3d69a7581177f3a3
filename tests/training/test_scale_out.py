"""Scale-out pieces that need no second process (issue 14): lazy member tokens, token bytes, device flags, rank-zero export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from d2nwg.commands import main
from d2nwg.training.callbacks import ExportPipeline
from d2nwg.training.datamodule import ZooDataModule
from d2nwg.zoo.streamed_tokens import MemberTokens


def test_member_tokens_equal_the_in_memory_tokens_bit_for_bit(tiny_digits_zoo):
    zoo = tiny_digits_zoo
    members = zoo.members("train")
    lazy, eager = MemberTokens(zoo, members), zoo.tokens("train")
    assert lazy.shape == tuple(eager.shape) and lazy.nbytes == eager.numel() * 4
    assert torch.equal(lazy[3], eager[3]) and torch.equal(lazy[2:7], eager[2:7])
    assert torch.allclose(lazy.sum(1, 5), eager[1:5].double().sum(0))


@pytest.mark.parametrize("limit_mb, lazy", [(0, True), (1024, False)])
def test_datamodule_reads_members_from_disk_above_its_memory_limit(tiny_digits_zoo, limit_mb, lazy):
    dm = ZooDataModule(str(tiny_digits_zoo.root), batch_size=4, memory_limit_mb=limit_mb)
    assert isinstance(dm.tokens, MemberTokens) is lazy
    index, tokens, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(tokens, tiny_digits_zoo.tokens("train")[index])


def test_zoo_info_says_how_many_bytes_of_tokens_the_zoo_holds(tiny_digits_zoo, capsys):
    assert main(["zoo", "info", str(tiny_digits_zoo.root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    layout = tiny_digits_zoo.layout
    assert summary["token_bytes"] == len(tiny_digits_zoo) * layout.num_tokens * layout.chunk_size * 4
    assert sum(summary["token_bytes_by_split"].values()) == summary["token_bytes"]
    assert main(["zoo", "info", str(tiny_digits_zoo.root)]) == 0
    assert "token bytes" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--devices", "0"), ("--devices", "two"), ("--num-nodes", "0"), ("--strategy", "deepspeed")])
def test_bad_device_flags_are_one_usage_error(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("d2nwg train: error:")]


def test_only_rank_zero_exports(tmp_path):
    trainer = SimpleNamespace(global_step=4, is_global_zero=False, default_root_dir=str(tmp_path), loggers=[])
    module = SimpleNamespace(hparams=SimpleNamespace(vae_steps=2, diffusion_steps=2))
    ExportPipeline().on_train_end(trainer, module)  # would fail on the fake module if it tried to export
    assert not (tmp_path / "pipeline").exists()


@pytest.mark.parametrize(
    "flags, message",
    [(["--strategy", "fsdp", "--accelerator", "cpu"], "strategy fsdp is not supported yet"),
     (["--accelerator", "gpu"], "invalid trainer settings")],
)  # fmt: skip
def test_unusable_trainer_settings_are_one_error_line(tiny_digits_zoo, tmp_path, capsys, flags, message):
    if "gpu" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", "--zoo", str(tiny_digits_zoo.root), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err and len(err.strip().splitlines()) == 1
