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
from d2nwg.datamodule import ZooDataModule
from d2nwg.datasets import to_xy
from d2nwg.io import load_safetensors
from d2nwg.specs import InputSpec
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
            return to_xy(ds.per_class)
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
    assert zoo.manifest["input"] == {"kind": "image", "image_size": [8, 8]}
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


# ----------------------------------------------------------------------------- stages, each on tiny inputs
TINY_ARCH = {"in_features": 4, "hidden": [4], "num_classes": 2}


def tiny_workspace(root: Path, mapping: str, datasets: dict[str, int], checkpoints: dict[str, dict]) -> Path:
    """``root/datasets/<name>.npz`` (``datasets[name]`` classes, 5 samples each, 4 features), checkpoint files
    (their state_dicts) and ``root/mapping.csv`` holding ``mapping``; returns ``root``."""
    (root / "datasets").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    for i, (name, classes) in enumerate(datasets.items()):
        x, y = blobs(i, classes=classes, per_class=5, dim=4)
        np.savez(root / "datasets" / f"{name}.npz", x=x, y=y)
    for name, state in checkpoints.items():
        save_file(state, str(root / "checkpoints" / name))
    (root / "mapping.csv").write_text(mapping)
    return root


def tiny_mlp(seed: int = 0, **config) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP(**{**TINY_ARCH, **config}).state_dict()


def tiny_stages(root: Path, **options):
    """Sources, datasets and target of a tiny workspace, as `ingest` produces them before validation."""
    from d2nwg.ingest import build_target, discover, parse_settings, read_datasets

    settings = parse_settings("mlp", arch_config=TINY_ARCH, chunk_size=4, **options)
    sources = discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warn=lambda m: None)
    datasets, _ = read_datasets(sources, settings)
    return settings, sources, datasets, build_target(settings)


def test_parse_settings_defaults_and_errors():
    from d2nwg.ingest import parse_settings

    settings = parse_settings("mlp", split_fractions="0.5,0.25,0.25", image_size="4,6", arch_config='{"hidden": [3]}')
    assert settings.include == ("*",) and settings.exclude == ()
    assert settings.split_fractions == (0.5, 0.25, 0.25) and settings.image_size == (4, 6)
    assert settings.arch_config == {"hidden": [3]}
    with pytest.raises(ValueError, match=r"--heldout-fraction must be in \[0, 1\), got 1.0"):
        parse_settings("mlp", heldout_fraction=1.0)
    with pytest.raises(ValueError, match="--split-fractions must be three positive numbers"):
        parse_settings("mlp", split_fractions="0.5,0.5,0.5")


def test_check_new_folder(tmp_path):
    from d2nwg.ingest import check_new_folder

    assert check_new_folder(str(tmp_path / "new")) == tmp_path / "new"
    assert check_new_folder(tmp_path) == tmp_path  # empty
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        check_new_folder(tmp_path)


def test_discover_resolves_datasets_and_warns_about_unmapped_files(tmp_path):
    from d2nwg.ingest import discover

    root = tiny_workspace(
        tmp_path,
        "checkpoint,dataset,split\na.safetensors,d1,train\nb.safetensors,d2.npz,\n",
        {"d1": 2, "d2": 2},
        {"a.safetensors": tiny_mlp(), "b.safetensors": tiny_mlp(), "extra.safetensors": tiny_mlp()},
    )
    warnings: list[str] = []
    sources = discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warnings.append)
    assert [(e.checkpoint, e.dataset, e.split) for e in sources.entries] == [
        ("a.safetensors", "d1", "train"),
        ("b.safetensors", "d2.npz", None),
    ]
    assert sources.dataset_paths == {"d1": root / "datasets" / "d1.npz", "d2.npz": root / "datasets" / "d2.npz"}
    assert [sources.dataset_key(e) for e in sources.entries] == ["d1", "d2"]
    assert warnings == ["checkpoint extra.safetensors is not in the mapping; ignored"]


def test_discover_reports_every_missing_file_at_once(tmp_path):
    from d2nwg.ingest import discover

    root = tiny_workspace(tmp_path, "checkpoint,dataset\nnone.safetensors,d1\na.bin,nodata\n", {"d1": 2}, {})
    with pytest.raises(ValueError) as err:
        discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warn=lambda m: None)
    message = str(err.value)
    assert "checkpoint(s) not found" in message and "none.safetensors, a.bin" in message
    assert "are not .safetensors/.pt/.pth files" in message and "dataset(s) not found" in message
    with pytest.raises(ValueError, match="--datasets folder not found"):
        discover(root / "checkpoints", root / "nowhere", root / "mapping.csv", warn=lambda m: None)


