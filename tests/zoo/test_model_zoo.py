"""Behavioural tests of the zoo format (`d2nwg.zoo.model_zoo.ModelZoo`), atomic I/O and the digits recipe.

Expectations come from the documented contract (one member per task, class order
defines labels, resumable and atomic builds, one shared initialisation), never
from numbers copied out of a previous run.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import model_zoo.members as members
from d2nwg.targets.architectures import build_model
from d2nwg.utils.io import load_safetensors, read_safetensors_metadata, save_safetensors
from d2nwg.zoo.model_zoo import SPLITS, ModelZoo
from model_zoo.digits import DigitsRecipe, build


# ----------------------------------------------------------------------------- helpers
def temp_files(root: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes: names starting with '.'."""
    return [p for p in Path(root).rglob(".*")]


def copy_zoo(zoo: ModelZoo, dest: Path) -> ModelZoo:
    shutil.copytree(zoo.root, dest)
    return ModelZoo.open(dest)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: tensor {k} differs"


# ----------------------------------------------------------------------------- structure
def test_members_one_per_task_with_task_splits(tiny_digits_zoo, tiny_digits_settings):
    zoo = tiny_digits_zoo
    s = tiny_digits_settings
    heldout = s["num_heldout_tasks"] + s["num_unseen_class_tasks"]
    assert len(zoo) == s["num_train_tasks"] + heldout
    assert len(zoo.members("train")) == s["num_train_tasks"]
    assert len(zoo.members("heldout")) == heldout
    assert sorted(m.task for m in zoo) == sorted(zoo.tasks)  # each task exactly once
    for m in zoo:
        assert m.split == zoo.tasks[m.task]["split"]
        assert (zoo.root / m.file).is_file()
    # Reopening from disk gives the same index.
    reopened = ModelZoo.open(zoo.root)
    assert [(m.id, m.task, m.split, m.metrics) for m in reopened] == [(m.id, m.task, m.split, m.metrics) for m in zoo]


def test_member_files_carry_string_metadata(tiny_digits_zoo):
    zoo = tiny_digits_zoo
    for m in zoo:
        meta = read_safetensors_metadata(zoo.root / m.file)
        for key in ("task", "architecture", "seed", "split", "metrics"):
            assert isinstance(meta.get(key), str), f"{m.id}: metadata {key!r} missing or not a string"
        assert meta["task"] == m.task
        assert meta["split"] == m.split
        assert meta["seed"] == str(m.seed)
        assert json.loads(meta["architecture"]) == zoo.architecture
        assert json.loads(meta["classes"]) == zoo.tasks[m.task]["classes"]
        metrics = json.loads(meta["metrics"])
        assert metrics == m.metrics
        assert set(metrics) == {f"{s}_acc" for s in SPLITS}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_members_learned_their_tasks(tiny_digits_zoo):
    chance = 1.0 / len(next(iter(tiny_digits_zoo.tasks.values()))["classes"])
    train_accs = torch.tensor([m.metrics["train_acc"] for m in tiny_digits_zoo])
    assert train_accs.mean() > 2 * chance


def test_heldout_class_orders_are_unseen(tiny_digits_zoo, tiny_digits_settings):
    tasks = tiny_digits_zoo.tasks
    orders = {s: [tuple(t["classes"]) for t in tasks.values() if t["split"] == s] for s in ("train", "heldout")}
    s = tiny_digits_settings
    assert len(orders["heldout"]) == s["num_heldout_tasks"] + s["num_unseen_class_tasks"]
    assert not set(orders["heldout"]) & set(orders["train"])
    all_orders = orders["train"] + orders["heldout"]
    assert len(set(all_orders)) == len(all_orders)
    k = DigitsRecipe().classes_per_task
    assert all(len(o) == k and len(set(o)) == k for o in all_orders)


