"""Permutation alignment (`d2nwg.zoo.alignment`): exact recovery, function preservation, zoo-level alignment."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from d2nwg.targets.architectures import build_model
from d2nwg.targets.mlp.model import MLP
from d2nwg.targets.population import population_accuracy, stack_state_dicts, train_population
from d2nwg.zoo.alignment import (
    ALIGNMENT_FILE,
    Alignment,
    align_zoo,
    align_zoo_dir,
    apply_permutation,
    distance_summary,
    invert_permutation,
    permutation_spec_for,
    read_alignment,
    weight_matching,
)
from d2nwg.zoo.model_zoo import ModelZoo

TINY_RANDOM = {
    "num_train_tasks": 8, "num_heldout_tasks": 2, "num_unseen_class_tasks": 1, "steps": 5, "group_size": 8,
    "hidden": 8, "samples_train": 10, "samples_support": 5, "samples_test": 5,
}


def _random_perms(spec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {group: torch.randperm(n, generator=g) for group, n in spec.sizes.items()}


def _conv_net() -> nn.Sequential:
    """Conv -> BN -> ReLU -> Conv -> BN -> pool -> Flatten (3x3 blocks per channel) -> Linear -> LayerNorm -> Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * 3 * 3, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 4),
    )
    with torch.no_grad():  # non-trivial norm parameters and running stats, so a wrong permutation shows
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


# ----------------------------------------------------------------------------- (a) exact recovery
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alignment_recovers_a_known_permutation_exactly(seed):
    torch.manual_seed(seed)
    original = MLP(in_features=20, hidden=(16, 12, 10), num_classes=5).state_dict()
    spec = permutation_spec_for(original)
    assert spec.sizes == {"fc0": 16, "fc1": 12, "fc2": 10}
    known = _random_perms(spec, seed + 100)
    member = apply_permutation(spec, known, original)
    assert not torch.equal(member["fc0.weight"], original["fc0.weight"])

    found = weight_matching(spec, original, member, seed=seed)
    for group, perm in known.items():
        assert torch.equal(found[group], invert_permutation(perm)), group
    restored = apply_permutation(spec, found, member)
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_reference_aligned_to_itself_is_the_identity():
    original = MLP(hidden=(16, 12)).state_dict()
    spec = permutation_spec_for(original)
    found = weight_matching(spec, original, original)
    assert all(torch.equal(p, torch.arange(len(p))) for p in found.values())


# ----------------------------------------------------------------------------- (b) function preserved
def test_permutation_preserves_the_mlp_function():
    torch.manual_seed(0)
    net = MLP(in_features=64, hidden=(32, 16), num_classes=5).eval()
    spec = permutation_spec_for(net)
    x = torch.randn(50, 64)
    permuted = copy.deepcopy(net)
    permuted.load_state_dict(apply_permutation(spec, _random_perms(spec, 1), net.state_dict()))
    assert not torch.equal(permuted.fc0.weight, net.fc0.weight)
    torch.testing.assert_close(permuted(x), net(x), atol=1e-6, rtol=0)


def test_permutation_preserves_a_conv_bn_flatten_chain():
    net = _conv_net()
    spec = permutation_spec_for(net)
    assert spec.sizes == {"0": 8, "3": 6, "8": 10}
    assert spec.axes_to_perm["8.weight"] == ("8", "3")  # the Linear's inputs: 6 blocks of 3*3 after Flatten
    assert permutation_spec_for(net.state_dict()) == spec  # inferred from the keys alone, the same spec
    x = torch.randn(4, 3, 8, 8)
    permuted = copy.deepcopy(net)
    permuted.load_state_dict(apply_permutation(spec, _random_perms(spec, 2), net.state_dict()))
    torch.testing.assert_close(permuted(x), net(x), atol=1e-6, rtol=0)

    found = weight_matching(spec, net.state_dict(), permuted.state_dict())
    back = apply_permutation(spec, found, permuted.state_dict())
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    "module, needle",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)), "Softmax"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), "grouped"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)), "Flatten"),
        (nn.Bilinear(3, 3, 2), "Bilinear"),
    ],
)
def test_unsupported_architectures_raise_a_clear_value_error(module, needle):
    with pytest.raises(ValueError, match=needle):
        permutation_spec_for(module)


