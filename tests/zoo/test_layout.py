"""Behavioural tests of `d2nwg.zoo.layout.WeightLayout`, the weight tokenizer.

The expectations are derived from the layout's contract (token geometry, exact
round trip, validation before any write), never copied from a previous run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from d2nwg.zoo.layout import TensorSpec, WeightLayout, dtype_name

HALF = [torch.float16, torch.bfloat16]
FLOATS = [torch.float32, *HALF]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# ----------------------------------------------------------------------------- helpers
def make_sd(shapes, dtype=torch.float32, *, mean=0.0, std=1.0, seed=0, zero_frac=0.0):
    """A state_dict of normal tensors N(mean, std) (computed in float64, then cast), with some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
        if zero_frac:
            x = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < zero_frac, 0.0, x)
        sd[name] = x.to(dtype)
    return sd


def make_zoo(shapes, dtype=torch.float32, n=3, **kw):
    return [make_sd(shapes, dtype, seed=i, **kw) for i in range(n)]


def assert_sd_equal(actual, expected):
    assert list(actual) == list(expected)
    for name, value in expected.items():
        got = actual[name]
        assert got.dtype == value.dtype, name
        assert got.shape == value.shape, name
        assert torch.equal(got, value), f"{name}: max diff {(got.double() - value.double()).abs().max()}"


def roundtrip(layout, sds, **kw):
    normalize = kw.get("normalize", True)
    return layout.detokenize(layout.tokenize(sds, **kw), normalize=normalize)


def expected_tokens(layout, sds, normalize=True):
    """What every token must hold according to its metadata: (normalised) values of one tensor, zero padded."""
    c = layout.chunk_size
    batch = []
    for sd in sds:
        flats = []
        for spec in layout.tensors:
            flat = sd[spec.name].detach().double().reshape(-1)
            flats.append((flat - spec.mean) / spec.std if normalize else flat)
        rows = []
        for layer, offset in zip(layout.token_layer.tolist(), layout.token_offset.tolist()):
            seg = flats[layer][offset * c : (offset + 1) * c]
            rows.append(nn.functional.pad(seg, (0, c - seg.numel())))
        batch.append(torch.stack(rows) if rows else torch.zeros(0, c, dtype=torch.float64))
    return torch.stack(batch)


def check_geometry(layout, tokens, batch):
    """Shape, metadata and padding invariants of ``tokens = layout.tokenize(<batch state_dicts>)``."""
    c = layout.chunk_size
    counts = [math.ceil(spec.numel / c) for spec in layout.tensors]
    t = sum(counts)
    assert layout.tokens_per_tensor() == counts
    assert layout.num_tokens == t
    assert layout.num_params == sum(spec.numel for spec in layout.tensors)
    assert tuple(tokens.shape) == (batch, t, c)

    layer, offset = layout.token_layer, layout.token_offset
    assert layer.shape == (t,) and offset.shape == (t,)
    assert not layer.is_floating_point() and not offset.is_floating_point()
    if t:
        assert bool((layer[1:] >= layer[:-1]).all()), "layer ids must be nondecreasing"
        assert 0 <= int(layer.min()) and int(layer.max()) < len(layout.tensors)
    for i, n in enumerate(counts):
        mask = layer == i
        assert int(mask.sum()) == n
        assert torch.equal(offset[mask], torch.arange(n)), f"offsets of tensor {i} must restart at 0"

    # Padding: positions past a tensor's last number are exactly zero, in every member.
    numel = torch.tensor([spec.numel for spec in layout.tensors], dtype=torch.long)[layer] if t else torch.zeros(0)
    position = offset[:, None] * c + torch.arange(c)[None, :]
    pad = position >= numel[:, None] if t else torch.zeros(0, c, dtype=torch.bool)
    assert bool((tokens[:, pad] == 0).all())
    assert int(pad.sum()) == t * c - layout.num_params


def fitted(shapes, dtype, *, mean, std, chunk_size=8, zero_frac=0.1, n=3):
    zoo = make_zoo(shapes, dtype, n=n, mean=mean, std=std, zero_frac=zero_frac)
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=chunk_size).fit_stats(zoo)
    return layout, zoo


SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 7), "scale": (), "one": (1,)}
STATS = [(0.05, 0.1), (1.0, 0.02), (-3.3, 0.7), (250.0, 3.0), (0.0, 1e-3)]