def test_class_order_defines_labels(tiny_digits_zoo):
    from sklearn.datasets import load_digits

    zoo = tiny_digits_zoo
    raw = load_digits()
    images = torch.tensor(raw.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(raw.target)
    pool = load_safetensors(zoo.root / "data.safetensors")
    recipe = DigitsRecipe()
    sizes = {"train": recipe.samples_train, "support": recipe.samples_support, "test": recipe.samples_test}
    for task in list(zoo.tasks)[:4]:
        classes = zoo.tasks[task]["classes"]
        for split in SPLITS:
            x, y = zoo.task_data(task, split)
            assert y.dtype == torch.long and x.shape == (len(y), 64)
            assert torch.equal(torch.bincount(y, minlength=len(classes)), torch.full((len(classes),), sizes[split]))
            for label, name in enumerate(classes):
                xc = x[y == label]
                assert torch.equal(xc, pool[f"{name}::{split}"])
                # ... and those samples really are images of digit `name`.
                dist = torch.cdist(xc, images[targets == int(name)])
                assert (dist.min(dim=1).values == 0).all(), f"{task}/{split}: label {label} is not digit {name}"


def test_unknown_data_split_is_rejected(tiny_digits_zoo):
    with pytest.raises(ValueError, match="split"):
        tiny_digits_zoo.task_data(next(iter(tiny_digits_zoo.tasks)), "validation")


# ----------------------------------------------------------------------------- weights
def test_layout_round_trips_members_exactly(tiny_digits_zoo):
    zoo = tiny_digits_zoo
    assert any(t.std != 1.0 or t.mean != 0.0 for t in zoo.layout.tensors), "build should fit layout statistics"
    members = zoo.members()
    sds = [zoo.load_member(m) for m in members]
    tokens = zoo.layout.tokenize(sds, dtype=torch.float64)
    assert tokens.shape == (len(members), zoo.layout.num_tokens, zoo.layout.chunk_size)
    for m, sd, back in zip(members, sds, zoo.layout.detokenize(tokens)):
        assert_same_state({k: sd[k] for k in zoo.layout.names}, back, m.id)
    # zoo.tokens() is the same thing restricted to a split.
    train = zoo.tokens("train")
    idx = [i for i, m in enumerate(members) if m.split == "train"]
    assert torch.allclose(train.double(), tokens[idx])


def test_injected_member_reproduces_recorded_accuracy(tiny_digits_zoo):
    zoo = tiny_digits_zoo
    for m in zoo.members("train")[:3] + zoo.members("heldout")[:2]:
        model = build_model(zoo.architecture)
        zoo.layout.inject(model, zoo.load_member(m))
        model.eval()
        x, y = zoo.task_data(m.task, "test")
        with torch.no_grad():
            acc = (model(x).argmax(-1) == y).float().mean().item()
        assert acc == pytest.approx(m.metrics["test_acc"], abs=1e-6), m.id


def test_shared_initialisation(tiny_digits_zoo):
    zoo = tiny_digits_zoo
    seed = zoo.manifest["recipe"]["seed"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fresh = build_model(zoo.architecture).state_dict()
    init = zoo.init_state()
    assert init is not None
    assert_same_state(init, dict(fresh), "init vs fresh build")
    sds = {m.id: zoo.load_member(m) for m in zoo}
    for mid, sd in sds.items():
        for k in init:
            assert not torch.equal(sd[k], init[k]), f"{mid}: {k} never left the initialisation"
    for (a, sa), (b, sb) in itertools.combinations(sds.items(), 2):
        assert any(not torch.equal(sa[k], sb[k]) for k in sa), f"{a} and {b} are identical"


# ----------------------------------------------------------------------------- resume
class Killed(Exception):
    """Stands in for the process dying."""


@pytest.mark.parametrize("where", ["train_second_group", "flush_second_group"])
def test_killed_build_resumes_to_identical_zoo(tmp_path, monkeypatch, tiny_digits_zoo, tiny_digits_settings, where):
    settings = tiny_digits_settings
    group = settings["group_size"]
    out = tmp_path / "zoo"
    calls = {"train": 0, "flush": 0, "armed": True}
    real_train, real_flush = members.train_population, ModelZoo.flush

    def dying_train(*args, **kwargs):
        calls["train"] += 1
        if calls["armed"] and where == "train_second_group" and calls["train"] == 2:
            raise Killed
        return real_train(*args, **kwargs)

    def dying_flush(self):
        calls["flush"] += 1
        if calls["armed"] and where == "flush_second_group" and calls["flush"] == 2:
            raise Killed  # member files of group 2 are written but not listed
        real_flush(self)

    monkeypatch.setattr(members, "train_population", dying_train)
    monkeypatch.setattr(ModelZoo, "flush", dying_flush)
    with pytest.raises(Killed):
        build(out, **settings)

    # The interrupted zoo is readable and lists exactly the first, completed group.
    partial = ModelZoo.open(out)
    assert [m.task for m in partial] == list(partial.tasks)[:group]
    for m in partial:
        partial.load_member(m)
    if where == "flush_second_group":
        assert len(list((out / "members").glob("*.safetensors"))) == 2 * group

    # Resume: only the unfinished groups are trained again.
    calls.update(train=0, armed=False)
    resumed = build(out, **settings)
    n_groups = -(-len(resumed.tasks) // group)
    assert calls["train"] == n_groups - 1

    reference = tiny_digits_zoo
    assert resumed.manifest["members"] == reference.manifest["members"]
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference.root / "manifest.json").read_text())
    for m in reference:
        assert_same_state(resumed.load_member(m.id), reference.load_member(m), m.id)
    assert resumed.layout.to_dict() == reference.layout.to_dict()
    assert not temp_files(out)


def test_reopening_with_other_recipe_is_rejected(tmp_path, tiny_digits_zoo, tiny_digits_settings):
    out = tmp_path / "zoo"
    shutil.copytree(tiny_digits_zoo.root, out)
    before = (out / "manifest.json").read_bytes()
    steps = tiny_digits_settings["steps"]
    with pytest.raises(ValueError, match=rf"different recipe \(steps: {steps} there, {steps + 1} now\)"):  # names it
        build(out, **{**tiny_digits_settings, "steps": steps + 1})
    assert (out / "manifest.json").read_bytes() == before
    # Same settings: nothing to do, the zoo is unchanged.
    again = build(out, **tiny_digits_settings)
    assert len(again) == len(tiny_digits_zoo)
    assert again.manifest["recipe"] == {"name": "digits", **asdict(DigitsRecipe(**tiny_digits_settings))}


def test_impossible_task_count_fails_fast(tmp_path):
    # 10 * 9 = 90 ordered pairs exist; asking for 91 must not loop forever.
    with pytest.raises(ValueError, match="91 train"):
        build(tmp_path / "zoo", classes_per_task=2, num_train_tasks=90, num_heldout_tasks=1, unseen_classes="", steps=1)
    # With 7, 8, 9 unseen: 7 * 6 = 42 ordered pairs of seen digits, 48 containing an unseen one.
    with pytest.raises(ValueError, match="42 ordered"):
        build(tmp_path / "zoo", classes_per_task=2, num_train_tasks=40, num_heldout_tasks=3, steps=1)
    with pytest.raises(ValueError, match="only 48"):
        build(tmp_path / "zoo", classes_per_task=2, num_train_tasks=4, num_heldout_tasks=1, num_unseen_class_tasks=49, steps=1)
    assert not (tmp_path / "zoo").exists()


# ----------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("keep", [0, 5, 0.5], ids=["empty", "header-cut", "half"])
def test_truncated_member_raises_naming_file(tmp_path, tiny_digits_zoo, keep):
    zoo = copy_zoo(tiny_digits_zoo, tmp_path / "zoo")
    victim = zoo.members("train")[1]
    path = zoo.root / victim.file
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match=path.name):
        zoo.load_member(victim)
    with pytest.raises(ValueError, match=path.name):
        zoo.tokens()
    # Other members are still readable.
    zoo.load_member(zoo.members("train")[0])