def test_invalid_permutations_and_missing_tensors_are_rejected():
    sd = MLP(hidden=(8,)).state_dict()
    spec = permutation_spec_for(sd)
    with pytest.raises(ValueError, match="not a permutation"):
        apply_permutation(spec, {"fc0": [0] * 8}, sd)
    with pytest.raises(ValueError, match="groups"):
        apply_permutation(spec, {}, sd)
    with pytest.raises(ValueError, match="fc0.bias"):
        weight_matching(spec, sd, {k: v for k, v in sd.items() if k != "fc0.bias"})


def test_align_zoo_in_memory_and_its_json_round_trip():
    torch.manual_seed(0)
    sds = [MLP(hidden=(12,)).state_dict() for _ in range(4)]
    aligned, record = align_zoo(sds, reference="auto", seed=3)
    assert record.reference == "0" and record.groups == {"fc0": 12}
    assert torch.equal(record.permutations["0"]["fc0"], torch.arange(12))
    before, after = distance_summary(sds), distance_summary(list(aligned.values()))
    assert after["mean_pairwise"] < before["mean_pairwise"]
    again = Alignment.from_json(record.to_json())
    assert again.to_json() == record.to_json()
    assert all(torch.equal(again.permutations[k]["fc0"], v["fc0"]) for k, v in record.permutations.items())


def test_train_population_with_stacked_inits():
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(5,), num_classes=3)
    x, y = torch.randn(2, 10, 6), torch.randint(0, 3, (2, 10))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shared, _ = train_population(model, init, x, y, steps=3, lr=0.01)
    stacked = stack_state_dicts([init, init])
    kept = {k: v.clone() for k, v in stacked.items()}
    per_member, _ = train_population(model, stacked, x, y, steps=3, lr=0.01, stacked_init=True)
    assert all(torch.equal(shared[k], per_member[k]) for k in shared)
    assert all(torch.equal(stacked[k], kept[k]) for k in kept)  # the caller's inits are not trained in place
    with pytest.raises(ValueError, match="stacked_init"):
        train_population(model, init, x, y, steps=1, lr=0.01, stacked_init=True)


# ----------------------------------------------------------------------------- (c, d) zoo level
@pytest.fixture(scope="module")
def random_zoo(tmp_path_factory):
    from model_zoo.digits import build

    return build(tmp_path_factory.mktemp("align") / "random", init="random", **TINY_RANDOM)


@pytest.fixture(scope="module")
def aligned_zoo(random_zoo, tmp_path_factory):
    return align_zoo_dir(random_zoo.root, tmp_path_factory.mktemp("align") / "aligned", seed=0)


def test_random_init_zoo_has_no_shared_init_and_distinct_starts(random_zoo):
    assert random_zoo.init_state() is None
    assert random_zoo.manifest["recipe"]["init"] == "random"
    a, b = random_zoo.state_dicts("train")[:2]
    # 5 steps barely move a member: independent inits leave members far apart.
    assert (a["fc0.weight"] - b["fc0.weight"]).abs().mean() > 0.05


def _recomputed_test_acc(zoo: ModelZoo) -> list[float]:
    module = build_model(zoo.architecture)
    accs = []
    for m in zoo.members():
        x, y = zoo.task_data(m.task, "test")
        accs.append(float(population_accuracy(module, stack_state_dicts([zoo.load_member(m)]), x, y)[0]))
    return accs


