"""Align checkpoints of one architecture by permuting hidden units (weight matching, Git Re-Basin).

Networks trained from different random initialisations compute the same family of
functions up to a permutation of their hidden units: swapping units *i* and *j* of a
layer (rows of its weight and bias, columns of the next layer's weight) leaves the
output unchanged but moves the weights far apart. A weight VAE cannot average over
that symmetry, so a zoo collected from independent runs is first brought into one
*basin* by permuting every member towards a reference member.

The algorithm is *weight matching* from Ainsworth, Hayase & Srinivasa, "Git Re-Basin:
Merging Models modulo Permutation Symmetries" (ICLR 2023), Algorithm 1: for each
permutation group in a random order, solve the linear assignment problem that
maximises ``sum_t <ref_t, permuted member_t>`` over every tensor axis the group
touches (the other groups held fixed), with `scipy.optimize.linear_sum_assignment`;
repeat until no group improves.

A `PermutationSpec` says which axes of which tensors share a permutation (as in the
paper's code). `permutation_spec_for` builds it for chains of ``Linear`` layers (the
registered ``mlp``) and ``Conv -> BatchNorm -> ...`` chains, optionally flattened into
a ``Linear`` head; anything else raises ``ValueError``.

Convention: a permutation ``perm`` of a group maps reference unit ``i`` to member unit
``perm[i]``; aligning applies ``aligned = member.index_select(axis, perm)`` on every axis
of the group, so ``aligned[i] = member[perm[i]]``.

Example:
    >>> from d2nwg.targets.mlp.model import MLP
    >>> ref, other = MLP(hidden=(16,)).state_dict(), MLP(hidden=(16,)).state_dict()
    >>> spec = permutation_spec_for(ref)
    >>> perms = weight_matching(spec, ref, other)            # {"fc0": LongTensor [16]}
    >>> aligned = apply_permutation(spec, perms, other)      # same function as `other`
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from d2nwg.security import check_name
from d2nwg.utils.io import MAX_JSON_BYTES, atomic_dir, atomic_write_json, atomic_write_text, save_safetensors
from d2nwg.zoo.model_zoo import ModelZoo

ALIGNMENT_FORMAT = "d2nwg-alignment/1"
ALIGNMENT_FILE = "alignment.json"
VERIFY_BATCH = 256  # members per vmapped forward when align_zoo_dir checks that functions are unchanged
METHOD = "weight matching (Ainsworth et al., Git Re-Basin, ICLR 2023)"
SUPPORTED = (
    "nn.Sequential chains of Linear / Conv1d-3d (groups=1) layers with BatchNorm, LayerNorm (after Linear), "
    "elementwise activations, dropout, pooling and Flatten between them (e.g. the registered 'mlp')"
)

StateDict = Mapping[str, torch.Tensor]
Permutations = dict[str, torch.Tensor]

# Modules that act on every unit alike, so they commute with a permutation of units (channels).
_UNITWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


# ----------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class PermutationSpec:
    """Which tensor axes share a permutation of units (Git Re-Basin's ``PermutationSpec``).

    Args:
        sizes: ``{group: number of units}``; a group is named after the layer whose outputs it permutes.
        axes_to_perm: ``{tensor name: (group or None per axis)}``; ``None`` leaves an axis alone. An axis
            may be ``k`` times longer than its group (a ``Linear`` after ``Flatten`` of ``[C, H, W]``):
            then it is ``C`` contiguous blocks of ``k = H*W`` entries and the blocks are permuted.

    Example (the registered MLP with one hidden layer of 32)::

        sizes = {"fc0": 32}
        axes_to_perm = {"fc0.weight": ("fc0", None), "fc0.bias": ("fc0",), "fc1.weight": (None, "fc0")}
    """

    sizes: dict[str, int]
    axes_to_perm: dict[str, tuple[str | None, ...]]
    perm_to_axes: dict[str, list[tuple[str, int]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        perm_to_axes: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for name, axes in self.axes_to_perm.items():
            for axis, group in enumerate(axes):
                if group is None:
                    continue
                if group not in perm_to_axes:
                    raise ValueError(f"tensor '{name}' axis {axis} uses unknown permutation group '{group}'")
                perm_to_axes[group].append((name, axis))
        empty = [g for g, axes in perm_to_axes.items() if not axes]
        if empty:
            raise ValueError(f"permutation groups {empty} touch no tensor")
        object.__setattr__(self, "perm_to_axes", perm_to_axes)

    def check(self, state_dict: StateDict, where: str = "state_dict") -> None:
        """Raise ``ValueError`` naming the first tensor that is missing or whose shape does not fit the spec."""
        for name, axes in self.axes_to_perm.items():
            if name not in state_dict:
                raise ValueError(f"{where} has no tensor '{name}', which alignment must permute (it needs full checkpoints)")
            shape = tuple(state_dict[name].shape)
            if len(shape) != len(axes):
                raise ValueError(f"{where}: tensor '{name}' has shape {list(shape)}, the permutation spec expects {len(axes)} dims")
            for axis, group in enumerate(axes):
                if group is not None and shape[axis] % self.sizes[group]:
                    raise ValueError(
                        f"{where}: tensor '{name}' axis {axis} has size {shape[axis]}, not a multiple of group '{group}' ({self.sizes[group]})"
                    )


class _ChainBuilder:
    """Walks the layers of a chain in forward order and records which axes share a permutation."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.axes: dict[str, tuple[str | None, ...]] = {}
        self.group: str | None = None  # the permutation of the features flowing between layers
        self.kind = "input"  # what produced them: "input", "linear", "conv" or "flat" (conv, then flattened)

    def weight_layer(self, prefix: str, kind: str, in_size: int, out_size: int, ndim: int, bias: bool, last: bool) -> None:
        """A Linear (``kind="linear"``, weight ``[out, in]``) or Conv (``"conv"``, weight ``[out, in, *kernel]``)."""
        in_group = self.group
        if in_group is not None:
            size = self.sizes[in_group]
            if kind == "conv" and self.kind != "conv":
                raise ValueError(f"convolution '{prefix}' follows a {self.kind} layer; supported: {SUPPORTED}")
            if kind == "linear" and self.kind == "conv":
                raise ValueError(f"Linear '{prefix}' follows a convolution without nn.Flatten; supported: {SUPPORTED}")
            # After Flatten, each channel is a contiguous block of in_size / size inputs.
            fits = in_size % size == 0 if self.kind == "flat" else in_size == size
            if not fits:
                raise ValueError(f"layer '{prefix}' takes {in_size} inputs but the previous layer gives {size} units")
        out_group = None if last else prefix
        if out_group is not None:
            self.sizes[out_group] = out_size
        self.axes[f"{prefix}.weight"] = (out_group, in_group) + (None,) * (ndim - 2)
        if bias and out_group is not None:
            self.axes[f"{prefix}.bias"] = (out_group,)
        self.group, self.kind = out_group, (kind if out_group is not None else "input")

    def norm_layer(self, prefix: str, names: Sequence[str], num_features: int, layer_norm: bool) -> None:
        """A BatchNorm / LayerNorm whose per-unit tensors (affine and running stats) follow the current group."""
        if self.group is None:
            return  # normalising the inputs or the outputs: those are not permuted
        if layer_norm and self.kind == "conv":
            raise ValueError(f"LayerNorm '{prefix}' after a convolution normalises spatial positions; supported: {SUPPORTED}")
        size = self.sizes[self.group]
        if num_features != size and not (self.kind == "flat" and num_features % size == 0):
            raise ValueError(f"norm layer '{prefix}' has {num_features} features but the previous layer gives {size} units")
        for name in names:
            self.axes[f"{prefix}.{name}"] = (self.group,)

    def flatten(self) -> None:
        if self.kind == "conv":
            self.kind = "flat"

    def spec(self) -> PermutationSpec:
        return PermutationSpec(dict(self.sizes), {k: v for k, v in self.axes.items() if any(g is not None for g in v)})


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Leaf modules of nested ``nn.Sequential`` in forward order; anything else is not a chain we can trust."""
    if not isinstance(module, nn.Sequential):
        raise ValueError(f"cannot align {type(module).__name__} at '{prefix or '<root>'}': supported are {SUPPORTED}")
    out = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        out += _leaves(child, path) if isinstance(child, nn.Sequential) else [(path, child)]
    return out


def _spec_from_module(module: nn.Module) -> PermutationSpec:
    leaves = _leaves(module)
    weighted = [i for i, (_, m) in enumerate(leaves) if isinstance(m, (nn.Linear, *_CONVS))]
    if not weighted:
        raise ValueError(f"{type(module).__name__} has no Linear or Conv layer; supported are {SUPPORTED}")
    chain = _ChainBuilder()
    for i, (path, m) in enumerate(leaves):
        if isinstance(m, nn.Linear):
            chain.weight_layer(path, "linear", m.in_features, m.out_features, 2, m.bias is not None, i == weighted[-1])
        elif isinstance(m, _CONVS):
            if m.groups != 1:
                raise ValueError(f"grouped convolution '{path}' (groups={m.groups}) is not supported; supported are {SUPPORTED}")
            chain.weight_layer(path, "conv", m.in_channels, m.out_channels, m.weight.dim(), m.bias is not None, i == weighted[-1])
        elif isinstance(m, _BATCHNORMS):
            names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(m, n, None) is not None]
            chain.norm_layer(path, names, m.num_features, layer_norm=False)
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise ValueError(f"LayerNorm '{path}' over {list(m.normalized_shape)} is not supported; supported are {SUPPORTED}")
            names = [n for n in ("weight", "bias") if getattr(m, n, None) is not None]
            chain.norm_layer(path, names, m.normalized_shape[0], layer_norm=True)
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise ValueError(f"Flatten '{path}' must flatten dims 1..-1, got {m.start_dim}..{m.end_dim}")
            chain.flatten()
        elif isinstance(m, _UNITWISE):
            if any(True for _ in m.parameters(recurse=False)):
                raise ValueError(f"module '{path}' ({type(m).__name__}) has parameters; supported are {SUPPORTED}")
        else:
            raise ValueError(f"cannot align through module '{path}' ({type(m).__name__}); supported are {SUPPORTED}")
    return chain.spec()


def _spec_from_state_dict(state_dict: StateDict) -> PermutationSpec:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state_dict.items():
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = value
    weighted = [p for p, t in modules.items() if "weight" in t and t["weight"].dim() >= 2]
    if not weighted:
        raise ValueError(f"no Linear or Conv weight among {list(state_dict)[:8]}; supported are {SUPPORTED}")
    chain = _ChainBuilder()
    for prefix, tensors in modules.items():
        leaves = set(tensors)
        weight = tensors.get("weight")
        if weight is not None and weight.dim() >= 2 and leaves <= {"weight", "bias"}:
            kind = "linear" if weight.dim() == 2 else "conv"
            if kind == "linear" and chain.kind == "conv":
                chain.flatten()  # a state_dict cannot show nn.Flatten; a Linear after a conv implies one
            chain.weight_layer(prefix, kind, weight.shape[1], weight.shape[0], weight.dim(), "bias" in tensors, prefix == weighted[-1])
        elif (weight is None or weight.dim() == 1) and leaves & {"weight", "running_mean"} and leaves <= _NORM_TENSORS:
            per_unit = tensors["weight"] if weight is not None else tensors["running_mean"]
            names = [n for n in ("weight", "bias", "running_mean", "running_var") if n in tensors]
            # Without running stats it may be a LayerNorm, which is only unit-wise on Linear features.
            chain.norm_layer(prefix, names, per_unit.shape[0], layer_norm="running_mean" not in tensors and chain.kind != "conv")
        else:
            raise ValueError(f"cannot infer how to permute module '{prefix}' with tensors {sorted(leaves)}; pass the nn.Module (supported: {SUPPORTED})")
    return chain.spec()


def permutation_spec_for(module_or_state_dict: nn.Module | StateDict) -> PermutationSpec:
    """The `PermutationSpec` of a chain of layers, from its module or from a state_dict.

    Args:
        module_or_state_dict: an ``nn.Sequential`` (nesting allowed) of Linear / Conv layers with
            BatchNorm, LayerNorm, elementwise activations, dropout, pooling and Flatten between them; or a
            state_dict of such a chain. Every hidden layer (all but the last Linear/Conv) gets one group,
            named after the layer, that permutes its output units. The state_dict form assumes the keys list a
            plain chain in forward order with unit-wise activations between layers (true for ``nn.Sequential``
            models such as the registered ``mlp``); pass the module to have the layer types checked.

    Raises:
        ValueError: for anything else (residual or attention models, grouped convolutions, adapters), naming
            the first module that cannot be aligned.
    """
    if isinstance(module_or_state_dict, nn.Module):
        return _spec_from_module(module_or_state_dict)
    if isinstance(module_or_state_dict, Mapping):
        return _spec_from_state_dict(module_or_state_dict)
    raise ValueError(f"expected an nn.Module or a state_dict, got {type(module_or_state_dict).__name__}")


# ----------------------------------------------------------------------------- permuting
def _axis_index(size: int, perm: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Indices that permute an axis of ``size`` by ``perm``; an axis ``k`` times longer moves blocks of ``k``."""
    k = size // len(perm)
    if k == 1:
        return perm
    offsets = torch.arange(k) if isinstance(perm, torch.Tensor) else np.arange(k)
    return (perm[:, None] * k + offsets).reshape(-1)


def _take(tensor: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    """``tensor`` with index ``i`` of ``axis`` taken from ``perm[i]`` (blocks of ``k`` on a ``k`` times longer axis)."""
    return tensor.index_select(axis, _axis_index(tensor.shape[axis], perm))


def _permute_tensor(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (named ``name`` in the spec) with each permuted axis reordered by its group's permutation."""
    for axis, group in enumerate(spec.axes_to_perm[name]):
        if group is not None:
            tensor = _take(tensor, axis, perms[group])
    return tensor


def _check_perms(spec: PermutationSpec, perms: Mapping[str, Sequence[int] | torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(perms) != set(spec.sizes):
        raise ValueError(f"permutations for groups {sorted(perms)} do not match the spec's groups {sorted(spec.sizes)}")
    out = {}
    for group, perm in perms.items():
        perm = torch.as_tensor(perm, dtype=torch.long)
        n = spec.sizes[group]
        if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
            raise ValueError(f"the permutation of group '{group}' is not a permutation of 0..{n - 1}")
        out[group] = perm
    return out


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, Sequence[int] | torch.Tensor], state_dict: StateDict
) -> dict[str, torch.Tensor]:
    """A new state_dict with every group's permutation applied on every axis it touches.

    Args:
        spec: from `permutation_spec_for`.
        perms: ``{group: LongTensor [n]}`` (or lists, as read from JSON); ``aligned[i] = member[perm[i]]``.
        state_dict: ``{name: tensor}``; tensors the spec does not touch are passed through as they are.

    Returns:
        The permuted state_dict, computing the same function (same keys, shapes and dtypes).
    """
    perms = _check_perms(spec, perms)
    spec.check(state_dict)
    return {k: _permute_tensor(spec, perms, k, v) if k in spec.axes_to_perm else v for k, v in state_dict.items()}


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``: applying ``inv`` after ``perm`` restores the original."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


def weight_matching(
    spec: PermutationSpec,
    reference: StateDict,
    member: StateDict,
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> Permutations:
    """Permutations that bring ``member`` closest to ``reference`` (Git Re-Basin, Algorithm 1).

    Coordinate descent over groups: in a seeded random order, each group's permutation is the solution of
    the linear assignment problem ``max_P sum_t <reference_t, P member_t>`` over every tensor axis the group
    touches, with the other groups' current permutations applied to the member's other axes. A group only
    changes when its score strictly improves, and the loop stops after a pass without change (or
    ``max_iter`` passes). Maximising the inner product is minimising the L2 distance, since permutations
    keep norms.

    Args:
        spec: from `permutation_spec_for`.
        reference, member: state_dicts of the same architecture (any float dtype; scored in float64).
        max_iter: passes over all groups at most.
        seed: seeds the group order, so the result is reproducible.

    Returns:
        ``{group: LongTensor [n]}``, to be given to `apply_permutation` with ``member``.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    spec.check(reference, "reference")
    spec.check(member, "member")
    # numpy, not torch: these matrices are small, and torch's intra-op threads made this ~30x slower on a
    # busy 2-core machine (thread contention), while scipy wants numpy anyway.
    ref = {k: reference[k].detach().cpu().double().numpy() for k in spec.axes_to_perm}
    mem = {k: member[k].detach().cpu().double().numpy() for k in spec.axes_to_perm}
    perms = {g: np.arange(n) for g, n in spec.sizes.items()}
    groups = list(spec.sizes)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for gi in rng.permutation(len(groups)):
            group = groups[gi]
            n = spec.sizes[group]
            score = np.zeros((n, n))  # score[i, j]: reference unit i vs member unit j
            for name, axis in spec.perm_to_axes[group]:
                b = mem[name]
                for other_axis, other in enumerate(spec.axes_to_perm[name]):
                    if other is not None and other_axis != axis:
                        b = np.take(b, _axis_index(b.shape[other_axis], perms[other]), axis=other_axis)
                score += np.moveaxis(ref[name], axis, 0).reshape(n, -1) @ np.moveaxis(b, axis, 0).reshape(n, -1).T
            _, new = linear_sum_assignment(score, maximize=True)
            rows = np.arange(n)
            gain = score[rows, new].sum() - score[rows, perms[group]].sum()
            # A tolerance relative to the scores keeps float ties from flipping between equal solutions.
            if gain > 1e-12 * (np.abs(score).sum() + 1e-30):
                perms[group] = new
                changed = True
        if not changed:
            break
    return {g: torch.from_numpy(np.asarray(p, dtype=np.int64)) for g, p in perms.items()}
    return perms


# ----------------------------------------------------------------------------- zoo level
@dataclass
class Alignment:
    """The record of aligning many state_dicts to one reference (what ``alignment.json`` holds).

    Attributes:
        reference: the id of the reference member (None when a bare state_dict was given).
        seed, max_iter: the `weight_matching` settings.
        groups: ``{group: size}`` of the spec.
        permutations: ``{member id: {group: LongTensor [n]}}``.
        init: the permutations of the zoo's shared initialisation, when it has one.
        source: the aligned zoo's folder (`align_zoo_dir`), for provenance.
    """

    reference: str | None
    seed: int
    max_iter: int
    groups: dict[str, int]
    permutations: dict[str, Permutations] = field(default_factory=dict)
    init: Permutations | None = None
    source: str | None = None

    def to_json(self) -> str:
        """Stable JSON text: the same alignment gives the same bytes; one line per member."""
        head = {
            "format": ALIGNMENT_FORMAT,
            "method": METHOD,
            "convention": "aligned = member.index_select(axis, perm) on every axis of the group",
            "source": self.source,
            "reference": self.reference,
            "seed": self.seed,
            "max_iter": self.max_iter,
            "groups": self.groups,
            "init": None if self.init is None else {g: p.tolist() for g, p in self.init.items()},
        }
        compact = (",", ":")
        members = ",\n".join(
            f"    {json.dumps(str(k))}: {json.dumps({g: p.tolist() for g, p in v.items()}, separators=compact)}"
            for k, v in self.permutations.items()
        )
        return json.dumps(head, indent=2)[:-2] + ',\n  "members": {\n' + members + ("\n" if members else "") + "  }\n}\n"

    @classmethod
    def from_json(cls, text: str) -> Alignment:
        try:
            data = json.loads(text)
            if data.get("format") != ALIGNMENT_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {ALIGNMENT_FORMAT!r}")
            groups = {g: int(n) for g, n in data["groups"].items()}

            def as_perms(lists: Mapping) -> Permutations:
                perms = {g: torch.tensor(p, dtype=torch.long) for g, p in lists.items()}
                for g, p in perms.items():  # a hostile record must not index out of range when applied
                    if g not in groups or p.dim() != 1 or not torch.equal(p.sort().values, torch.arange(groups[g])):
                        raise ValueError(f"group {g!r} does not hold a permutation of its {groups.get(g)} units")
                return perms

            return cls(
                reference=check_name(data["reference"], "alignment reference"), seed=int(data["seed"]),
                max_iter=int(data["max_iter"]), groups=groups,
                permutations={check_name(k, "alignment member id"): as_perms(v) for k, v in data["members"].items()},
                init=None if data.get("init") is None else as_perms(data["init"]), source=data.get("source"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, RecursionError) as err:
            raise ValueError(f"invalid alignment file: {err}") from None


def read_alignment(path: str | Path) -> Alignment:
    """Read an ``alignment.json`` (a zoo folder or the file itself)."""
    path = Path(path)
    path = path / ALIGNMENT_FILE if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"alignment file not found: {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"alignment file {path} is over the {MAX_JSON_BYTES:,}-byte limit for JSON files")
    return Alignment.from_json(path.read_text())


def align_zoo(
    zoo_or_state_dicts: ModelZoo | Mapping[str, StateDict] | Sequence[StateDict],
    reference: str | StateDict = "auto",
    *,
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[dict[str, dict[str, torch.Tensor]], Alignment]:
    """Align every state_dict of a zoo (in memory) to a reference member.

    Args:
        zoo_or_state_dicts: a `ModelZoo` (all its members, keyed by member id, loaded into memory; use
            `align_zoo_dir` to stream a large zoo), ``{id: state_dict}``, or a list of state_dicts (keyed
            ``"0"``, ``"1"``, ...).
        reference: ``"auto"`` (the zoo's first train member, else the first state_dict), an id, or a state_dict.
        spec: the permutation spec; by default built from the zoo's architecture or the reference state_dict.
        max_iter, seed: `weight_matching` settings (the same seed for every member, so each member's result
            does not depend on the others).

    Returns:
        ``({id: aligned state_dict}, Alignment)``; write ``alignment.to_json()`` to keep it reproducible.
    """
    if isinstance(zoo_or_state_dicts, ModelZoo):
        zoo = zoo_or_state_dicts
        state_dicts = {m.id: zoo.load_member(m) for m in zoo.members()}
        if spec is None:
            spec = _zoo_spec(zoo)
        if isinstance(reference, str) and reference == "auto":
            reference = _auto_reference(zoo)
    elif isinstance(zoo_or_state_dicts, Mapping):
        state_dicts = {str(k): v for k, v in zoo_or_state_dicts.items()}
    else:
        state_dicts = {str(i): sd for i, sd in enumerate(zoo_or_state_dicts)}
    if not state_dicts:
        raise ValueError("nothing to align: no state_dicts given")
    if isinstance(reference, str):
        ref_id = next(iter(state_dicts)) if reference == "auto" else reference
        if ref_id not in state_dicts:
            raise ValueError(f"reference '{ref_id}' is not one of the {len(state_dicts)} members")
        ref_sd = state_dicts[ref_id]
    else:
        ref_id, ref_sd = None, reference
    spec = spec or permutation_spec_for(ref_sd)
    record = Alignment(reference=ref_id, seed=seed, max_iter=max_iter, groups=dict(spec.sizes))
    aligned = {}
    for key, sd in state_dicts.items():
        perms = weight_matching(spec, ref_sd, sd, max_iter=max_iter, seed=seed)
        aligned[key] = apply_permutation(spec, perms, sd)
        record.permutations[key] = perms
    return aligned, record


def _zoo_spec(zoo: ModelZoo) -> PermutationSpec:
    from d2nwg.targets.architectures import build_model

    try:
        module = build_model(zoo.architecture)
    except ValueError as err:
        raise ValueError(f"cannot build the zoo's architecture to align it: {err}") from None
    return permutation_spec_for(module)


def _auto_reference(zoo: ModelZoo) -> str:
    members = zoo.members("train") or zoo.members()
    if not members:
        raise ValueError(f"the zoo at {zoo.root} has no members to align")
    return members[0].id


def _samples_are_inputs(manifest: Mapping) -> bool:
    """Whether a zoo's samples are what its model takes (not, e.g., cached text features)."""
    spec = manifest.get("input") or {}
    return manifest.get("feature", "identity") == "identity" and not spec.get("text") and spec.get("kind") not in ("text", "generative-text")


@torch.no_grad()
def _changed_function(module: nn.Module, before: Sequence[StateDict], after: Sequence[StateDict], x: torch.Tensor) -> list[int]:
    """Indices of members whose logits on ``x [n, ...]`` differ before and after alignment (one vmapped forward)."""
    from d2nwg.targets.population import population_logits, stack_state_dicts

    def logits(sds: Sequence[StateDict]) -> torch.Tensor:  # [N, n, C]
        stacked = stack_state_dicts([{k: v.float() for k, v in sd.items() if v.is_floating_point()} for sd in sds])
        return population_logits(module, stacked, x)

    ya, yb = logits(before), logits(after)
    # Permuting units reorders sums, so logits may differ in the last bits only.
    tol = 1e-4 * ya.abs().flatten(1).amax(1).clamp_min(1.0)
    return ((ya - yb).abs().flatten(1).amax(1) > tol).nonzero().flatten().tolist()


def align_zoo_dir(
    src_zoo_path: str | Path,
    out_path: str | Path,
    *,
    reference: str = "auto",
    seed: int = 0,
    max_iter: int = 100,
    verify: bool = True,
) -> ModelZoo:
    """Write a copy of a zoo whose members (train and heldout) are permuted into the basin of one reference.

    The new zoo keeps the source's manifest (architecture, classes, tasks, input description), its class
    pool (``data.safetensors``, copied byte for byte), member ids, seeds and metrics (permutations preserve
    each member's function, hence its accuracies); it adds ``alignment.json`` (see `Alignment`) and refits
    the layout's normalisation on the aligned train members. A shared initialisation (``init.safetensors``),
    when there is one, is aligned to the reference too. Aligning a shared-init zoo is not a no-op: on the
    digits zoo (hidden 32, 100 AdamW steps) it still moved ~23 of 32 units per member and, while bringing
    members closer to the reference, raised the mean nearest-neighbour distance (9.95 -> 11.5), so it is
    meant for zoos from independent initialisations. The recipe gains an ``"alignment"`` entry. The output
    is written into a temp folder and renamed into place.

    Args:
        src_zoo_path: the zoo to align (left untouched).
        out_path: the new zoo folder (must not exist or be empty).
        reference: ``"auto"`` (the first train member) or a member id.
        seed, max_iter: `weight_matching` settings.
        verify: check that every aligned member computes the same logits as before on the reference task's
            test samples (zoos whose samples are the model's inputs, i.e. not text features).

    Returns:
        The aligned `ModelZoo`.
    """
    src_root, out = Path(src_zoo_path), Path(out_path)
    zoo = ModelZoo.open(src_root)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder; choose a new one")
    ref_id = _auto_reference(zoo) if reference == "auto" else reference
    if ref_id not in zoo:
        raise ValueError(f"reference '{ref_id}' is not a member of the zoo at {src_root}")
    spec = _zoo_spec(zoo)
    ref_sd = zoo.load_member(ref_id)
    module = None
    if verify and _samples_are_inputs(zoo.manifest):
        from d2nwg.targets.architectures import build_model

        module = build_model(zoo.architecture).eval()
    record = Alignment(
        reference=ref_id, seed=seed, max_iter=max_iter, groups=dict(spec.sizes), source=str(src_root.resolve())
    )
    init = zoo.init_state()
    if init is not None:
        record.init = weight_matching(spec, ref_sd, init, max_iter=max_iter, seed=seed)
        init = apply_permutation(spec, record.init, init)

    with atomic_dir(out) as tmp:
        # The static files are copied as they are (same class pool and tasks, every manifest field kept), so
        # this does not depend on how a recipe built them; only members, init, recipe and layout stats change.
        (tmp / "members").mkdir()
        shutil.copyfile(src_root / "data.safetensors", tmp / "data.safetensors")
        shutil.copyfile(src_root / "layout.json", tmp / "layout.json")
        if init is not None:
            save_safetensors(tmp / "init.safetensors", init)
        manifest = copy.deepcopy(zoo.manifest)
        manifest["members"] = []
        manifest["recipe"] = {
            **(manifest.get("recipe") or {}),
            "alignment": {"reference": ref_id, "seed": seed, "max_iter": max_iter, "method": METHOD},
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        new = ModelZoo.open(tmp)
        # Any inputs tell whether a function changed: the reference task's test samples serve every member.
        members = zoo.members()
        ref_task = next(m.task for m in members if m.id == ref_id)
        probe = zoo.task_data(ref_task, "test")[0] if module is not None else None
        for start in range(0, len(members), VERIFY_BATCH):
            chunk = members[start : start + VERIFY_BATCH]
            originals = [ref_sd if m.id == ref_id else zoo.load_member(m) for m in chunk]
            aligned = []
            for m, sd in zip(chunk, originals):
                record.permutations[m.id] = weight_matching(spec, ref_sd, sd, max_iter=max_iter, seed=seed)
                aligned.append(apply_permutation(spec, record.permutations[m.id], sd))
            changed = _changed_function(module, originals, aligned, probe) if module is not None else []
            if changed:
                raise RuntimeError(f"aligning member {chunk[changed[0]].id} changed its outputs; the permutation spec does not fit {zoo.architecture}")
            for m, sd in zip(chunk, aligned):
                new.add(sd, m.task, m.metrics, seed=m.seed, member_id=m.id, flush=False)
        new.flush()
        atomic_write_text(tmp / ALIGNMENT_FILE, record.to_json())
        new.fit_layout("train")
    return ModelZoo.open(out)


# ----------------------------------------------------------------------------- diagnostics
def pairwise_distances(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> torch.Tensor:
    """L2 distances ``[N, N]`` between flattened state_dicts (``names``: the tensors to use, default all floating)."""
    if not state_dicts:
        raise ValueError("pairwise_distances needs at least one state_dict")
    names = list(names) if names is not None else [k for k, v in state_dicts[0].items() if v.is_floating_point()]
    flat = torch.stack([torch.cat([sd[k].detach().double().reshape(-1) for k in names]) for sd in state_dicts])
    return torch.cdist(flat, flat)


def distance_summary(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> dict[str, float]:
    """Mean pairwise and mean nearest-neighbour L2 distance between members (lower: a tighter zoo)."""
    d = pairwise_distances(state_dicts, names)
    n = len(d)
    if n < 2:
        raise ValueError("distance_summary needs at least two state_dicts")
    off = ~torch.eye(n, dtype=torch.bool)
    nearest = d.masked_fill(~off, float("inf")).min(1).values
    return {"mean_pairwise": float(d[off].mean()), "mean_nearest": float(nearest.mean())}


__all__ = [
    "ALIGNMENT_FILE",
    "Alignment",
    "PermutationSpec",
    "align_zoo",
    "align_zoo_dir",
    "apply_permutation",
    "distance_summary",
    "invert_permutation",
    "pairwise_distances",
    "permutation_spec_for",
    "read_alignment",
    "weight_matching",
]