def test_missing_member_file_raises_value_error(tmp_path, tiny_digits_zoo):
    zoo = copy_zoo(tiny_digits_zoo, tmp_path / "zoo")
    victim = zoo.members()[0]
    (zoo.root / victim.file).unlink()
    with pytest.raises(ValueError, match=Path(victim.file).name):
        zoo.load_member(victim.id)


def test_open_rejects_non_zoo_dirs(tmp_path):
    with pytest.raises(ValueError, match="not a model zoo"):
        ModelZoo.open(tmp_path)
    with pytest.raises(ValueError):
        ModelZoo.open(tmp_path / "does-not-exist")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError):
        ModelZoo.open(tmp_path / "file.txt")


@pytest.mark.parametrize(
    "edit",
    [
        lambda text, m: text[: len(text) // 2],  # truncated JSON
        lambda text, m: "",
        lambda text, m: "[]",
        lambda text, m: "null",
        lambda text, m: json.dumps({**m, "format": "something-else/9"}),
        lambda text, m: json.dumps({k: v for k, v in m.items() if k != "members"}),
        lambda text, m: json.dumps({**m, "members": [{"id": "x", "bogus": 1}]}),
    ],
    ids=["truncated", "empty", "list", "null", "format", "no-members", "bad-member"],
)
def test_open_rejects_corrupt_manifest(tmp_path, tiny_digits_zoo, edit):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_digits_zoo.root, root)
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(edit(text, json.loads(text)))
    with pytest.raises(ValueError):
        ModelZoo.open(root)