# ----------------------------------------------------------------------------- exact round trip
@pytest.mark.parametrize("mean,std", STATS)
@pytest.mark.parametrize("dtype", FLOATS, ids=DTYPE_IDS.get)
def test_roundtrip_exact_with_float64_tokens(dtype, mean, std):
    layout, zoo = fitted(SHAPES, dtype, mean=mean, std=std)
    tokens = layout.tokenize(zoo, dtype=torch.float64)
    # the statistics are really used, so this is not an identity transform
    assert not torch.equal(tokens, layout.tokenize(zoo, normalize=False, dtype=torch.float64))
    assert tokens.dtype == torch.float64
    valid = tokens[:, expected_tokens(layout, zoo[:1])[0].ne(0).any(-1)]
    assert valid.abs().mean() < 3, "normalised tokens should be O(1)"
    for got, want in zip(layout.detokenize(tokens), zoo):
        assert_sd_equal(got, want)


@pytest.mark.parametrize("mean,std", STATS)
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
def test_roundtrip_exact_for_half_with_default_float32_tokens(dtype, mean, std):
    layout, zoo = fitted(SHAPES, dtype, mean=mean, std=std)
    # Documented exception: non-zero values ~2**16 times smaller than the mean; snap those (rare) to 0.
    for sd in zoo:
        for name, x in sd.items():
            sd[name] = torch.where(x.double().abs() < 2**-10 * abs(mean), torch.zeros_like(x), x)
    tokens = layout.tokenize(zoo)
    assert tokens.dtype == torch.float32
    for got, want in zip(layout.detokenize(tokens), zoo):
        assert_sd_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_zeros_come_back_exactly_zero(dtype):
    # Zero-initialised biases in a zoo with a non-trivial mean: a common case that must stay exact.
    zoo = make_zoo({"w": (64,)}, torch.float32, mean=0.9, std=0.03, zero_frac=0.3)
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=16).fit_stats(zoo)
    for got, want in zip(roundtrip(layout, zoo, dtype=dtype), zoo):
        zero = want["w"] == 0
        assert zero.any()
        assert bool((got["w"][zero] == 0).all())
        if dtype == torch.float64:
            assert torch.equal(got["w"], want["w"])


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float64], ids=DTYPE_IDS.get)
def test_roundtrip_exact_without_normalization(dtype):
    sd = make_sd(SHAPES, dtype, mean=3.0, std=100.0, zero_frac=0.1)
    layout = WeightLayout.from_state_dict(sd, chunk_size=4).fit_stats([sd])
    tok_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tokens = layout.tokenize(sd, normalize=False, dtype=tok_dtype)
    assert torch.equal(tokens.double(), expected_tokens(layout, [sd], normalize=False))
    assert_sd_equal(layout.detokenize(tokens, normalize=False)[0], sd)


def test_tokens_hold_normalised_values_per_metadata():
    layout, zoo = fitted(SHAPES, torch.float32, mean=0.5, std=0.2, chunk_size=6)
    tokens = layout.tokenize(zoo, dtype=torch.float64)
    assert torch.equal(tokens, expected_tokens(layout, zoo))
    # The float32 tokens are the float64 ones rounded once.
    assert torch.equal(layout.tokenize(zoo), tokens.float())


def test_batch_tokenization_is_per_member():
    layout, zoo = fitted(SHAPES, torch.float32, mean=0.1, std=0.5)
    batch = layout.tokenize(zoo)
    singles = torch.cat([layout.tokenize(sd) for sd in zoo])  # a bare Mapping counts as a batch of one
    assert torch.equal(batch, singles)
    # detokenize accepts an unbatched [T, C] too
    assert_sd_equal(layout.detokenize(batch[1])[0], layout.detokenize(batch)[1])


def test_unflatten_is_the_batched_differentiable_inverse():
    layout, zoo = fitted(SHAPES, torch.float32, mean=0.1, std=0.5)
    tokens = layout.tokenize(zoo).requires_grad_(True)
    stacked = layout.unflatten(tokens)
    for b, sd in enumerate(zoo):
        for name, value in sd.items():
            torch.testing.assert_close(stacked[name][b], value)
    sum(v.sum() for v in stacked.values()).backward()
    # the gradient is each tensor's std on real entries and zero on padding
    std = torch.tensor([spec.std for spec in layout.tensors])[layout.token_layer]
    torch.testing.assert_close(tokens.grad[0], layout.padding_mask() * std[:, None])


