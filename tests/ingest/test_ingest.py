"""``d2nwg zoo ingest``: a zoo from a user's own checkpoints, run in-process through `d2nwg.commands.main`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from d2nwg.commands import main
from d2nwg.data.labelled import to_xy
from d2nwg.targets.architectures import build_model
from d2nwg.targets.mlp.model import MLP
from d2nwg.training.datamodule import ZooDataModule
from d2nwg.utils.io import load_safetensors
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import ModelZoo
from d2nwg.zoo.specs import InputSpec

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
            from d2nwg.data.labelled import load_dataset

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
    # One task per dataset: both blobs_a checkpoints are members of task blobs_a, on its mapped side.
    assert {m.id: (m.task, m.split) for m in zoo} == {
        "net_a1": ("blobs_a", "train"), "net_a2": ("blobs_a", "train"),
        "net_b1": ("blobs_b", "heldout"), "net_img": ("shapes", "train"),
    }  # fmt: skip
    assert zoo.tasks["shapes"]["classes"] == ["shapes/centre", "shapes/left", "shapes/top"]
    assert zoo.tasks["blobs_a"]["classes"] == ["blobs_a/0", "blobs_a/1", "blobs_a/2"]
    assert {t: r["dataset"] for t, r in zoo.tasks.items()} == {"blobs_a": "blobs_a", "blobs_b": "blobs_b", "shapes": "shapes"}
    assert zoo.split_leaks() == {}
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
    from d2nwg.ingest.checkpoints import build_target
    from d2nwg.ingest.datasets import read_datasets
    from d2nwg.ingest.discovery import discover
    from d2nwg.ingest.settings import parse_settings

    settings = parse_settings("mlp", arch_config=TINY_ARCH, chunk_size=4, **options)
    sources = discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warn=lambda m: None)
    datasets, _ = read_datasets(sources, settings)
    return settings, sources, datasets, build_target(settings)


def test_parse_settings_defaults_and_errors():
    from d2nwg.ingest.settings import parse_settings

    settings = parse_settings("mlp", split_fractions="0.5,0.25,0.25", image_size="4,6", arch_config='{"hidden": [3]}')
    assert settings.include == ("*",) and settings.exclude == ()
    assert settings.split_fractions == (0.5, 0.25, 0.25) and settings.image_size == (4, 6)
    assert settings.arch_config == {"hidden": [3]}
    with pytest.raises(ValueError, match=r"--heldout-fraction must be in \[0, 1\), got 1.0"):
        parse_settings("mlp", heldout_fraction=1.0)
    with pytest.raises(ValueError, match="--split-fractions must be three positive numbers"):
        parse_settings("mlp", split_fractions="0.5,0.5,0.5")


def test_check_new_folder(tmp_path):
    from d2nwg.ingest.settings import check_new_folder

    assert check_new_folder(str(tmp_path / "new")) == tmp_path / "new"
    assert check_new_folder(tmp_path) == tmp_path  # empty
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        check_new_folder(tmp_path)


def test_discover_resolves_datasets_and_warns_about_unmapped_files(tmp_path):
    from d2nwg.ingest.discovery import discover

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
    from d2nwg.ingest.discovery import discover

    root = tiny_workspace(tmp_path, "checkpoint,dataset\nnone.safetensors,d1\na.txt,nodata\n", {"d1": 2}, {})
    with pytest.raises(ValueError) as err:
        discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warn=lambda m: None)
    message = str(err.value)
    assert "checkpoint(s) not found" in message and "none.safetensors, a.txt" in message
    assert "a.txt are not .safetensors/.pt/.pth/.ckpt/.bin files" in message and "dataset(s) not found" in message
    with pytest.raises(ValueError, match="--datasets folder not found"):
        discover(root / "checkpoints", root / "nowhere", root / "mapping.csv", warn=lambda m: None)


def test_read_datasets_orders_labels_numerically_and_splits_every_class(tmp_path):
    from d2nwg.ingest.datasets import read_datasets
    from d2nwg.ingest.discovery import discover
    from d2nwg.ingest.settings import parse_settings

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
    from d2nwg.ingest.datasets import read_datasets
    from d2nwg.ingest.discovery import discover
    from d2nwg.ingest.settings import parse_settings

    root = tiny_workspace(
        tmp_path, "checkpoint,dataset\na.safetensors,d1\nb.safetensors,d1.csv\n", {"d1": 2}, {"a.safetensors": {}, "b.safetensors": {}}
    )
    (root / "datasets" / "d1.csv").write_text("f0,label\n1.0,0\n")
    sources = discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warn=lambda m: None)
    with pytest.raises(ValueError, match="both map to the class namespace 'd1'"):
        read_datasets(sources, parse_settings("mlp"))


def test_build_target_is_seeded_and_selects_the_layout():
    from d2nwg.ingest.checkpoints import build_target
    from d2nwg.ingest.settings import parse_settings

    a = build_target(parse_settings("mlp", arch_config=TINY_ARCH, seed=3, exclude=["*.bias"], chunk_size=4))
    b = build_target(parse_settings("mlp", arch_config=TINY_ARCH, seed=3, exclude=["*.bias"], chunk_size=4))
    assert a.spec == {"name": "mlp", "config": TINY_ARCH}
    assert a.layout.names == ["fc0.weight", "fc1.weight"] and a.layout.chunk_size == 4
    assert all(torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]) for k in a.model.state_dict())


def test_validate_checkpoints_collects_every_bad_one(tmp_path):
    from d2nwg.ingest.checkpoints import BadCheckpointsError
    from d2nwg.ingest.validation import validate_checkpoints

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
    from d2nwg.ingest.validation import validate_checkpoints

    root = tiny_workspace(tmp_path, "checkpoint,dataset\nm.safetensors,d1\n", {"d1": 2}, {"m.safetensors": tiny_mlp(5)})
    _, sources, datasets, target = tiny_stages(root)
    (member,), _ = validate_checkpoints(sources, datasets, target)
    model = MLP(**TINY_ARCH)
    model.load_state_dict(tiny_mlp(5))
    for split in ("train", "support", "test"):
        x, y = datasets["d1"].xy(split)
        with torch.no_grad():
            assert member.metrics[f"{split}_acc"] == pytest.approx((model(x).argmax(-1) == y).float().mean().item())


def valid_checkpoints(rows: list[tuple]):
    """ValidCheckpoints from ``(name, dataset, split[, group])`` rows."""
    from d2nwg.ingest.mapping import MappingEntry
    from d2nwg.ingest.validation import ValidCheckpoint

    out = []
    for name, dataset, split, *group in rows:
        entry = MappingEntry(f"{name}.pt", dataset, split, group[0] if group else None)
        out.append(ValidCheckpoint(entry, Path(f"{name}.pt"), name, dataset, {"test_acc": 1.0}))
    return out


def test_group_into_tasks_makes_one_task_per_dataset():
    from d2nwg.ingest.tasks import group_into_tasks

    checkpoints = valid_checkpoints([("a1", "a", "train"), ("b1", "b", None), ("a2", "a", None, "r1")])
    tasks = group_into_tasks(checkpoints)
    assert [(t.id, t.dataset, t.split, t.groups) for t in tasks] == [("a", "a", "train", ("r1",)), ("b", "b", None, ())]
    assert [t.members for t in tasks] == [[checkpoints[0], checkpoints[2]], [checkpoints[1]]]
    with pytest.raises(ValueError, match=r"dataset 'a' are mapped to heldout \(a2.pt\) and train \(a1.pt\)"):
        group_into_tasks(valid_checkpoints([("a1", "a", "train"), ("a2", "a", "heldout")]))


def test_split_tasks_keeps_mapped_splits_and_ignores_mapping_order():
    from d2nwg.ingest.tasks import group_into_tasks, split_tasks

    named = [("fixed", "fixed", "heldout"), *((f"t{i}", f"t{i}", None) for i in range(10))]
    splits = split_tasks(group_into_tasks(valid_checkpoints(named)), heldout_fraction=0.3, seed=1)
    assert splits["fixed"] == "heldout"
    assert sum(s == "heldout" for s in splits.values()) == 1 + 3
    reordered = split_tasks(group_into_tasks(valid_checkpoints(named[::-1])), heldout_fraction=0.3, seed=1)
    assert reordered == splits
    # Without a mapped training task, at least one task stays in training.
    only_free = split_tasks(group_into_tasks(valid_checkpoints([("a", "a", None), ("b", "b", None)])), 0.9, seed=0)
    assert sorted(only_free.values()) == ["heldout", "train"]
    with pytest.raises(ValueError, match="every usable checkpoint is held out"):
        split_tasks(group_into_tasks(valid_checkpoints([("a", "a", "heldout")])), 0.1, seed=0)


def test_split_tasks_keeps_a_run_across_datasets_on_one_side():
    from d2nwg.ingest.tasks import group_into_tasks, split_tasks

    # Run r joins datasets d0..d3 (one unit); d4..d9 are free on their own: 7 units, 0.5 of them held out.
    rows = [(f"c{i}", f"d{i}", None, "r" if i < 4 else None) for i in range(10)]
    for seed in range(6):
        splits = split_tasks(group_into_tasks(valid_checkpoints(rows)), heldout_fraction=0.5, seed=seed)
        assert len({splits[f"d{i}"] for i in range(4)}) == 1
    mapped = rows + [("x", "d0", "train"), ("y", "d3", "heldout")]
    with pytest.raises(ValueError, match=r"run/group 'r' joins datasets 'd3' \(heldout\) and 'd0' \(train\)"):
        split_tasks(group_into_tasks(valid_checkpoints(mapped)), 0.5, seed=0)


def test_check_head_size():
    from d2nwg.data.labelled import LabelledDataset
    from d2nwg.ingest.datasets import ZooDataset
    from d2nwg.ingest.tasks import check_head_size, group_into_tasks

    datasets = {
        name: ZooDataset(name, LabelledDataset([torch.zeros(1, 4)] * k, [str(i) for i in range(k)], []), [])
        for name, k in (("d", 2), ("d3", 3))
    }
    tasks = group_into_tasks(valid_checkpoints([("a", "d", None), ("b", "d3", None)]))
    tasks[1].dataset = "d"
    check_head_size(tasks, datasets)
    tasks[1].dataset = "d3"
    with pytest.raises(ValueError, match=r"different class counts \[2, 3\]"):
        check_head_size(tasks, datasets)


def test_write_zoo_writes_the_tasks_members_and_pool(tmp_path):
    from d2nwg.ingest.tasks import group_into_tasks, split_tasks
    from d2nwg.ingest.validation import validate_checkpoints
    from d2nwg.ingest.writing import ingest_recipe, write_zoo

    root = tiny_workspace(
        tmp_path / "in",
        "checkpoint,dataset,split\na.safetensors,d1,train\nb.safetensors,d1,\nc.safetensors,d2,heldout\n",
        {"d1": 2, "d2": 2, "unused": 2},
        {"a.safetensors": tiny_mlp(0), "b.safetensors": tiny_mlp(1), "c.safetensors": tiny_mlp(2)},
    )
    settings, sources, datasets, target = tiny_stages(root)
    good, bad = validate_checkpoints(sources, datasets, target)
    tasks = group_into_tasks(good)
    splits = split_tasks(tasks, settings.heldout_fraction, settings.seed)
    recipe = ingest_recipe(settings, sources, tasks, bad)
    assert recipe["sources"] == {"a": "a.safetensors", "b": "b.safetensors", "c": "c.safetensors"}
    assert recipe["skipped"] == []
    zoo = write_zoo(tmp_path / "zoo", tasks, splits, datasets, target, InputSpec(kind="vector"), recipe)
    assert {m.id: (m.task, m.split) for m in zoo} == {"a": ("d1", "train"), "b": ("d1", "train"), "c": ("d2", "heldout")}
    assert zoo.tasks["d1"] == {"classes": ["d1/0", "d1/1"], "split": "train", "dataset": "d1"}
    assert zoo.manifest["recipe"] == recipe and sorted(zoo.manifest["classes"]) == ["d1/0", "d1/1", "d2/0", "d2/1"]
    assert torch.equal(zoo.load_member(next(m for m in zoo if m.id == "b"))["fc0.weight"], tiny_mlp(1)["fc0.weight"])
    x, y = zoo.task_data("d1", "test")
    assert torch.equal(x, datasets["d1"].xy("test")[0]) and torch.equal(y, datasets["d1"].xy("test")[1])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


# ----------------------------------------------------------------------------- tasks are datasets (issue 12, item 2)
def tiny_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "zoo", "ingest", "--checkpoints", str(root / "checkpoints"), "--datasets", str(root / "datasets"),
        "--mapping", str(root / "mapping.csv"), "--arch", "mlp", "--arch-config", json.dumps(TINY_ARCH),
        "--chunk-size", "4", "--out", str(out), *extra,
    ]  # fmt: skip


def test_epochs_of_runs_stay_on_one_side(tmp_path, capsys):
    """3 epochs of each of 10 runs, each run on its own dataset, no split column, 30% held out."""
    runs = [f"run{i}" for i in range(10)]
    files = {f"{run}_epoch{e}.safetensors": tiny_mlp(10 * i + e) for i, run in enumerate(runs) for e in range(3)}
    rows = "".join(f"{name},data_{name.split('_')[0]}\n" for name in files)
    root = tiny_workspace(tmp_path, "checkpoint,dataset\n" + rows, {f"data_{run}": 2 for run in runs}, files)
    assert main(tiny_argv(root, tmp_path / "zoo", "--heldout-fraction", "0.3")) == 0, capsys.readouterr().err
    zoo = ModelZoo.open(tmp_path / "zoo")
    sides = {run: {m.split for m in zoo if m.id.startswith(f"{run}_")} for run in runs}
    assert all(len(s) == 1 for s in sides.values()), sides  # no run on both sides
    assert sum(s == {"heldout"} for s in sides.values()) == 3 and len(zoo.tasks) == 10
    train_data = {zoo.task_dataset(t) for t, r in zoo.tasks.items() if r["split"] == "train"}
    heldout_data = {zoo.task_dataset(t) for t, r in zoo.tasks.items() if r["split"] == "heldout"}
    assert len(heldout_data) == 3 and not train_data & heldout_data and zoo.split_leaks() == {}
    assert all(len([m for m in zoo if m.task == t]) == 3 for t in zoo.tasks)  # 3 epochs = 3 members of one task
    capsys.readouterr()
    assert main(["zoo", "info", str(tmp_path / "zoo")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_info_warns_and_evaluate_refuses_a_zoo_whose_split_leaks(tmp_path, capsys):
    """A zoo ingested the old way (one task per checkpoint) holds held-out tasks of training datasets."""
    from d2nwg.ingest.tasks import IngestTask
    from d2nwg.ingest.validation import validate_checkpoints
    from d2nwg.ingest.writing import ingest_recipe, write_zoo

    root = tiny_workspace(
        tmp_path / "in", "checkpoint,dataset\na1.safetensors,d1\na2.safetensors,d1\nb1.safetensors,d2\n",
        {"d1": 2, "d2": 2}, {"a1.safetensors": tiny_mlp(0), "a2.safetensors": tiny_mlp(1), "b1.safetensors": tiny_mlp(2)},
    )  # fmt: skip
    settings, sources, datasets, target = tiny_stages(root)
    good, bad = validate_checkpoints(sources, datasets, target)
    tasks = [IngestTask(c.member_id, c.dataset, [c], None, c.member_id) for c in good]
    splits = {"a1": "train", "a2": "heldout", "b1": "heldout"}
    zoo = write_zoo(tmp_path / "zoo", tasks, splits, datasets, target, InputSpec(kind="vector"), ingest_recipe(settings, sources, tasks, bad))
    for record in zoo.manifest["tasks"].values():  # as written before tasks recorded their dataset
        record.pop("dataset")
    (zoo.root / "manifest.json").write_text(json.dumps(zoo.manifest))
    assert ModelZoo.open(zoo.root).split_leaks() == {"a2": ["a1"]}
    assert main(["zoo", "info", str(zoo.root)]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "1 of 2 held-out task(s)" in warning[0] and "'d1'" in warning[0]
    argv = ["evaluate", "--pipeline", str(tmp_path / "no_pipeline"), "--zoo", str(zoo.root), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 of 2 held-out task(s)") and "--allow-split-leak" in err and len(err.splitlines()) == 1
    assert main([*argv, "--allow-split-leak"]) == 2  # past the check: now the missing pipeline is the error
    assert "pipeline folder not found" in capsys.readouterr().err


def test_run_column_and_json_group_are_read(tmp_path):
    from d2nwg.ingest.mapping import read_mapping

    (tmp_path / "m.csv").write_text("checkpoint,dataset,run\na.pt,d1,r1\nb.pt,d2,\n")
    assert [(e.checkpoint, e.group) for e in read_mapping(tmp_path / "m.csv")] == [("a.pt", "r1"), ("b.pt", None)]
    (tmp_path / "m.json").write_text(json.dumps({"a.pt": {"dataset": "d1", "group": "g"}, "b.pt": "d2"}))
    assert [(e.dataset, e.group) for e in read_mapping(tmp_path / "m.json")] == [("d1", "g"), ("d2", None)]
    (tmp_path / "both.csv").write_text("checkpoint,dataset,run,group\na.pt,d1,r,g\n")
    with pytest.raises(ValueError, match="both a 'run' and a 'group' column"):
        read_mapping(tmp_path / "both.csv")


# ----------------------------------------------------------------------------- layouts (item 3)
def model_folder(root: Path, name: str, epochs: range, seed: int) -> None:
    """``root/name/checkpoint_<epoch:06d>/checkpoints`` (torch.save, no suffix) and ``result.json`` lines."""
    for e in epochs:
        (root / name / f"checkpoint_{e:06d}").mkdir(parents=True)
        torch.save(tiny_mlp(seed + e), root / name / f"checkpoint_{e:06d}" / "checkpoints")
    lines = [json.dumps({"epoch": e, "test_acc": 0.5 + e / 100, "timestamp": 1700000000 + e, "hostname": "h"}) for e in epochs]
    (root / name / "result.json").write_text("\n".join([*lines, "{truncated"]) + "\n")


def test_model_folders_group_epochs_per_model(tmp_path, capsys):
    from d2nwg.ingest.discovery import discover

    root = tiny_workspace(tmp_path, "checkpoint,dataset\nmodel_a,d1\nzoo/model_b,d2\n", {"d1": 2, "d2": 2}, {})
    model_folder(root / "checkpoints" / "zoo", "model_a", range(0, 4), seed=0)
    model_folder(root / "checkpoints" / "zoo", "model_b", range(0, 4), seed=10)
    model_folder(root / "checkpoints" / "zoo", "model_c", range(0, 2), seed=20)

    def files(epochs):
        warnings: list[str] = []
        sources = discover(root / "checkpoints", root / "datasets", root / "mapping.csv", warnings.append, epochs)
        return [e.checkpoint for e in sources.entries], sources, warnings

    last, _, warnings = files("last")
    assert last == ["zoo/model_a/checkpoint_000003/checkpoints", "zoo/model_b/checkpoint_000003/checkpoints"]
    assert "model folder zoo/model_c is not in the mapping; ignored" in warnings
    assert sum("line(s) without JSON" in w for w in warnings) == 2  # the truncated last line of each mapped result.json
    assert [Path(f).parent.name for f in files(2)[0]] == ["checkpoint_000002", "checkpoint_000003"] * 2
    every, sources, _ = files("all")
    assert len(every) == 8 and sources.reported[every[1]] == {"reported_test_acc": 0.51}
    with pytest.raises(ValueError, match="--epochs must be"):
        files("0")

    assert main(tiny_argv(root, tmp_path / "zoo", "--epochs", "all", "--heldout-fraction", "0.5")) == 0, capsys.readouterr().err
    zoo = ModelZoo.open(tmp_path / "zoo")
    assert sorted(m.id for m in zoo) == [f"model_{x}-e{e}" for x in "ab" for e in range(4)]
    assert {m.task for m in zoo if m.id.startswith("model_a")} == {"d1"} and len({m.split for m in zoo}) == 2
    member = next(m for m in zoo if m.id == "model_b-e2")
    assert member.metrics["reported_test_acc"] == pytest.approx(0.52) and "reported_timestamp" not in member.metrics
    assert torch.equal(zoo.load_member(member)["fc0.weight"], tiny_mlp(12)["fc0.weight"])


def test_prefixed_and_lightning_checkpoints_are_read(tmp_path, capsys):
    sd = tiny_mlp(0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lightning = {
        "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in tiny_mlp(1).items()},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [], "loops": {"fit_loop": {"epoch_progress": {}}},
        "callbacks": {}, "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1},
    }  # fmt: skip
    root = tiny_workspace(
        tmp_path, "checkpoint,dataset\ndp.pt,d1\nlight.ckpt,d1\ncompiled.safetensors,d1\n", {"d1": 2},
        {"compiled.safetensors": {f"module._orig_mod.{k}": v for k, v in tiny_mlp(2).items()}},
    )  # fmt: skip
    torch.save({f"module.{k}": v for k, v in sd.items()}, root / "checkpoints" / "dp.pt")
    torch.save(lightning, root / "checkpoints" / "light.ckpt")
    assert main(tiny_argv(root, tmp_path / "zoo")) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "stripped the key prefix" in line]
    assert len(notices) == 3 and any("'module._orig_mod.'" in n and "compiled.safetensors" in n for n in notices), err
    zoo = ModelZoo.open(tmp_path / "zoo")
    for member, seed in (("dp", 0), ("light", 1), ("compiled", 2)):
        assert torch.equal(zoo.load_member(member)["fc1.weight"], tiny_mlp(seed)["fc1.weight"])


def test_prefix_mismatch_is_named(tmp_path, capsys):
    wrapped = {f"module.{'net' if k.startswith('fc0') else 'head'}.{k}": v for k, v in tiny_mlp(0).items()}
    mixed = {**{f"model.{k}": v for k, v in tiny_mlp(1).items()}, "loss_fn.weight": torch.ones(2)}
    root = tiny_workspace(
        tmp_path, "checkpoint,dataset\nwrapped.safetensors,d1\nmixed.safetensors,d1\n", {"d1": 2},
        {"wrapped.safetensors": wrapped, "mixed.safetensors": mixed},
    )  # fmt: skip
    assert main(tiny_argv(root, tmp_path / "zoo")) == 2
    lines = {line.split(":")[0]: line for line in capsys.readouterr().err.splitlines()}
    assert "checkpoint keys start with 'module.'" in lines["bad checkpoint wrapped.safetensors"]
    assert "the architecture expects 'fc0.weight'" in lines["bad checkpoint wrapped.safetensors"]
    assert "has 'model.fc0.weight', but not every key starts with 'model.'" in lines["bad checkpoint mixed.safetensors"]


# ----------------------------------------------------------------------------- unreadable checkpoints (item 5)
def test_unsafe_pickles_are_one_clear_line_each(tmp_path, capsys):
    import argparse

    root = tiny_workspace(tmp_path, "checkpoint,dataset\nns.pt,d1\nnp.pt,d1\nfloat.pt,d1\n", {"d1": 2}, {})
    torch.save({**tiny_mlp(0), "args": argparse.Namespace(lr=0.1)}, root / "checkpoints" / "ns.pt")
    torch.save({**tiny_mlp(0), "best": np.float64(0.9)}, root / "checkpoints" / "np.pt")
    torch.save({**tiny_mlp(0), "lr": 0.1}, root / "checkpoints" / "float.pt")
    assert main(tiny_argv(root, tmp_path / "zoo")) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "Traceback" not in err
    lines = {line.split(":")[0]: line for line in err.splitlines() if line.startswith("bad checkpoint")}
    assert len(lines) == 3
    assert "'argparse.Namespace'" in lines["bad checkpoint ns.pt"]
    assert "multiarray.scalar'" in lines["bad checkpoint np.pt"]
    assert "key 'lr' holds a float" in lines["bad checkpoint float.pt"]
    assert all("safetensors" in line and str(root / "checkpoints") in line for line in lines.values())