def test_read_datasets_orders_labels_numerically_and_splits_every_class(tmp_path):
    from d2nwg.ingest import discover, parse_settings, read_datasets

    root = tiny_workspace(tmp_path, "checkpoint,dataset\na.safetensors,d1\n", {"d1": 2}, {"a.safetensors": tiny_mlp()})
    x = np.arange(11 * 5 * 4, dtype=np.float32).reshape(55, 4)
    np.savez(root / "datasets" / "d1.npz", x=x, y=np.repeat(np.arange(11), 5))  # labels 0..10
    sources = discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warn=lambda m: None)
    datasets, input_spec = read_datasets(sources, parse_settings("mlp", split_fractions="0.6,0.2,0.2"))
    assert input_spec.kind == "vector" and list(datasets) == ["d1"]
    d1 = datasets["d1"]
    assert d1.data.class_names == [str(i) for i in range(11)]  # "2" before "10"
    assert [{k: len(v) for k, v in s.items()} for s in d1.splits] == [{"train": 3, "support": 1, "test": 1}] * 11
    x_test, y_test = d1.xy("test")
    assert x_test.shape == (11, 4) and y_test.tolist() == list(range(11))
    assert (x_test[:, 0] // 20).tolist() == list(range(11))  # each test sample comes from its own class


def test_read_datasets_refuses_two_datasets_in_one_namespace(tmp_path):
    from d2nwg.ingest import discover, parse_settings, read_datasets

    root = tiny_workspace(
        tmp_path, "checkpoint,dataset\na.safetensors,d1\nb.safetensors,d1.csv\n", {"d1": 2}, {"a.safetensors": {}, "b.safetensors": {}}
    )
    (root / "datasets" / "d1.csv").write_text("f0,label\n1.0,0\n")
    sources = discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warn=lambda m: None)
    with pytest.raises(ValueError, match="both map to the class namespace 'd1'"):
        read_datasets(sources, parse_settings("mlp"))


def test_build_target_is_seeded_and_selects_the_layout():
    from d2nwg.ingest import build_target, parse_settings

    a = build_target(parse_settings("mlp", arch_config=TINY_ARCH, seed=3, exclude=["*.bias"], chunk_size=4))
    b = build_target(parse_settings("mlp", arch_config=TINY_ARCH, seed=3, exclude=["*.bias"], chunk_size=4))
    assert a.spec == {"name": "mlp", "config": TINY_ARCH}
    assert a.layout.names == ["fc0.weight", "fc1.weight"] and a.layout.chunk_size == 4
    assert all(torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]) for k in a.model.state_dict())


def test_validate_checkpoints_collects_every_bad_one(tmp_path):
    from d2nwg.ingest import BadCheckpointsError, validate_checkpoints

    nan = tiny_mlp(1)
    nan["fc1.weight"][0, 0] = float("nan")
    root = tiny_workspace(
        tmp_path,
        "checkpoint,dataset\ngood.safetensors,d1\nnan.safetensors,d1\nwide.safetensors,d1\nthree.safetensors,d3\n",
        {"d1": 2, "d3": 3},
        {
            "good.safetensors": tiny_mlp(0),
            "nan.safetensors": nan,
            "wide.safetensors": tiny_mlp(2, num_classes=3),
            "three.safetensors": tiny_mlp(3),
        },
    )
    _, sources, datasets, target = tiny_stages(root)
    warnings: list[str] = []
    good, bad = validate_checkpoints(sources, datasets, target, skip_bad=True, warn=warnings.append)
    assert [(c.member_id, c.dataset) for c in good] == [("good", "d1")]
    assert set(good[0].metrics) == {"train_acc", "support_acc", "test_acc"}
    reasons = {b.name: b.reason for b in bad}
    assert "NaN" in reasons["nan.safetensors"]
    assert "has shape [3, 4], expected [2, 4]" in reasons["wide.safetensors"]
    assert "class count mismatch" in reasons["three.safetensors"]
    assert warnings == [f"skipping bad checkpoint {b.name}: {b.reason}" for b in bad]
    with pytest.raises(BadCheckpointsError) as err:
        validate_checkpoints(sources, datasets, target)
    assert [b.name for b in err.value.bad] == [b.name for b in bad]


def test_validate_checkpoints_measures_the_checkpoint(tmp_path):
    from d2nwg.ingest import validate_checkpoints

    root = tiny_workspace(tmp_path, "checkpoint,dataset\nm.safetensors,d1\n", {"d1": 2}, {"m.safetensors": tiny_mlp(5)})
    _, sources, datasets, target = tiny_stages(root)
    (member,), _ = validate_checkpoints(sources, datasets, target)
    model = MLP(**TINY_ARCH)
    model.load_state_dict(tiny_mlp(5))
    for split in ("train", "support", "test"):
        x, y = datasets["d1"].xy(split)
        with torch.no_grad():
            assert member.metrics[f"{split}_acc"] == pytest.approx((model(x).argmax(-1) == y).float().mean().item())