# ----------------------------------------------------------------------------- statistics
def test_fit_stats_are_exactly_invertible_and_close_to_the_zoo_moments():
    zoo = make_zoo({"w": (50, 40)}, torch.float32, n=4, mean=0.37, std=0.05)
    layout = WeightLayout.from_state_dict(zoo[0])
    assert layout.fit_stats(zoo) is layout
    spec = layout.tensors[0]
    pooled = torch.cat([sd["w"].double().reshape(-1) for sd in zoo])
    true_mean, true_std = pooled.mean().item(), pooled.std(unbiased=False).item()
    assert abs(spec.mean - true_mean) <= 2**-23 * abs(true_mean)
    assert float(torch.tensor(spec.mean, dtype=torch.float32)) == spec.mean
    assert math.log2(spec.std) == round(math.log2(spec.std)), "std must be a power of two"
    assert 2**-0.5 <= spec.std / true_std <= 2**0.5
    tokens = layout.tokenize(zoo, dtype=torch.float64)
    assert abs(tokens.mean().item()) < 0.05
    assert 0.6 < tokens.std().item() < 1.5


def test_constant_tensor_keeps_unit_scale():
    zoo = [{"b": torch.full((5,), 0.25), "w": torch.randn(5)} for _ in range(3)]
    layout = WeightLayout.from_state_dict(zoo[0]).fit_stats(zoo)
    b = layout.tensors[0]
    assert (b.mean, b.std) == (0.25, 1.0)
    assert torch.equal(layout.tokenize(zoo)[:, 0, :5], torch.zeros(3, 5))
    for got, want in zip(roundtrip(layout, zoo, dtype=torch.float64), zoo):
        assert_sd_equal(got, want)


def test_fit_stats_validates_and_needs_members():
    sd = make_sd({"w": (4,)})
    layout = WeightLayout.from_state_dict(sd)
    with pytest.raises(ValueError, match="at least one"):
        layout.fit_stats([])
    bad = {"w": torch.tensor([1.0, float("nan"), 0.0, 0.0])}
    with pytest.raises(ValueError, match="'w'"):
        layout.fit_stats([sd, bad])


def test_residual_scale_measures_the_spread_around_the_element_wise_mean():
    # Members share a large initialisation and differ by small deltas (an adapter zoo from one warm start).
    g = torch.Generator().manual_seed(0)
    init = torch.randn(30, 20, generator=g)
    zoo = [{"w": init + 0.01 * torch.randn(30, 20, generator=g)} for _ in range(6)]
    tensor = WeightLayout.from_state_dict(zoo[0]).fit_stats(zoo)
    residual = WeightLayout.from_state_dict(zoo[0]).fit_stats(zoo, scale="residual")
    stacked = torch.stack([sd["w"].double() for sd in zoo])
    delta_std = (stacked - stacked.mean(0)).pow(2).mean().sqrt().item()
    assert 2**-0.5 <= residual.tensors[0].std / delta_std <= 2**0.5
    assert tensor.tensors[0].std / residual.tensors[0].std >= 32  # about 1 / 0.01
    assert residual.tensors[0].mean == tensor.tensors[0].mean
    # what the VAE encodes (tokens minus their element-wise mean) has unit scale only with "residual"
    tokens = residual.tokenize(zoo, dtype=torch.float64)
    assert 0.6 < (tokens - tokens.mean(0)).std().item() < 1.5
    for got, want in zip(roundtrip(residual, zoo, dtype=torch.float64), zoo):
        assert_sd_equal(got, want)


def test_scale_is_kept_by_refits_and_serialisation():
    zoo = make_zoo({"w": (8, 4)}, torch.float32, n=3, mean=0.0, std=1.0)
    layout = WeightLayout.from_state_dict(zoo[0]).fit_stats(zoo, scale="residual")
    clone = WeightLayout.from_json(layout.to_json())
    assert clone.scale == "residual" and clone == layout
    assert clone.fit_stats(zoo).scale == "residual"  # a refit without a scale keeps the layout's
    assert "scale" not in WeightLayout.from_state_dict(zoo[0]).to_dict()  # the default is not written
    with pytest.raises(ValueError, match="unknown scale 'element'"):
        layout.fit_stats(zoo, scale="element")
    with pytest.raises(ValueError, match="unknown scale"):
        WeightLayout.from_dict({**layout.to_dict(), "scale": "element"})


