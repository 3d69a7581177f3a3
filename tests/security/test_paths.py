"""Names and paths read from files stay inside their folder: member and task ids, mapping entries,
alignment records, and links in a pipeline folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.security.hostile import assert_one_error, copy_tree, edit_json, files_under, run_cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runs(tmp_path, tiny_digits_zoo):
    """``tmp/runs/zoo``: a copy of the session zoo, as in the report's scenario (``--out runs/new``)."""
    copy_tree(tiny_digits_zoo.root, tmp_path / "runs" / "zoo")
    return tmp_path / "runs"


@pytest.mark.parametrize("bad_id", ["../../escape", "../escape", "a/b", "..", "x\\y", "ok\x1b[2Jno"])
def test_member_id_that_leaves_the_folder_is_refused(bad_id, runs, tmp_path, capsys):
    zoo = runs / "zoo"
    edit_json(zoo / "manifest.json", lambda d: d["members"][0].__setitem__("id", bad_id))
    before = files_under(tmp_path)
    code, _, err = run_cli(["zoo", "info", zoo], capsys)
    assert_one_error(code, err, "member id", "is not a plain name")
    assert "\x1b" not in err  # control characters are shown escaped, never sent to the terminal
    code, _, err = run_cli(["zoo", "align", zoo, "--out", runs / "new"], capsys)
    assert_one_error(code, err, "member id")
    assert files_under(tmp_path) == before  # no runs/escape.safetensors, no runs/new


def test_task_id_that_leaves_the_folder_is_refused(runs, capsys):
    zoo = runs / "zoo"

    def rename(manifest):
        old = next(iter(manifest["tasks"]))
        manifest["tasks"]["../../t"] = manifest["tasks"].pop(old)
        for m in manifest["members"]:
            m["task"] = "../../t" if m["task"] == old else m["task"]

    edit_json(zoo / "manifest.json", rename)
    code, _, err = run_cli(["zoo", "info", zoo], capsys)
    assert_one_error(code, err, "task id '../../t'")


def test_writing_a_member_with_a_traversal_id_is_refused(tmp_path, tiny_digits_zoo):
    from d2nwg.security import UnsafePathError
    from d2nwg.zoo.model_zoo import ModelZoo

    zoo = ModelZoo.open(copy_tree(tiny_digits_zoo.root, tmp_path / "zoo"))
    member = zoo.members("train")[0]
    with pytest.raises(UnsafePathError):
        zoo.add(zoo.load_member(member), member.task, member_id="../outside")
    assert not (tmp_path / "outside.safetensors").exists()


@pytest.fixture
def npz_inputs(tmp_path):
    """Two small checkpoints and datasets for ``zoo ingest``, plus a secret file next to them."""
    import numpy as np
    from safetensors.torch import save_file

    from d2nwg.targets.mlp.model import MLP

    ckpts, data = tmp_path / "ckpts", tmp_path / "data"
    ckpts.mkdir(), data.mkdir()
    for i in range(2):
        np.savez(data / f"d{i}.npz", x=np.random.default_rng(i).random((30, 64)), y=np.arange(30) % 3)
        save_file(MLP(64, [8], 3).state_dict(), str(ckpts / f"m{i}.safetensors"))
    secret = tmp_path / "secret.npz"
    np.savez(secret, x=np.zeros((30, 64)), y=np.arange(30) % 3)
    save_file(MLP(64, [8], 3).state_dict(), str(tmp_path / "outside.safetensors"))
    return ckpts, data


@pytest.mark.parametrize(
    "row, needle",
    [("../outside.safetensors,d0", "mapped checkpoint '../outside.safetensors'"), ("m0.safetensors,../secret", "mapped dataset '../secret'")],
    ids=["checkpoint", "dataset"],
)
def test_mapping_entries_that_leave_their_folder_are_refused(row, needle, npz_inputs, tmp_path, capsys):
    ckpts, data = npz_inputs
    (tmp_path / "map.csv").write_text(f"checkpoint,dataset\n{row}\nm1.safetensors,d1\n")
    out = tmp_path / "zoo"
    argv = ["zoo", "ingest", "--checkpoints", ckpts, "--datasets", data, "--mapping", tmp_path / "map.csv", "--arch", "mlp",
            "--arch-config", '{"hidden": [8], "num_classes": 3}', "--out", out]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_alignment_record_with_traversal_ids_or_bad_permutations_is_refused(tmp_path):
    from d2nwg.zoo.alignment import ALIGNMENT_FORMAT, read_alignment

    base = {"format": ALIGNMENT_FORMAT, "reference": "m0", "seed": 0, "max_iter": 10, "groups": {"fc0": 3}, "init": None}
    cases = {
        "traversal member": {**base, "members": {"../../x": {"fc0": [0, 1, 2]}}},
        "traversal reference": {**base, "reference": "../m0", "members": {}},
        "out of range": {**base, "members": {"m1": {"fc0": [0, 1, 7]}}},
        "repeated unit": {**base, "members": {"m1": {"fc0": [0, 0, 1]}}},
    }
    for name, record in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(record))
        with pytest.raises(ValueError, match="invalid alignment file"):
            read_alignment(path)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**base, "members": {"m1": {"fc0": [2, 0, 1]}}}))
    assert torch.equal(read_alignment(good).permutations["m1"]["fc0"], torch.tensor([2, 0, 1]))


def test_symlink_in_a_pipeline_folder_pointing_outside_is_refused(tmp_path, tiny_pipeline_dir, heldout_images, capsys):
    pipe = copy_tree(tiny_pipeline_dir, tmp_path / "pipe")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    os.symlink(secret, pipe / "denoiser" / "extra.json")
    out = tmp_path / "gen"
    code, _, err = run_cli(["generate", "--pipeline", pipe, "--dataset", heldout_images, "--out", out], capsys)
    assert_one_error(code, err, "a link to", "outside it")
    assert not out.exists()
    # Pushing such a folder would upload the file it points to: refused before anything is staged.
    code, _, err = run_cli(["push", "--pipeline", pipe, "--repo-id", "me/x"], capsys)
    assert_one_error(code, err, "outside it")


def test_symlink_inside_the_pipeline_folder_is_fine(tmp_path, tiny_pipeline_dir, heldout_images, capsys):
    pipe = copy_tree(tiny_pipeline_dir, tmp_path / "pipe")
    os.symlink(pipe / "vae" / "config.json", pipe / "vae" / "alias.json")
    code, _, err = run_cli(["generate", "--pipeline", pipe, "--dataset", heldout_images, "--out", tmp_path / "g", "--steps", "2", "--num-samples", "2"], capsys)
    assert code == 0, err
