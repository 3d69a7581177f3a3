"""Reading a user's checkpoints: key prefixes, tensor selection and the target architecture."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from d2nwg.ingest.settings import IngestSettings
from d2nwg.targets.architectures import build_model
from d2nwg.utils.io import load_weights
from d2nwg.zoo.layout import WeightLayout


@dataclass
class BadCheckpoint:
    """A checkpoint that cannot join the zoo, and why."""

    name: str
    reason: str


class BadCheckpointsError(ValueError):
    """Some checkpoints are unusable; ``bad`` lists every one of them with its reason."""

    def __init__(self, bad: Sequence[BadCheckpoint]):
        self.bad = list(bad)
        names = ", ".join(b.name for b in self.bad)
        super().__init__(f"{len(self.bad)} bad checkpoint(s): {names}; fix or remove them, or skip them with --skip-bad")


# ----------------------------------------------------------------------------- checkpoints
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def shared_key_prefix(keys: Sequence[str]) -> str:
    """The leading dotted components every key shares, with the trailing dot (``"module."``), or ``""``.

    A prefix never swallows a whole key: ``["a.b", "a.c"]`` share ``"a."``, ``["a.b"]`` alone shares ``"a."`` too.
    """
    parts = [k.split(".") for k in keys]
    if not parts:
        return ""
    common: list[str] = []
    for i in range(min(len(p) for p in parts) - 1):
        if len({p[i] for p in parts}) != 1:
            break
        common.append(parts[0][i])
    return "".join(f"{c}." for c in common)


def strip_key_prefix(state: Mapping[str, torch.Tensor], expected: Sequence[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Drop a key prefix that every key shares (``module.`` of ``nn.DataParallel``, ``model.`` of a
    LightningModule, ``_orig_mod.`` of ``torch.compile``, or several stacked) when that makes the keys match.

    Args:
        state: the checkpoint's tensors.
        expected: the names the architecture needs.

    Returns:
        The state with the prefix removed and the prefix (``""``: nothing stripped, e.g. when the keys already
        match or no shared prefix makes them match).
    """
    if all(name in state for name in expected):
        return dict(state), ""
    shared = shared_key_prefix(list(state))
    components = shared.split(".")[:-1]
    for n in range(1, len(components) + 1):  # the shortest prefix that works: "module." before "module._orig_mod."
        prefix = "".join(f"{c}." for c in components[:n])
        stripped = {k[len(prefix) :]: v for k, v in state.items()}
        if all(name in stripped for name in expected):
            return stripped, prefix
    return dict(state), ""


def prefix_mismatch(state: Mapping[str, torch.Tensor], expected: Sequence[str]) -> str | None:
    """Why the checkpoint's keys miss the architecture's names, when a key prefix is the cause; else None."""
    missing = [name for name in expected if name not in state]
    if not missing:
        return None
    want = missing[0]
    shared = shared_key_prefix(list(state))
    example = next(iter(state), "")
    # A shared prefix that the architecture's own names also start with (a checkpoint of one submodule,
    # "fc0.weight"/"fc0.bias") is not a prefix problem: layout.validate names the missing tensor.
    if shared and not any(name.startswith(shared) for name in expected):
        return (
            f"checkpoint keys start with '{shared}' (e.g. '{example}'); the architecture expects '{want}' "
            f"({len(missing)} of its {len(expected)} tensors missing), and stripping '{shared}' does not give its "
            "names: is this checkpoint of another architecture, or of a module that wraps it?"
        )
    found = next((k for k in state if k.endswith(f".{want}")), None)
    if found:
        prefix = found[: -len(want)]
        others = [k for k in state if not k.startswith(prefix)]
        return (
            f"the architecture expects '{want}'; the checkpoint has '{found}', but not every key starts with "
            f"'{prefix}' (e.g. '{others[0]}'), so the prefix is not stripped: re-save the model's own state_dict"
        )
    return None


def load_checkpoint(
    path: Path,
    layout: WeightLayout,
    include: Sequence[str],
    exclude: Sequence[str],
    prefixes: dict[str, set[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """The layout's tensors of a checkpoint (in the layout's dtypes); ``ValueError`` says what is wrong.

    A key prefix shared by every key is stripped when that makes the keys match (`strip_key_prefix`);
    ``prefixes`` (if given) collects ``{prefix: checkpoint paths}`` for one notice per prefix.
    """
    state, prefix = strip_key_prefix(load_weights(path), layout.names)
    if prefix and prefixes is not None:
        prefixes.setdefault(prefix, set()).add(str(path))
    mismatch = prefix_mismatch(state, layout.names)
    if mismatch:
        raise ValueError(mismatch)
    layout.validate(state)
    unexpected = sorted(
        k
        for k, v in state.items()
        if k not in layout.names and torch.is_floating_point(v) and _matches(k, include) and not _matches(k, exclude)
    )
    if unexpected:
        raise ValueError(f"unexpected tensor(s) {unexpected[:5]} not in the architecture's layout")
    selected = {}
    for spec in layout.tensors:
        value = state[spec.name]
        if not torch.is_floating_point(value):
            raise ValueError(f"tensor '{spec.name}' has dtype {value.dtype}, expected {spec.dtype}")
        selected[spec.name] = value.detach().to(getattr(torch, spec.dtype)).contiguous()
    return selected


@dataclass
class Target:
    """The architecture every checkpoint must fit: its spec, a model built from it and the weight layout."""

    spec: dict
    model: nn.Module
    layout: WeightLayout
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    prefixes: dict[str, set[str]] = field(default_factory=dict)
    """Key prefixes stripped so far -> the checkpoint paths they were stripped from."""

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        """The layout's tensors of one checkpoint file (see `load_checkpoint`; a shared key prefix is stripped)."""
        return load_checkpoint(path, self.layout, self.include, self.exclude, self.prefixes)

    def load_as_saved(self, path: Path, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """`model` holding the checkpoint as saved, to measure its accuracy: the layout's tensors (``state``)
        and every other tensor of the model that the file holds, e.g. running statistics that ``--exclude``
        left out of the layout (tensors the file lacks keep the freshly built model's values).

        Raises:
            ValueError: a layout tensor is missing or misshapen (see `WeightLayout.inject`).
        """
        if not hasattr(self, "_fresh"):
            self._fresh = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.layout.inject(self.model, state)
        rest = [k for k in self._fresh if k not in self.layout.names]
        if rest:
            saved, _ = strip_key_prefix(load_weights(path), self.layout.names)
            own = self.model.state_dict()
            with torch.no_grad():
                for k in rest:
                    value = saved.get(k)
                    ok = isinstance(value, torch.Tensor) and value.shape == own[k].shape
                    own[k].copy_(value if ok else self._fresh[k])
        return self.model

    def left_out_statistics(self) -> list[str]:
        """Float buffers of the model (BatchNorm running statistics) that the layout does not hold."""
        return [k for k, v in self.model.named_buffers() if v.is_floating_point() and k not in self.layout.names]


def build_target(settings: IngestSettings) -> Target:
    """Build the architecture (seeded with ``settings.seed``) and the layout of the tensors to tokenize.

    Raises:
        ValueError: an unknown architecture, or one that rejects its config.
    """
    spec = {"name": settings.arch, "config": settings.arch_config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build_model(spec)
    model.eval()
    layout = WeightLayout.from_module(model, settings.include, settings.exclude, settings.chunk_size)
    return Target(spec, model, layout, settings.include, settings.exclude)