# ----------------------------------------------------------------------------- geometry
GEOMETRY = [
    pytest.param({"s": ()}, 4, id="scalar"),
    pytest.param({"s": ()}, 1, id="scalar-chunk1"),
    pytest.param({"x": (1,)}, 8, id="one-element"),
    pytest.param({"x": (3,)}, 4, id="smaller-than-chunk"),
    pytest.param({"x": (4,)}, 4, id="exactly-one-chunk"),
    pytest.param({"x": (10,)}, 4, id="larger-than-chunk"),
    pytest.param({"x": (2, 8), "y": (3, 4)}, 4, id="exact-multiples"),
    pytest.param({"x": (3, 5, 7), "b": (5,), "s": ()}, 32, id="mixed"),
    pytest.param({"x": (6, 5), "b": (6,)}, 5, id="row-per-token"),
    pytest.param({"e": (0, 3), "x": (5,)}, 4, id="empty-tensor"),
    pytest.param({f"layer{i}.weight": (i % 7 + 1, i % 3 + 1) for i in range(50)}, 3, id="50-layers"),
]


@pytest.mark.parametrize("shapes,chunk", GEOMETRY)
@pytest.mark.parametrize("normalize", [True, False])
def test_geometry_and_padding(shapes, chunk, normalize):
    zoo = make_zoo(shapes, n=2, mean=0.7, std=0.3)
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=chunk).fit_stats(zoo)
    assert layout.names == list(shapes)
    tokens = layout.tokenize(zoo, normalize=normalize, dtype=torch.float64)
    check_geometry(layout, tokens, batch=2)
    assert torch.equal(tokens, expected_tokens(layout, zoo, normalize=normalize))
    for got, want in zip(layout.detokenize(tokens, normalize=normalize), zoo):
        assert_sd_equal(got, want)


def test_linear_rows_are_tokens():
    net = nn.Linear(5, 4)
    layout = WeightLayout.from_module(net, include=["weight"], chunk_size=5)
    tokens = layout.tokenize(net.state_dict(), normalize=False)
    assert torch.equal(tokens[0], net.weight.detach())
    assert torch.equal(layout.token_offset, torch.arange(4))


def test_token_metadata_is_stable():
    layout = WeightLayout.from_state_dict(make_sd(SHAPES), chunk_size=3)
    assert torch.equal(layout.token_layer, layout.token_layer)
    assert torch.equal(layout.token_offset, layout.token_offset)
    clone = WeightLayout.from_json(layout.to_json())
    assert torch.equal(clone.token_layer, layout.token_layer)


@pytest.mark.parametrize(
    "shape",
    [pytest.param((2, 10, 4), id="wrong-T"), pytest.param((2, 9, 3), id="wrong-C"), pytest.param((1, 2, 9, 4), id="4d"),
     pytest.param((36,), id="1d")],
)
def test_detokenize_rejects_wrong_token_shape(shape):
    layout = WeightLayout.from_state_dict(make_sd({"x": (9, 4)}), chunk_size=4)
    assert layout.num_tokens == 9
    with pytest.raises(ValueError, match="expected"):
        layout.detokenize(torch.zeros(shape))


# ----------------------------------------------------------------------------- selection
def selection_sd():
    return {
        "fc1.weight": torch.randn(4, 3),
        "fc1.bias": torch.randn(4),
        "bn.weight": torch.randn(4),
        "bn.running_mean": torch.randn(4),
        "bn.num_batches_tracked": torch.tensor(7),
        "attn.q.base.weight": torch.randn(2, 2),
        "attn.q.lora_A.weight": torch.randn(1, 2),
        "attn.q.lora_B.weight": torch.randn(2, 1),
        "fc2.weight": torch.randn(2, 4).half(),
        "fc2.bias": torch.randn(2).double(),
        "mask": torch.ones(3, dtype=torch.bool),
    }


FLOAT_NAMES = [k for k, v in selection_sd().items() if v.is_floating_point()]


