"""``d2nwg zoo ingest``: a zoo from a user's own checkpoints, run in-process through `d2nwg.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from d2nwg.architectures import MLP, build_model
from d2nwg.cli import main
from d2nwg.data import ZooDataModule
from d2nwg.io import load_safetensors
from d2nwg.weights import WeightLayout
from d2nwg.zoo import ModelZoo

ARCH_CONFIG = {"in_features": 64, "hidden": [8], "num_classes": 3}
GOOD = ["net_a1.safetensors", "net_a2.pt", "net_b1.safetensors", "net_img.safetensors"]
BAD = ["bad_corrupt.safetensors", "bad_nan.safetensors", "net_c4.safetensors"]


def blobs(seed: int, classes: int = 3, per_class: int = 12, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(classes, dim))
    x = np.concatenate([c + rng.normal(0, 1, size=(per_class, dim)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(classes), per_class)


def image_folder(root: Path, per_class: int = 6) -> None:
    """Three classes of 8x8 grey PNGs: bright top rows, bright left columns, bright centre."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for k, name in enumerate(["centre", "left", "top"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(8, 8))
            if name == "top":
                img[:3] += 180
            elif name == "left":
                img[:, :3] += 180
            else:
                img[3:6, 3:6] += 180
            Image.fromarray(img.astype(np.uint8), mode="L").save(root / name / f"{i}.png")


