"""`WeightLayout`: turns checkpoints into fixed-size weight tokens and back.

A layout selects tensors of a model by glob patterns over their names, records
their shapes and dtypes, and splits each flattened tensor into chunks of
``chunk_size`` numbers ("tokens"). Every tensor's tail is padded on its own, so a
token never mixes two tensors, and each token knows which tensor it belongs to
and where (``token_layer``, ``token_offset``) for position embeddings.

With ``chunk_size`` equal to a linear layer's ``in_features`` each token is one
output neuron (one row of the weight), which is what lets the diffusion model tie
class slot *i* to row *i* of a classifier head.

Normalisation uses per-tensor statistics fitted on a zoo (``fit_stats``), rounded
so that they invert exactly (power-of-two std, float32-representable mean). The
arithmetic runs in float64, so ``detokenize(tokenize(sd))`` is bit-exact for
fp32/fp16/bf16 weights when tokens are float64, and for fp16/bf16 even with
float32 tokens. The one exception is a non-zero value far smaller than its
tensor's mean (below about 2**-28 * |mean| for fp32 in float64 tokens, 2**-16 *
|mean| for bf16 in float32 tokens): the mean subtraction cannot keep its low bits,
and it comes back off by at most about 2**-24 * |mean|. Zeros are always exact.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from d2nwg.utils.io import atomic_write_text, read_json

POSITIVE_TENSORS = ("*running_var",)
"""Globs of tensors that must stay positive: tokenised in log space (``transform="log"``)."""
POSITIVE_FLOOR = 1e-30
"""What a zero in a log-space tensor is stored as (below any ``eps`` a normalisation layer adds)."""
TRANSFORMS = ("identity", "log")
FIT_SCALES = ("tensor", "residual")
"""What `WeightLayout.fit_stats` may scale a tensor by: its spread over the zoo, or around the element-wise zoo mean."""

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The layout's name for a floating dtype; raises for anything else."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported weight dtype {dtype}; expected one of {sorted(_DTYPES)}")


@dataclass
class TensorSpec:
    """One selected tensor: its name, shape, dtype, normalisation statistics and value transform.

    ``transform="log"``: tokens hold ``log`` of the values (statistics are of the logs), so decoded
    values are always positive (BatchNorm ``running_var``). ``"identity"``: the values themselves.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    mean: float = 0.0
    std: float = 1.0
    transform: str = "identity"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def spec_forward(spec: TensorSpec, values: torch.Tensor) -> torch.Tensor:
    """Values -> what tokens hold before normalisation (``log`` for log-space tensors, zeros floored)."""
    return values.clamp_min(POSITIVE_FLOOR).log() if spec.transform == "log" else values


def spec_inverse(spec: TensorSpec, values: torch.Tensor) -> torch.Tensor:
    """Inverse of `spec_forward` (differentiable): ``exp`` for log-space tensors."""
    return values.exp() if spec.transform == "log" else values