@pytest.mark.parametrize(
    "include,exclude,expected",
    [
        (("*",), (), FLOAT_NAMES),
        (("fc*.weight",), (), ["fc1.weight", "fc2.weight"]),
        (("*.lora_A.*",), (), ["attn.q.lora_A.weight"]),
        (("*.lora_*",), (), ["attn.q.lora_A.weight", "attn.q.lora_B.weight"]),
        (("fc*",), ("*.bias",), ["fc1.weight", "fc2.weight"]),
        (("*",), ("bn.*", "*.lora_*", "fc?.*"), ["attn.q.base.weight"]),
        # order follows the state_dict, not the patterns
        (("fc2.*", "bn.*", "fc1.weight"), (), ["fc1.weight", "bn.weight", "bn.running_mean", "fc2.weight", "fc2.bias"]),
        (("attn.q.lora_?.weight",), ("*_B*",), ["attn.q.lora_A.weight"]),
    ],
)
def test_include_exclude_globs(include, exclude, expected):
    sd = selection_sd()
    layout = WeightLayout.from_state_dict(sd, include=include, exclude=exclude)
    assert layout.names == expected
    for spec in layout.tensors:
        assert spec.shape == tuple(sd[spec.name].shape)
        assert spec.dtype == dtype_name(sd[spec.name].dtype)
    assert_sd_equal(roundtrip(layout, sd, dtype=torch.float64)[0], {k: sd[k] for k in expected})


@pytest.mark.parametrize(
    "include,exclude",
    [
        (("nothing*",), ()),
        (("FC1.*",), ()),  # case-sensitive
        (("*num_batches_tracked", "mask"), ()),  # only non-floating tensors
        (("*",), ("*",)),
    ],
)
def test_selection_matching_nothing_raises(include, exclude):
    with pytest.raises(ValueError, match="no floating tensor matches"):
        WeightLayout.from_state_dict(selection_sd(), include=include, exclude=exclude)


def test_from_module_matches_state_dict_and_skips_integer_buffers():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    layout = WeightLayout.from_module(net, chunk_size=5)
    assert layout == WeightLayout.from_state_dict(net.state_dict(), chunk_size=5)
    assert "1.num_batches_tracked" not in layout.names
    assert layout.names == [k for k, v in net.state_dict().items() if v.is_floating_point()]


def test_dtype_names():
    for dtype in [*FLOATS, torch.float64]:
        assert WeightLayout.from_state_dict({"x": torch.zeros(2, dtype=dtype)}).tensors[0].dtype == dtype_name(dtype)
    with pytest.raises(ValueError, match="unsupported"):
        dtype_name(torch.int32)


# ----------------------------------------------------------------------------- validation errors
def bad_value(kind, x):
    flat = x.detach().clone().reshape(-1)
    flat[-1] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    return flat.reshape(x.shape)


def corrupt(sd, name, how):
    """A copy of ``sd`` where tensor ``name`` is missing, misshapen or non-finite."""
    sd = dict(sd)
    if how == "missing":
        del sd[name]
    elif how == "shape":
        sd[name] = torch.zeros(*sd[name].shape, 2)
    else:
        sd[name] = bad_value(how, sd[name])
    return sd


ERRORS = {"missing": "missing", "shape": "shape", "nan": "NaN or Inf", "inf": "NaN or Inf", "-inf": "NaN or Inf"}


@pytest.mark.parametrize("how", list(ERRORS))
@pytest.mark.parametrize("name", ["a.weight", "scale"])
def test_invalid_state_dict_raises_naming_the_tensor(how, name):
    sd = make_sd(SHAPES)
    layout = WeightLayout.from_state_dict(sd)
    bad = corrupt(sd, name, how)
    for call in (layout.validate, layout.select, layout.tokenize, lambda d: layout.fit_stats([d])):
        with pytest.raises(ValueError, match=f"'{name}'.*{ERRORS[how]}|{ERRORS[how]}.*'{name}'"):
            call(bad)
    # in a batch the message says which member is bad
    with pytest.raises(ValueError, match=f"state_dict 1: .*'{name}'"):
        layout.tokenize([sd, bad])