def test_align_zoo_dir_keeps_metrics_and_tightens_the_zoo(random_zoo, aligned_zoo):
    assert [m.id for m in aligned_zoo.members()] == [m.id for m in random_zoo.members()]
    assert [m.metrics for m in aligned_zoo.members()] == [m.metrics for m in random_zoo.members()]
    assert _recomputed_test_acc(aligned_zoo) == _recomputed_test_acc(random_zoo)
    assert [m.metrics["test_acc"] for m in aligned_zoo.members()] == pytest.approx(_recomputed_test_acc(aligned_zoo))
    assert aligned_zoo.tasks == random_zoo.tasks and aligned_zoo.architecture == random_zoo.architecture
    assert (aligned_zoo.root / "data.safetensors").read_bytes() == (random_zoo.root / "data.safetensors").read_bytes()
    assert aligned_zoo.init_state() is None

    before, after = distance_summary(random_zoo.state_dicts()), distance_summary(aligned_zoo.state_dicts())
    assert after["mean_pairwise"] < before["mean_pairwise"]

    record = read_alignment(aligned_zoo.root)
    reference = random_zoo.members("train")[0].id
    assert record.reference == reference and record.seed == 0 and record.groups == {"fc0": 8}
    assert set(record.permutations) == {m.id for m in random_zoo.members()}
    assert torch.equal(record.permutations[reference]["fc0"], torch.arange(8))
    spec = permutation_spec_for(build_model(random_zoo.architecture))
    for m in random_zoo.members():  # the stored permutations reproduce the aligned members exactly
        redone = apply_permutation(spec, record.permutations[m.id], random_zoo.load_member(m))
        assert all(torch.equal(v, aligned_zoo.load_member(m.id)[k]) for k, v in redone.items())
    assert aligned_zoo.manifest["recipe"]["alignment"]["reference"] == reference


def test_align_zoo_dir_is_deterministic(random_zoo, aligned_zoo, tmp_path):
    again = align_zoo_dir(random_zoo.root, tmp_path / "again", seed=0)
    assert (again.root / ALIGNMENT_FILE).read_bytes() == (aligned_zoo.root / ALIGNMENT_FILE).read_bytes()
    for m in aligned_zoo.members():  # tensors, not bytes: safetensors does not order its metadata header
        a, b = again.load_member(m.id), aligned_zoo.load_member(m.id)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_align_zoo_dir_rejects_bad_reference_and_used_out(random_zoo, aligned_zoo, tmp_path):
    with pytest.raises(ValueError, match="not a member"):
        align_zoo_dir(random_zoo.root, tmp_path / "x", reference="nope")
    with pytest.raises(ValueError, match="already exists"):
        align_zoo_dir(random_zoo.root, aligned_zoo.root)
    chosen = random_zoo.members("heldout")[0].id
    out = align_zoo_dir(random_zoo.root, tmp_path / "by_id", reference=chosen)
    assert json.loads((out.root / ALIGNMENT_FILE).read_text())["reference"] == chosen


def test_align_zoo_dir_aligns_a_shared_init_too(tmp_path):
    from model_zoo.digits import build

    src = build(tmp_path / "shared", init="shared", **{**TINY_RANDOM, "num_train_tasks": 3, "num_heldout_tasks": 1})
    out = align_zoo_dir(src.root, tmp_path / "aligned")
    init, aligned_init = src.init_state(), out.init_state()
    assert aligned_init is not None and read_alignment(out.root).init is not None
    net, aligned_net = build_model(src.architecture).eval(), build_model(src.architecture).eval()
    net.load_state_dict(init)
    aligned_net.load_state_dict(aligned_init)
    x = torch.rand(7, 64)
    torch.testing.assert_close(aligned_net(x), net(x), atol=1e-6, rtol=0)


def test_align_zoo_dir_refuses_to_write_a_changed_function(random_zoo, tmp_path, monkeypatch):
    from d2nwg.zoo import alignment as align

    def rows_only(spec, perms, sd):  # forgets the next layer's columns: a different function
        return {k: v.index_select(0, perms["fc0"]) if k.startswith("fc0.") else v for k, v in sd.items()}

    monkeypatch.setattr(align, "apply_permutation", rows_only)
    with pytest.raises(RuntimeError, match="changed its outputs"):
        align.align_zoo_dir(random_zoo.root, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()  # written into a temp folder: nothing is left behind