@dataclass
class WeightLayout:
    """How the tensors of one architecture map to a sequence of weight tokens.

    Args:
        tensors: the selected tensors in token order.
        chunk_size: numbers per token.
        scale: how `fit_stats` measures each tensor's std (`FIT_SCALES`); refits keep it.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> layout = WeightLayout.from_module(net, include=["*.weight"], chunk_size=4)
        >>> tokens = layout.tokenize([net.state_dict()])
        >>> tokens.shape  # 12 numbers -> 3 tokens, 6 numbers -> 2 tokens
        torch.Size([1, 5, 4])
        >>> restored = layout.detokenize(tokens)[0]
        >>> torch.equal(restored["0.weight"], net[0].weight.detach())
        True
    """

    tensors: list[TensorSpec]
    chunk_size: int = 32
    scale: str = "tensor"
    _token_layer: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.scale not in FIT_SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; expected one of {list(FIT_SCALES)}")
        if not self.tensors:
            raise ValueError("a WeightLayout needs at least one tensor; the include patterns matched nothing")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor names in layout: {names}")
        self.tensors = [
            TensorSpec(t.name, tuple(int(s) for s in t.shape), t.dtype, float(t.mean), float(t.std), t.transform)
            for t in self.tensors
        ]
        for t in self.tensors:
            if t.transform not in TRANSFORMS:
                raise ValueError(f"tensor '{t.name}' has unknown transform {t.transform!r}; expected one of {list(TRANSFORMS)}")
            if t.dtype not in _DTYPES:
                raise ValueError(f"tensor '{t.name}' has unsupported dtype {t.dtype!r}; expected one of {sorted(_DTYPES)}")
            if any(s < 0 for s in t.shape):
                raise ValueError(f"tensor '{t.name}' has a negative dimension in shape {list(t.shape)}")
            if not (math.isfinite(t.mean) and math.isfinite(t.std) and t.std > 0):
                raise ValueError(f"tensor '{t.name}' has invalid statistics mean={t.mean} std={t.std}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        chunk_size: int = 32,
    ) -> WeightLayout:
        """Select floating tensors whose names match any ``include`` glob and no ``exclude`` glob.

        Integer tensors (``num_batches_tracked``) are never selected; those matching `POSITIVE_TENSORS`
        get ``transform="log"``.
        """
        specs = []
        for name, value in state_dict.items():
            if not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            if not torch.is_floating_point(value):
                continue
            transform = "log" if any(fnmatch.fnmatchcase(name, p) for p in POSITIVE_TENSORS) else "identity"
            specs.append(TensorSpec(name, tuple(value.shape), dtype_name(value.dtype), transform=transform))
        if not specs:
            raise ValueError(
                f"no floating tensor matches include={list(include)} exclude={list(exclude)}; "
                f"available: {list(state_dict)[:10]}"
            )
        return cls(specs, chunk_size)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        chunk_size: int = 32,
    ) -> WeightLayout:
        """Like `from_state_dict` over ``module.state_dict()``."""
        return cls.from_state_dict(module.state_dict(), include, exclude, chunk_size)

    # ------------------------------------------------------------------ geometry
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def tokens_per_tensor(self) -> list[int]:
        return [math.ceil(t.numel / self.chunk_size) for t in self.tensors]

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_per_tensor())

    @property
    def token_layer(self) -> torch.Tensor:
        """Index of the tensor each token belongs to, shape [T]."""
        if self._token_layer is None:
            counts = torch.tensor(self.tokens_per_tensor())
            self._token_layer = torch.repeat_interleave(torch.arange(len(self.tensors)), counts)
        return self._token_layer

    @property
    def token_offset(self) -> torch.Tensor:
        """Position of each token inside its tensor (0, 1, ...), shape [T]."""
        return torch.cat([torch.arange(n) for n in self.tokens_per_tensor()])

    def padding_mask(self) -> torch.Tensor:
        """``[T, chunk_size]`` float mask: 1 where a token holds a weight, 0 on tail padding."""
        parts = []
        for spec, n_tok in zip(self.tensors, self.tokens_per_tensor()):
            valid = torch.zeros(n_tok * self.chunk_size)
            valid[: spec.numel] = 1.0
            parts.append(valid.view(n_tok, self.chunk_size))
        return torch.cat(parts)

    def head_names(self) -> list[str]:
        """Tensors of the layout's last module (e.g. ``head.weight``, ``head.bias``): the classifier head,
        provided the layout lists the head last, as every built-in recipe does."""
        module = self.names[-1].rpartition(".")[0]
        return [n for n in self.names if n.rpartition(".")[0] == module]

    # ------------------------------------------------------------------ validation
    def validate(self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = False, where: str = "") -> None:
        """Raise ``ValueError`` naming the first missing, misshapen or non-finite tensor.

        With ``strict=True`` keys that the layout does not select are errors too.
        """
        prefix = f"{where}: " if where else ""
        for spec in self.tensors:
            if spec.name not in state_dict:
                raise ValueError(f"{prefix}missing tensor '{spec.name}' (expected shape {list(spec.shape)})")
            value = state_dict[spec.name]
            if tuple(value.shape) != spec.shape:
                raise ValueError(
                    f"{prefix}tensor '{spec.name}' has shape {list(value.shape)}, expected {list(spec.shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"{prefix}tensor '{spec.name}' contains NaN or Inf values")
            if spec.transform == "log" and (value < 0).any():
                raise ValueError(f"{prefix}tensor '{spec.name}' has negative values; a variance cannot be negative")
        if strict:
            unexpected = sorted(set(state_dict) - set(self.names))
            if unexpected:
                raise ValueError(f"{prefix}unexpected tensor '{unexpected[0]}' not in the layout")

    def select(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layout's tensors of ``state_dict``, validated."""
        self.validate(state_dict)
        return {name: state_dict[name] for name in self.names}

    # ------------------------------------------------------------------ statistics
    def fit_stats(self, state_dicts: Iterable[Mapping[str, torch.Tensor]], *, scale: str | None = None) -> WeightLayout:
        """Fit per-tensor mean and std over a zoo (float64 running sums); returns ``self``.

        Args:
            state_dicts: the zoo's members (read once, one at a time).
            scale: what the std measures, kept as the layout's ``scale`` (``None``: the layout's). ``"tensor"``: the spread of the tensor's values over all members.
                ``"residual"``: the spread of each value around its element-wise zoo mean, for zoos whose members
                share an initialisation (LoRA members from one warm start differ from it by a few percent of its
                scale). The weight VAE subtracts that element-wise mean (`d2nwg.models.WeightVAE.mean_tokens`), so
                with ``"residual"`` what it encodes, the task-specific part, has unit scale instead of a small
                fraction of it (measured on the default ``llm-lora`` zoo: 4.2% of the per-tensor variance).

        Raises:
            ValueError: no state_dicts, an unknown ``scale``, or a member that does not fit the layout.
        """
        scale = self.scale if scale is None else scale
        if scale not in FIT_SCALES:
            raise ValueError(f"unknown scale {scale!r}; expected one of {list(FIT_SCALES)}")
        total = [0.0] * len(self.tensors)
        total_sq = [0.0] * len(self.tensors)
        # Element-wise sums, only for "residual" (float64, the size of one member twice).
        sums: list[torch.Tensor | None] = [None] * len(self.tensors)
        count = 0
        for sd in state_dicts:
            self.validate(sd)
            for i, spec in enumerate(self.tensors):
                v = spec_forward(spec, sd[spec.name].detach().to(torch.float64))
                total[i] += v.sum().item()
                total_sq[i] += (v * v).sum().item()
                if scale == "residual":
                    sums[i] = v.clone() if sums[i] is None else sums[i].add_(v)
            count += 1
        if count == 0:
            raise ValueError("fit_stats needs at least one state_dict")
        for i, spec in enumerate(self.tensors):
            n = count * spec.numel
            mean = total[i] / n if n else 0.0
            if scale == "residual":
                # sum over members of (v - mean_e)^2 = total_sq - count * sum_e mean_e^2
                element_mean = sums[i] / count
                var = max(total_sq[i] / n - float((element_mean * element_mean).sum()) / spec.numel, 0.0) if n else 0.0
            else:
                var = max(total_sq[i] / n - mean * mean, 0.0) if n else 0.0
            # Rounded so that normalisation is exactly invertible: a power-of-two std makes
            # ``/ std`` and ``* std`` exact, and a float32 mean makes ``0 - mean`` exact even in
            # float32 tokens (otherwise zeros come back as ~1e-17 and bf16 values drift).
            mean32 = float(torch.tensor(mean, dtype=torch.float32))
            spec.mean = mean32 if math.isfinite(mean32) else mean
            # A constant tensor (e.g. never-trained bias) keeps unit scale instead of blowing up.
            spec.std = 2.0 ** round(math.log2(math.sqrt(var))) if var > 1e-20 else 1.0
        self.scale = scale
        return self

    # ------------------------------------------------------------------ tokens
    def tokenize(
        self,
        state_dicts: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
        *,
        normalize: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Stack state_dicts into tokens ``[B, T, chunk_size]`` (padding is zero)."""
        if isinstance(state_dicts, Mapping):
            state_dicts = [state_dicts]
        for b, sd in enumerate(state_dicts):
            self.validate(sd, where=f"state_dict {b}")
        if not state_dicts:
            raise ValueError("tokenize needs at least one state_dict")
        parts = []
        for spec, n_tok in zip(self.tensors, self.tokens_per_tensor()):
            flat = spec_forward(spec, torch.stack([sd[spec.name].detach().reshape(-1) for sd in state_dicts]).to(torch.float64))
            if normalize:
                flat = (flat - spec.mean) / spec.std
            pad = n_tok * self.chunk_size - spec.numel
            flat = nn.functional.pad(flat, (0, pad))
            parts.append(flat.view(len(state_dicts), n_tok, self.chunk_size))
        return torch.cat(parts, dim=1).to(dtype)

    def unflatten(self, tokens: torch.Tensor, *, normalize: bool = True) -> dict[str, torch.Tensor]:
        """Tokens ``[B, T, chunk_size]`` -> ``{name: [B, *shape]}`` in the tokens' dtype, keeping gradients.

        Log-space tensors come back through ``exp`` (positive). With ``normalize=False`` tokens are
        taken as the transformed values themselves (the logs, for log-space tensors).

        The batched, differentiable inverse of `tokenize` (used by function-space losses);
        `detokenize` is its exact, per-member counterpart.
        """
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        expected = (self.num_tokens, self.chunk_size)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens have shape {list(tokens.shape)}, expected [B, {expected[0]}, {expected[1]}]")
        out, start = {}, 0
        for spec, n_tok in zip(self.tensors, self.tokens_per_tensor()):
            flat = tokens[:, start : start + n_tok].reshape(tokens.shape[0], n_tok * self.chunk_size)[:, : spec.numel]
            if normalize:
                flat = flat * spec.std + spec.mean
            out[spec.name] = spec_inverse(spec, flat).reshape(tokens.shape[0], *spec.shape)
            start += n_tok
        return out

    def detokenize(self, tokens: torch.Tensor, *, normalize: bool = True) -> list[dict[str, torch.Tensor]]:
        """Inverse of `tokenize`: tokens ``[B, T, chunk_size]`` (or ``[T, chunk_size]``) to state_dicts."""
        stacked = self.unflatten(tokens.detach().to(torch.float64), normalize=normalize)
        batch = next(iter(stacked.values())).shape[0]
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(batch)]
        for spec in self.tensors:
            values = stacked[spec.name].to(_DTYPES[spec.dtype])
            for b in range(batch):
                out[b][spec.name] = values[b].clone()
        return out

    # ------------------------------------------------------------------ injection
    def inject(self, module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """Copy the layout's tensors into ``module`` after checking every key and shape first."""
        self.validate(state_dict)
        targets = dict(module.named_parameters(remove_duplicate=False))
        targets.update(dict(module.named_buffers(remove_duplicate=False)))
        for spec in self.tensors:
            if spec.name not in targets:
                raise ValueError(f"module has no parameter or buffer '{spec.name}'")
            if tuple(targets[spec.name].shape) != spec.shape:
                raise ValueError(
                    f"module tensor '{spec.name}' has shape {list(targets[spec.name].shape)}, "
                    f"layout expects {list(spec.shape)}"
                )
        with torch.no_grad():
            for spec in self.tensors:
                targets[spec.name].copy_(state_dict[spec.name])
        return module

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """JSON-ready; ``transform`` and ``scale`` are written only where they are not the default (older readers
        stay happy)."""
        tensors = []
        for t in self.tensors:
            item = {**asdict(t), "shape": list(t.shape)}
            if t.transform == "identity":
                del item["transform"]
            tensors.append(item)
        out = {"chunk_size": self.chunk_size, "tensors": tensors}
        if self.scale != "tensor":
            out["scale"] = self.scale
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> WeightLayout:
        try:
            specs = [TensorSpec(**t) for t in data["tensors"]]
            return cls(specs, int(data["chunk_size"]), str(data.get("scale", "tensor")))
        except (KeyError, TypeError) as err:
            raise ValueError(f"invalid layout description: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> WeightLayout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"layout is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> WeightLayout:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"layout file not found: {path}")
        data = read_json(path, "layout")
        if not isinstance(data, Mapping):
            raise ValueError(f"invalid layout description in {path}: expected a JSON object")
        return cls.from_dict(data)