def test_validate_strict_flags_unexpected_keys():
    sd = selection_sd()
    layout = WeightLayout.from_state_dict(sd, include=["fc*"])
    layout.validate(sd)  # extra keys are fine by default
    with pytest.raises(ValueError, match="unexpected tensor 'attn.q.base.weight'"):
        layout.validate(sd, strict=True)
    layout.validate({k: sd[k] for k in layout.names}, strict=True)
    assert list(layout.select(sd)) == layout.names


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: WeightLayout([]), id="no-tensors"),
        pytest.param(lambda: WeightLayout([TensorSpec("a", (1,)), TensorSpec("a", (2,))]), id="duplicate"),
        pytest.param(lambda: WeightLayout([TensorSpec("a", (1,))], chunk_size=0), id="chunk-0"),
        pytest.param(lambda: WeightLayout([TensorSpec("a", (1,))], chunk_size=-3), id="chunk-negative"),
        pytest.param(lambda: WeightLayout.from_state_dict({"a": torch.zeros(1)}).tokenize([]), id="empty-batch"),
    ],
)
def test_invalid_construction_raises(build):
    with pytest.raises(ValueError):
        build()


# ----------------------------------------------------------------------------- inject
def make_net(seed, last=3, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, last, bias=bias))


def module_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_inject_reproduces_the_reference_module():
    ref = make_net(1)
    with torch.no_grad():  # non-trivial BN buffers so that they matter in eval mode
        ref[1].running_mean.uniform_(-1, 1)
        ref[1].running_var.uniform_(0.5, 2)
    zoo = [module_state(make_net(s)) for s in (2, 3)] + [module_state(ref)]
    layout = WeightLayout.from_module(ref, chunk_size=8).fit_stats(zoo)
    assert "1.running_mean" in layout.names
    target = make_net(4)
    x = torch.randn(16, 4)
    ref.eval(), target.eval()
    assert not torch.equal(target(x), ref(x))
    restored = layout.detokenize(layout.tokenize(module_state(ref), dtype=torch.float64))[0]
    assert layout.inject(target, restored) is target
    assert torch.equal(target(x), ref(x))
    assert_sd_equal(module_state(target), module_state(ref))


def test_inject_partial_layout_leaves_other_tensors_alone():
    ref, target = make_net(1), make_net(2)
    before = module_state(target)
    layout = WeightLayout.from_module(ref, include=["*.weight"])
    layout.inject(target, ref.state_dict())
    after = module_state(target)
    for name in before:
        expected = ref.state_dict()[name] if name in layout.names else before[name]
        assert torch.equal(after[name], expected), name


INJECT_FAILURES = {
    # (how to break, error fragment); the bad tensor is always the LAST one of the layout
    "sd-missing": "missing tensor '3.bias'",
    "sd-shape": "'3.bias' has shape",
    "sd-nan": "'3.bias' contains NaN",
    "module-missing": "no parameter or buffer '3.bias'",
    "module-shape": "module tensor '3.bias' has shape",
}


@pytest.mark.parametrize("failure", list(INJECT_FAILURES))
def test_failed_inject_writes_nothing(failure):
    donor = make_net(1)
    layout = WeightLayout.from_module(donor)
    assert layout.names[-1] == "3.bias"
    sd = module_state(donor)
    target = make_net(2, bias=failure != "module-missing")
    if failure.startswith("sd-"):
        sd = corrupt(sd, "3.bias", {"sd-missing": "missing", "sd-shape": "shape", "sd-nan": "nan"}[failure])
    if failure == "module-shape":
        target[3].bias = nn.Parameter(torch.zeros(5))
    before = module_state(target)
    with pytest.raises(ValueError, match=INJECT_FAILURES[failure]):
        layout.inject(target, sd)
    assert_sd_equal(module_state(target), before)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 6, bias=False)
        self.head.weight = self.emb.weight


def test_inject_into_module_with_tied_weights():
    ref, target = Tied(), Tied()
    layout = WeightLayout.from_module(ref)
    assert layout.names == ["emb.weight", "head.weight"]  # state_dict lists both aliases
    layout.inject(target, layout.detokenize(layout.tokenize(ref.state_dict()))[0])
    assert target.head.weight is target.emb.weight
    assert torch.equal(target.emb.weight, ref.emb.weight)


# ----------------------------------------------------------------------------- serialisation
def fitted_layout():
    layout, _ = fitted(SHAPES, torch.bfloat16, mean=0.3, std=0.07, chunk_size=5)
    layout.tensors[0].dtype = "float16"  # mixed dtypes survive too
    return layout