def train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, num_classes: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = MLP(**{**ARCH_CONFIG, "num_classes": num_classes})
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """datasets/ (two npz, one image folder, one 4-class npz), checkpoints/ (4 good, 3 bad), mapping.csv."""
    root = tmp_path_factory.mktemp("ingest")
    data, ckpts = root / "datasets", root / "checkpoints"
    data.mkdir()
    ckpts.mkdir()
    arrays = {"blobs_a": blobs(0), "blobs_b": blobs(1), "blobs_c4": blobs(2, classes=4)}
    for name, (x, y) in arrays.items():
        np.savez(data / f"{name}.npz", x=x, y=y)
    image_folder(data / "shapes")

    def tensors(name):
        if name == "shapes":
            from d2nwg.datasets import load_dataset

            ds = load_dataset(data / "shapes", {"image_size": [8, 8], "grayscale": True})
            return torch.cat(ds.per_class), torch.cat([torch.full((len(c),), i) for i, c in enumerate(ds.per_class)])
        x, y = arrays[name]
        return torch.tensor(x), torch.tensor(y)

    save_file(train_mlp(*tensors("blobs_a"), seed=0), str(ckpts / "net_a1.safetensors"))
    torch.save(train_mlp(*tensors("blobs_a"), seed=1), ckpts / "net_a2.pt")
    save_file(train_mlp(*tensors("blobs_b"), seed=2), str(ckpts / "net_b1.safetensors"))
    save_file(train_mlp(*tensors("shapes"), seed=3), str(ckpts / "net_img.safetensors"))
    save_file(train_mlp(*tensors("blobs_a"), seed=4), str(ckpts / "bad_corrupt.safetensors"))
    raw = (ckpts / "bad_corrupt.safetensors").read_bytes()
    (ckpts / "bad_corrupt.safetensors").write_bytes(raw[: len(raw) // 2])
    sd = train_mlp(*tensors("blobs_b"), seed=5)
    sd["fc0.weight"][0, 0] = float("nan")
    save_file(sd, str(ckpts / "bad_nan.safetensors"))
    # Trained with a 3-wide head but mapped to a 4-class dataset: a class count mismatch.
    save_file(train_mlp(*tensors("blobs_a"), seed=6), str(ckpts / "net_c4.safetensors"))
    (root / "mapping.csv").write_text(
        "checkpoint,dataset,split\n"
        "net_a1.safetensors,blobs_a,train\n"
        "net_a2.pt,blobs_a.npz,\n"
        "net_b1.safetensors,blobs_b,heldout\n"
        "net_img.safetensors,shapes,\n"
        "bad_corrupt.safetensors,blobs_a,\n"
        "bad_nan.safetensors,blobs_b,\n"
        "net_c4.safetensors,blobs_c4,\n"
    )
    return root


def ingest_argv(ws: Path, out: Path, *extra: str, mapping: str = "mapping.csv") -> list[str]:
    return [
        "zoo", "ingest",
        "--checkpoints", str(ws / "checkpoints"),
        "--datasets", str(ws / "datasets"),
        "--mapping", str(ws / mapping),
        "--arch", "mlp",
        "--arch-config", json.dumps(ARCH_CONFIG),
        "--chunk-size", "8",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ingested(workspace, tmp_path_factory):
    """``zoo ingest --skip-bad`` run once; yields (out, exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = tmp_path_factory.mktemp("zoos") / "zoo"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(ingest_argv(workspace, out, "--skip-bad"))
    return out, code, stdout.getvalue(), stderr.getvalue()


def test_bad_checkpoints_fail_and_write_nothing(workspace, tmp_path, capsys):
    out = tmp_path / "sub" / "zoo"
    assert main(ingest_argv(workspace, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error:") and "--skip-bad" in lines[-1]
    for name in BAD:
        assert any(line.startswith(f"bad checkpoint {name}:") for line in lines[:-1]), err
    assert "NaN" in next(line for line in lines if "bad_nan" in line)
    assert "class count mismatch" in next(line for line in lines if "net_c4" in line)
    assert not any(name in err for name in GOOD)
    assert not out.exists() and not (tmp_path / "sub").exists()


def test_skip_bad_builds_a_zoo_of_the_good_members(ingested):
    out, code, stdout, stderr = ingested
    assert code == 0, stderr
    for name in BAD:
        assert f"warning: skipping bad checkpoint {name}" in stderr
    assert "model zoo" in stdout and "members" in stdout
    zoo = ModelZoo.open(out)
    assert sorted(m.id for m in zoo) == sorted(Path(n).stem for n in GOOD)
    assert {m.id: m.split for m in zoo}["net_a1"] == "train"
    assert {m.id: m.split for m in zoo}["net_b1"] == "heldout"
    assert zoo.tasks["net_img"]["classes"] == ["shapes/centre", "shapes/left", "shapes/top"]
    assert zoo.tasks["net_a2"]["classes"] == ["blobs_a/0", "blobs_a/1", "blobs_a/2"]
    assert not any(c.startswith("blobs_c4/") for c in zoo.manifest["classes"])
    assert zoo.manifest["input"] == {"image_size": [8, 8], "grayscale": True}
    assert zoo.architecture == {"name": "mlp", "config": ARCH_CONFIG}
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp folder left


def test_ingested_members_round_trip_and_metrics_recompute(ingested, workspace):
    out = ingested[0]
    zoo = ModelZoo.open(out)
    layout = zoo.layout
    assert layout.chunk_size == 8
    assert WeightLayout.load(out / "layout.json") == layout
    model = build_model(zoo.architecture).eval()
    for member in zoo:
        sd = zoo.load_member(member)
        restored = layout.detokenize(layout.tokenize(sd, dtype=torch.float64))[0]
        assert all(torch.equal(restored[k], sd[k]) for k in layout.names)
        # The stored weights are the checkpoint's.
        name = zoo.manifest["recipe"]["sources"][member.id]
        path = workspace / "checkpoints" / name
        original = torch.load(path, weights_only=True) if path.suffix == ".pt" else load_safetensors(path)
        assert all(torch.equal(sd[k], original[k]) for k in layout.names)
        layout.inject(model, sd)
        x, y = zoo.task_data(member.task, "test")
        with torch.no_grad():
            acc = (model(x).argmax(-1) == y).float().mean().item()
        assert member.metrics["test_acc"] == pytest.approx(acc)
        assert len(x) > 0


def test_ingested_zoo_feeds_training(ingested):
    dm = ZooDataModule(zoo=str(ingested[0]), batch_size=2)
    assert dm.num_classes == 3 and dm.feature_dim == 64
    assert len(dm.tokens) == 3  # the train members


def test_ingest_is_deterministic_with_a_json_mapping(workspace, ingested, tmp_path, capsys):
    mapping = {
        "net_a1.safetensors": {"dataset": "blobs_a", "split": "train"},
        "net_a2.pt": "blobs_a",
        "net_b1.safetensors": {"dataset": "blobs_b", "split": "heldout"},
        "net_img.safetensors": "shapes",
    }
    (tmp_path / "mapping.json").write_text(json.dumps(mapping))
    ws = workspace
    argv = ingest_argv(ws, tmp_path / "zoo", mapping=str(tmp_path / "mapping.json"))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "not in the mapping" in err  # the bad files are not mapped here
    a, b = ModelZoo.open(ingested[0]), ModelZoo.open(tmp_path / "zoo")
    assert [(m.id, m.split, m.metrics) for m in a] == [(m.id, m.split, m.metrics) for m in b]
    pool_a, pool_b = load_safetensors(a.root / "data.safetensors"), load_safetensors(b.root / "data.safetensors")
    assert pool_a.keys() == pool_b.keys() and all(torch.equal(pool_a[k], pool_b[k]) for k in pool_a)


@pytest.mark.parametrize(
    "row, message",
    [
        ("missing.safetensors,blobs_a,", "checkpoint(s) not found"),
        ("net_a1.safetensors,no_such_data,", "dataset(s) not found"),
    ],
)
def test_mapping_naming_missing_files_fails(workspace, tmp_path, capsys, row, message):
    (tmp_path / "m.csv").write_text(f"checkpoint,dataset\n{row}\n")
    out = tmp_path / "zoo"
    assert main(ingest_argv(workspace, out, mapping=str(tmp_path / "m.csv"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err
    assert row.split(",")[0 if "missing" in row else 1] in err
    assert not out.exists()


def test_refuses_non_empty_out(workspace, tmp_path, capsys):
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(ingest_argv(workspace, out, "--skip-bad")) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_feature_dims_and_tiny_classes_are_clear_errors(tmp_path, capsys):
    data, ckpts = tmp_path / "datasets", tmp_path / "checkpoints"
    data.mkdir()
    ckpts.mkdir()
    x, y = blobs(0, dim=16)
    np.savez(data / "small16.npz", x=x, y=y)
    x, y = blobs(1, per_class=2)
    np.savez(data / "tiny.npz", x=x, y=y)
    image_folder(data / "shapes", per_class=3)
    save_file(MLP(**ARCH_CONFIG).state_dict(), str(ckpts / "n.safetensors"))
    (tmp_path / "dims.csv").write_text("checkpoint,dataset\nn.safetensors,small16\nm.safetensors,shapes\n")
    save_file(MLP(**ARCH_CONFIG).state_dict(), str(ckpts / "m.safetensors"))
    assert main(ingest_argv(tmp_path, tmp_path / "z1", mapping="dims.csv")) == 2
    err = capsys.readouterr().err
    assert "different feature dimensions" in err and "small16" in err
    (tmp_path / "tiny.csv").write_text("checkpoint,dataset\nn.safetensors,tiny\n")
    assert main(ingest_argv(tmp_path, tmp_path / "z2", mapping="tiny.csv")) == 2
    err = capsys.readouterr().err
    assert "dataset 'tiny'" in err and "class '0'" in err
    assert not (tmp_path / "z1").exists() and not (tmp_path / "z2").exists()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["zoo", "ingest", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--heldout-fraction" in text and "(default: 0.1)" in text and "(default: 0.6,0.2,0.2)" in text