def valid_checkpoints(names_and_splits: list[tuple[str, str | None]]):
    from d2nwg.ingest import MappingEntry, ValidCheckpoint

    return [
        ValidCheckpoint(MappingEntry(f"{name}.pt", "d", split), Path(f"{name}.pt"), name, "d", {"test_acc": 1.0})
        for name, split in names_and_splits
    ]


def test_group_into_tasks_makes_one_task_per_checkpoint():
    from d2nwg.ingest import group_into_tasks

    checkpoints = valid_checkpoints([("a", "train"), ("b", None)])
    tasks = group_into_tasks(checkpoints)
    assert [(t.id, t.dataset, t.split, t.order_key) for t in tasks] == [("a", "d", "train", "a.pt"), ("b", "d", None, "b.pt")]
    assert [t.members for t in tasks] == [[checkpoints[0]], [checkpoints[1]]]


def test_split_tasks_keeps_mapped_splits_and_ignores_mapping_order():
    from d2nwg.ingest import group_into_tasks, split_tasks

    named = [("fixed", "heldout"), *((f"t{i}", None) for i in range(10))]
    splits = split_tasks(group_into_tasks(valid_checkpoints(named)), heldout_fraction=0.3, seed=1)
    assert splits["fixed"] == "heldout"
    assert sum(s == "heldout" for s in splits.values()) == 1 + 3
    reordered = split_tasks(group_into_tasks(valid_checkpoints(named[::-1])), heldout_fraction=0.3, seed=1)
    assert reordered == splits
    # Without a mapped training task, at least one task stays in training.
    only_free = split_tasks(group_into_tasks(valid_checkpoints([("a", None), ("b", None)])), 0.9, seed=0)
    assert sorted(only_free.values()) == ["heldout", "train"]
    with pytest.raises(ValueError, match="every usable checkpoint is held out"):
        split_tasks(group_into_tasks(valid_checkpoints([("a", "heldout")])), 0.1, seed=0)


def test_check_head_size():
    from d2nwg.datasets import LabelledDataset
    from d2nwg.ingest import ZooDataset, check_head_size, group_into_tasks

    datasets = {
        name: ZooDataset(name, LabelledDataset([torch.zeros(1, 4)] * k, [str(i) for i in range(k)], []), [])
        for name, k in (("d", 2), ("d3", 3))
    }
    tasks = group_into_tasks(valid_checkpoints([("a", None), ("b", None)]))
    check_head_size(tasks, datasets)
    tasks[1].dataset = "d3"
    with pytest.raises(ValueError, match=r"different class counts \[2, 3\]"):
        check_head_size(tasks, datasets)


def test_write_zoo_writes_the_tasks_members_and_pool(tmp_path):
    from d2nwg.ingest import group_into_tasks, ingest_recipe, split_tasks, validate_checkpoints, write_zoo

    root = tiny_workspace(
        tmp_path / "in",
        "checkpoint,dataset,split\na.safetensors,d1,train\nb.safetensors,d1,heldout\n",
        {"d1": 2, "unused": 2},
        {"a.safetensors": tiny_mlp(0), "b.safetensors": tiny_mlp(1)},
    )
    settings, sources, datasets, target = tiny_stages(root)
    good, bad = validate_checkpoints(sources, datasets, target)
    tasks = group_into_tasks(good)
    splits = split_tasks(tasks, settings.heldout_fraction, settings.seed)
    recipe = ingest_recipe(settings, sources, tasks, bad)
    assert recipe["sources"] == {"a": "a.safetensors", "b": "b.safetensors"} and recipe["skipped"] == []
    zoo = write_zoo(tmp_path / "zoo", tasks, splits, datasets, target, InputSpec(kind="vector"), recipe)
    assert {m.id: (m.task, m.split) for m in zoo} == {"a": ("a", "train"), "b": ("b", "heldout")}
    assert zoo.tasks["a"]["classes"] == ["d1/0", "d1/1"] and zoo.manifest["recipe"] == recipe
    assert torch.equal(zoo.load_member(next(m for m in zoo if m.id == "b"))["fc0.weight"], tiny_mlp(1)["fc0.weight"])
    x, y = zoo.task_data("a", "test")
    assert torch.equal(x, datasets["d1"].xy("test")[0]) and torch.equal(y, datasets["d1"].xy("test")[1])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left