def test_json_roundtrip():
    layout = fitted_layout()
    text = layout.to_json()
    data = json.loads(text)
    assert data["chunk_size"] == 5 and [t["name"] for t in data["tensors"]] == layout.names
    clone = WeightLayout.from_json(text)
    assert clone == layout
    assert [(t.mean, t.std) for t in clone.tensors] == [(t.mean, t.std) for t in layout.tensors]
    assert clone.to_json() == text
    sd = make_sd(SHAPES, mean=0.3, std=0.07)
    assert torch.equal(clone.tokenize(sd), layout.tokenize(sd))
    assert clone != WeightLayout.from_json(text.replace('"chunk_size": 5', '"chunk_size": 6'))


def test_save_load_roundtrip(tmp_path):
    layout = fitted_layout()
    path = tmp_path / "sub" / "layout.json"
    layout.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["layout.json"], "no temp files left behind"
    loaded = WeightLayout.load(path)
    assert loaded == layout
    sd = make_sd(SHAPES, torch.bfloat16, mean=0.3, std=0.07)
    assert torch.equal(loaded.tokenize(sd), layout.tokenize(sd))
    layout.save(path)  # overwriting is fine
    assert WeightLayout.load(path) == layout


def test_load_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        WeightLayout.load(tmp_path / "nope.json")
    path = tmp_path / "layout.json"
    fitted_layout().save(path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError):
        WeightLayout.load(path)


def mutate(key, value):
    def apply(data):
        target = data if key == "chunk_size" else data["tensors"][0]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
        return json.dumps(data)

    return apply


CORRUPT_JSON = {
    "garbage": lambda d: "not json at all",
    "truncated": lambda d: json.dumps(d)[:40],
    "list": lambda d: "[]",
    "null": lambda d: "null",
    "number": lambda d: "3",
    "no-tensors-key": lambda d: json.dumps({"chunk_size": 4}),
    "tensors-string": lambda d: json.dumps({"chunk_size": 4, "tensors": "abc"}),
    "tensors-empty": lambda d: json.dumps({"chunk_size": 4, "tensors": []}),
    "no-chunk": mutate("chunk_size", KeyError),
    "chunk-zero": mutate("chunk_size", 0),
    "chunk-text": mutate("chunk_size", "x"),
    "no-name": mutate("name", KeyError),
    "no-shape": mutate("shape", KeyError),
    "shape-null": mutate("shape", None),
    "shape-text": mutate("shape", ["a"]),
    "shape-negative": mutate("shape", [-3, 5]),
    "dtype-int": mutate("dtype", "int8"),
    "dtype-null": mutate("dtype", None),
    "std-zero": mutate("std", 0.0),
    "std-negative": mutate("std", -1.0),
    "std-text": mutate("std", "big"),
    "mean-nan": lambda d: json.dumps(d).replace('"mean": ' + json.dumps(d["tensors"][0]["mean"]), '"mean": NaN', 1),
    "unknown-field": mutate("colour", "red"),
}


@pytest.mark.parametrize("how", list(CORRUPT_JSON))
def test_corrupted_json_raises_value_error(how):
    data = fitted_layout().to_dict()
    text = CORRUPT_JSON[how](data)
    with pytest.raises(ValueError):
        WeightLayout.from_json(text)


# ----------------------------------------------------------------------------- properties
FINFO_MAX = {torch.float32: 3.0e38, torch.float16: 6.0e4, torch.bfloat16: 3.0e38}
# Below |x| < EXACT_BELOW * |mean| a non-zero value may lose its low bits (documented); None: never.
EXACT_BELOW = {
    (torch.float32, torch.float64): 2.0**-26,
    (torch.float16, torch.float64): None,
    (torch.bfloat16, torch.float64): 2.0**-40,
    (torch.float16, torch.float32): 2.0**-10,
    (torch.bfloat16, torch.float32): 2.0**-13,
}