def test_open_rejects_missing_layout(tmp_path, tiny_digits_zoo):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_digits_zoo.root, root)
    (root / "layout.json").unlink()
    with pytest.raises(ValueError, match="layout"):
        ModelZoo.open(root)


# ----------------------------------------------------------------------------- atomic writes
def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    first = {"a": torch.arange(6, dtype=torch.float32).view(2, 3)}
    save_safetensors(path, first, {"note": "first", "n": 3})
    assert not temp_files(tmp_path)
    assert_same_state(load_safetensors(path), first)
    assert read_safetensors_metadata(path) == {"note": "first", "n": "3"}
    original = path.read_bytes()

    def crash(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])  # the crash happens mid-write
        raise RuntimeError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_safetensors(path, {"a": torch.zeros(5)})
    assert path.read_bytes() == original
    assert not temp_files(tmp_path)
    # A crash on a brand-new file leaves nothing behind.
    with pytest.raises(RuntimeError):
        save_safetensors(tmp_path / "new.safetensors", {"a": torch.zeros(5)})
    assert not (tmp_path / "new.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_member_add_failure_keeps_zoo_consistent(tmp_path, tiny_digits_zoo, monkeypatch):
    zoo = copy_zoo(tiny_digits_zoo, tmp_path / "zoo")
    m = zoo.members()[0]
    sd = zoo.load_member(m)
    before = (zoo.root / m.file).read_bytes()
    bad = {**sd, next(iter(sd)): torch.full_like(sd[next(iter(sd))], float("nan"))}
    with pytest.raises(ValueError, match="NaN"):
        zoo.add(bad, m.task, seed=m.seed)
    assert (zoo.root / m.file).read_bytes() == before
    with pytest.raises(ValueError, match="unknown task"):
        zoo.add(sd, "no-such-task")
    assert ModelZoo.open(zoo.root).manifest["members"] == tiny_digits_zoo.manifest["members"]
    assert not temp_files(zoo.root)


# ----------------------------------------------------------------------------- held-out kinds
@pytest.mark.parametrize("unseen", ["7,8,9", "0", "2,5"])
def test_split_builder_never_puts_an_unseen_class_into_a_training_task(unseen):
    from model_zoo.digits import digits_tasks

    recipe = DigitsRecipe(num_train_tasks=300, num_heldout_tasks=50, num_unseen_class_tasks=50, unseen_classes=unseen)
    tasks = digits_tasks(recipe)
    hidden = set(unseen.split(","))
    train = [t["classes"] for t in tasks.values() if t["split"] == "train"]
    heldout = [t["classes"] for t in tasks.values() if t["split"] == "heldout"]
    assert len(train) == 300 and len(heldout) == 100
    assert not any(hidden & set(c) for c in train)
    with_unseen = [c for c in heldout if hidden & set(c)]
    assert len(with_unseen) == 50  # exactly the unseen-class tasks; unseen-order tasks use seen digits only
    orders = [tuple(c) for c in train + heldout]
    assert len(set(orders)) == len(orders)


def test_task_kind_is_derived_from_the_training_tasks(tiny_digits_zoo, tiny_digits_settings):
    zoo = tiny_digits_zoo
    kinds = [zoo.task_kind(t) for t in zoo.tasks]
    s = tiny_digits_settings
    assert kinds.count("train") == s["num_train_tasks"]
    assert kinds.count("unseen_order") == s["num_heldout_tasks"]
    assert kinds.count("unseen_classes") == s["num_unseen_class_tasks"]
    seen = zoo.train_classes()
    for task, kind in zip(zoo.tasks, kinds):
        novel = [c for c in zoo.tasks[task]["classes"] if c not in seen]
        assert (kind == "unseen_classes") == bool(novel) or kind == "train"


@pytest.mark.parametrize("bad", ["7,x", "10", "3,3"])
def test_bad_unseen_classes_are_rejected(bad):
    from model_zoo.digits import digits_tasks

    with pytest.raises(ValueError, match="unseen_classes"):
        digits_tasks(DigitsRecipe(unseen_classes=bad))


def test_recipe_zoos_record_no_dataset_and_never_leak(tiny_digits_zoo):
    """Recipe tasks draw from one class pool (no dataset per task): the split-leak check has nothing to flag."""
    assert all(tiny_digits_zoo.task_dataset(t) is None for t in tiny_digits_zoo.tasks)
    assert tiny_digits_zoo.split_leaks() == {} and tiny_digits_zoo.split_leak_message() is None
