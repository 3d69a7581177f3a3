"""`d2nwg.utils.io`: byte-identical safetensors files and one clear line for every unreadable checkpoint."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open, save

from d2nwg.utils.io import load_weights, safetensors_bytes, save_safetensors

TENSORS = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16), "n": torch.tensor([3, 4])}
METADATA = {f"k{i}": {"value": i, "list": [i, 0]} for i in range(8)} | {"task": "t0", "seed": 0}


def test_same_inputs_write_the_same_bytes(tmp_path):
    # safetensors' own writer orders metadata by a per-map random hash: this was byte-different every time.
    for i in range(3):
        save_safetensors(tmp_path / f"{i}.safetensors", TENSORS, METADATA)
    files = [(tmp_path / f"{i}.safetensors").read_bytes() for i in range(3)]
    assert files[0] == files[1] == files[2]
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], TENSORS[k]) for k in TENSORS)
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata()["task"] == "t0" and f.metadata()["k3"] == '{"list": [3, 0], "value": 3}'


def test_bytes_match_the_safetensors_library_when_its_order_is_fixed():
    for metadata in (None, {"format": "pt"}):
        assert safetensors_bytes(TENSORS, metadata) == save(TENSORS, metadata=metadata)
    assert safetensors_bytes({"empty": torch.zeros(0), "scalar": torch.tensor(2.0)}) == save(
        {"empty": torch.zeros(0), "scalar": torch.tensor(2.0)}
    )


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"args": argparse.Namespace(lr=0.1)}, "pickles 'argparse.Namespace'"),
        ({"best": np.float64(0.9)}, "multiarray.scalar'"),
        ({"lr": 0.1}, "key 'lr' holds a float"),
        ({"ema": {"w": torch.zeros(1)}}, "key 'ema' holds a dict of tensors"),
    ],
)
def test_unreadable_checkpoint_is_one_line_naming_file_and_cause(extra, expected, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2), **extra}, path)
    with pytest.raises(ValueError) as err:
        load_weights(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "save_file(model.state_dict()" in message
    assert "\n" not in message and "\x1b" not in message


def test_lightning_and_suffixless_torch_files_load(tmp_path):
    sd = {"model.w": torch.ones(2)}
    torch.save({"state_dict": sd, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "epoch": 2}, tmp_path / "a.ckpt")
    torch.save({"w": torch.ones(2)}, tmp_path / "checkpoints")
    assert load_weights(tmp_path / "a.ckpt").keys() == {"model.w"}
    assert load_weights(tmp_path / "checkpoints").keys() == {"w"}
    (tmp_path / "junk.pt").write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"corrupt or unreadable checkpoint .*junk.pt \(not a torch.save file\?\)"):
        load_weights(tmp_path / "junk.pt")