@st.composite
def tensor_values(draw, shape, dtype, batch, extremes):
    """``batch`` tensors: normals at a random scale (tiny to huge) with a random offset, plus special values."""
    seed = draw(st.integers(0, 2**31 - 1))
    lo, hi = (-7, 4) if dtype == torch.float16 else (-30, 30)
    scale = 10.0 ** draw(st.integers(lo, hi))
    offset = draw(st.sampled_from([0.0, 0.5, 1.0, -3.0, 100.0]))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((batch, *shape), generator=g, dtype=torch.float64) + offset) * scale
    flat = x.reshape(-1)
    fmax = FINFO_MAX[dtype]
    specials = [0.0, -0.0, scale * 2.0**-20, -scale * 2.0**20, scale * 7.0]
    if extremes:
        tiny = torch.finfo(dtype).tiny
        specials += [fmax, -fmax, tiny, tiny / 8, -tiny * 3, 1e-30, 1.0]
    for _ in range(draw(st.integers(0, min(4, flat.numel())))):
        idx = draw(st.integers(0, flat.numel() - 1))
        flat[idx] = draw(st.sampled_from(specials))
    x = x.clamp(-fmax, fmax).to(dtype)
    assert torch.isfinite(x).all()
    return list(x.unbind(0))


@st.composite
def zoos(draw, dtypes=FLOATS, extremes=True, allow_empty=True):
    n_tensors = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    chunk = draw(st.integers(1, 64))
    min_dim = 0 if allow_empty else 1
    members = [{} for _ in range(batch)]
    for i in range(n_tensors):
        shape = tuple(draw(st.lists(st.integers(min_dim, 6), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(dtypes))
        for sd, value in zip(members, draw(tensor_values(shape, dtype, batch, extremes))):
            sd[f"t{i}.w"] = value
    return members, chunk


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(case=zoos())
def test_property_geometry(case):
    zoo, chunk = case
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=chunk).fit_stats(zoo)
    assert layout.names == list(zoo[0])
    tokens = layout.tokenize(zoo, dtype=torch.float64)
    check_geometry(layout, tokens, batch=len(zoo))
    assert torch.equal(tokens, expected_tokens(layout, zoo))


@PROPERTY
@given(case=zoos(), tok_dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_exact_roundtrip_without_normalization(case, tok_dtype):
    zoo, chunk = case
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=chunk)
    for got, want in zip(roundtrip(layout, zoo, normalize=False, dtype=tok_dtype), zoo):
        assert_sd_equal(got, want)


def check_normalized_roundtrip(zoo, chunk, tok_dtype):
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=chunk).fit_stats(zoo)
    restored = roundtrip(layout, zoo, dtype=tok_dtype)
    for got_sd, want_sd in zip(restored, zoo):
        assert list(got_sd) == list(want_sd)
        for spec in layout.tensors:
            got, want = got_sd[spec.name], want_sd[spec.name]
            assert got.dtype == want.dtype and got.shape == want.shape
            below = EXACT_BELOW[(want.dtype, tok_dtype)]
            w = want.double()
            excused = torch.zeros_like(w, dtype=torch.bool)
            if below is not None:
                excused = (w != 0) & (w.abs() < below * abs(spec.mean))
            diff = (got.double() - w).abs()
            assert torch.equal(got[~excused], want[~excused]), (spec, w[diff > 0], got.double()[diff > 0])
            # the excused tiny values are still off by no more than float32 rounding of the mean
            assert bool((diff[excused] <= 2.0**-20 * abs(spec.mean)).all()), spec


@PROPERTY
@given(case=zoos(extremes=True))
def test_property_exact_roundtrip_float64_tokens(case):
    check_normalized_roundtrip(*case, torch.float64)


@PROPERTY
@given(case=zoos(dtypes=HALF, extremes=False))
def test_property_exact_roundtrip_half_float32_tokens(case):
    check_normalized_roundtrip(*case, torch.float32)


@settings(max_examples=40, deadline=None)
@given(case=zoos(extremes=False))
def test_property_json_roundtrip_preserves_tokenization(case):
    zoo, chunk = case
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=chunk).fit_stats(zoo)
    clone = WeightLayout.from_json(layout.to_json())
    assert clone == layout
    assert torch.equal(clone.tokenize(zoo, dtype=torch.float64), layout.tokenize(zoo, dtype=torch.float64))



def test_head_names_are_the_last_modules_tensors():
    sd = {"body.0.weight": torch.randn(5, 3), "head.weight": torch.randn(4, 5), "head.bias": torch.randn(4)}
    assert WeightLayout.from_state_dict(sd, chunk_size=4).head_names() == ["head.weight", "head.bias"]
    flat = {"weight": torch.randn(2, 2), "bias": torch.randn(2)}
    assert WeightLayout.from_state_dict(flat, chunk_size=4).head_names() == ["weight", "bias"]
