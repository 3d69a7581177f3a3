"""Typed descriptions of what a zoo's samples are (`InputSpec`) and what a pipeline generates (`TargetSpec`).

Both are stored as plain JSON dicts (the zoo manifest's ``input``, the pipeline's
``target`` init kwarg in ``model_index.json``) and read back with ``from_dict``, the
way `d2nwg.zoo.layout.WeightLayout` is. Code reads typed fields (``zoo.input_spec.kind``,
``pipe.target_spec.num_classes``) instead of ``.get()`` chains on the dicts.

`InputSpec.kind` is the single answer to "what is the input?":

=================  ==================================================================
kind               samples
=================  ==================================================================
vector             feature vectors as given (``.npz`` / ``.csv``; ingested zoos)
image              images resized to ``image_size`` (grey if ``grayscale``), scaled to [0, 1]
text               sentences through the frozen base model (`d2nwg.targets.text_classifier.modeling.text_features`)
generative-text    prompts for a generative language model (reserved for LLM adapter zoos)
=================  ==================================================================

Dicts written before ``kind`` existed are read by inferring it the way d2nwg used to
decide: ``"text": true`` means text, an ``image_size`` means image, anything else vector.

Example:
    >>> spec = InputSpec.from_dict({"image_size": [8, 8], "grayscale": True})   # an old digits zoo
    >>> spec.kind, spec.image_size
    ('image', (8, 8))
    >>> spec.to_dict()
    {'kind': 'image', 'image_size': [8, 8]}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

INPUT_KINDS = ("vector", "image", "text", "generative-text")
TEXT_FIELDS = ("base", "max_length", "first_layer")
"""What a ``text`` input needs to turn sentences into the zoo's features."""


@dataclass(frozen=True)
class InputSpec:
    """How a raw user dataset becomes the per-sample features a zoo and its pipeline use.

    Args:
        kind: one of ``INPUT_KINDS`` (see the module docstring).
        image_size: ``(H, W)`` images are resized to; required for ``kind="image"``.
        grayscale: images are read as one grey channel (else RGB).
        base: the frozen base model of text inputs (a packaged name, local folder or Hub id).
        max_length: tokens per sentence of text inputs.
        first_layer: the base layer whose input hidden states are cached as features.
        condition_features: only the first this many numbers of a sample describe the
            dataset to the hyper-model (text samples also carry the cached encoder state);
            ``None``: all of them.
        condition_blocks: equal-width blocks of those numbers that a conditioning kernel centres and normalises
            apart (`d2nwg.models.conditional_mean.kernel_keys`): 2 for causal-LM zoos that condition on an
            embedding and a gradient block (`d2nwg.targets.causal_lm.features.GRADIENT_POOLING`), else 1.

    Raises:
        ValueError: an unknown ``kind``, or a kind missing the fields it needs.
    """

    kind: str = "vector"
    image_size: tuple[int, int] | None = None
    grayscale: bool = True
    base: str | None = None
    max_length: int | None = None
    first_layer: int | None = None
    condition_features: int | None = None
    condition_blocks: int = 1

    def __post_init__(self):
        if int(self.condition_blocks) < 1 or (self.condition_features or 0) % int(self.condition_blocks):
            raise ValueError(f"condition_blocks must be >= 1 and divide condition_features, got {self.condition_blocks}")
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"unknown input kind {self.kind!r}; expected one of {list(INPUT_KINDS)}")
        if self.image_size is not None:
            size = tuple(int(s) for s in self.image_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"image_size must be two positive integers (H, W), got {list(self.image_size)}")
            object.__setattr__(self, "image_size", size)  # lists from JSON become a hashable tuple
        if self.kind == "image" and self.image_size is None:
            raise ValueError("an 'image' input needs image_size (H, W)")
        if self.kind == "text":
            missing = [f for f in TEXT_FIELDS if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a 'text' input needs {missing}")

    @property
    def is_text(self) -> bool:
        """Whether samples come from raw text (``"text"`` or ``"generative-text"``)."""
        return self.kind in ("text", "generative-text")

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": ..., <fields that differ from their defaults>}``, JSON-ready."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "kind" and value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping | None) -> InputSpec:
        """Read a `to_dict` result, or an older dict without ``kind`` (inferred as before).

        Args:
            data: the manifest's ``input`` dict; ``None`` or ``{}`` is a plain vector input.

        Raises:
            ValueError: unknown keys, or values that `InputSpec` rejects.
        """
        data = dict(data or {})
        legacy_text = bool(data.pop("text", False))  # the pre-``kind`` text flag
        if "kind" not in data:
            data["kind"] = "text" if legacy_text else "image" if data.get("image_size") is not None else "vector"
        return _construct(cls, data, "input spec")


@dataclass(frozen=True)
class TargetSpec:
    """What a pipeline generates: the pipeline's ``target`` (stored as a dict in ``model_index.json``).

    Args:
        architecture: ``{"name": ..., "config": {...}}`` that `d2nwg.targets.architectures.build_model` rebuilds.
        layout: `d2nwg.zoo.layout.WeightLayout.to_dict` of the generated weights.
        num_classes: classes of the generated models (K).
        input: how user datasets become samples (the zoo's `InputSpec`).
        zoo_recipe: name of the recipe that built the zoo (``"custom"`` for ingested zoos).
        data_stats: the zoo's feature range and training-task embeddings that `d2nwg generate` compares a
            user's dataset with (`d2nwg.pipelines.input_guard.zoo_statistics`); ``None`` in pipelines exported before it existed.
        base_identity: text-adapter targets only: the frozen base model the adapters were trained on (its
            architecture, the shapes the adapters touch and a fingerprint of the weights under them,
            `d2nwg.targets.adapters.base_identity.base_identity`), which ``d2nwg generate --base`` checks another base against;
            ``None`` for other targets and for pipelines exported before it was recorded.

    Raises:
        ValueError: an architecture without a name, or a num_classes below 1.

    Example:
        >>> spec = TargetSpec.from_dict(pipe.config.target)                    # doctest: +SKIP
        >>> spec.input.kind, spec.num_classes                                  # doctest: +SKIP
        ('image', 5)
    """

    architecture: dict
    layout: dict
    num_classes: int
    input: InputSpec = field(default_factory=InputSpec)
    zoo_recipe: str = "custom"
    data_stats: dict | None = None
    base_identity: dict | None = None

    def __post_init__(self):
        if not isinstance(self.architecture, Mapping) or "name" not in self.architecture:
            raise ValueError(f"target architecture must be {{'name': ..., 'config': {{...}}}}, got {self.architecture!r}")
        if int(self.num_classes) < 1:
            raise ValueError(f"target num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if not isinstance(self.input, InputSpec):
            object.__setattr__(self, "input", InputSpec.from_dict(self.input))

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON dict: what `d2nwg.pipelines.pipeline_d2nwg.D2NWGPipeline` takes as ``target`` (``data_stats`` and
        ``base_identity`` only if set)."""
        out = {
            "architecture": dict(self.architecture),
            "layout": dict(self.layout),
            "num_classes": self.num_classes,
            "input": self.input.to_dict(),
            "zoo_recipe": self.zoo_recipe,
        }
        if self.data_stats is not None:
            out["data_stats"] = dict(self.data_stats)
        if self.base_identity is not None:
            out["base_identity"] = dict(self.base_identity)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> TargetSpec:
        """Read a `to_dict` result, or an older target (with ``feature``, an input dict without ``kind``).

        Raises:
            ValueError: missing or unknown keys, or values that `TargetSpec` rejects.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a target must be a dict, got {type(data).__name__}")
        data = dict(data)
        data.pop("feature", None)  # written by older versions, never read
        data["input"] = InputSpec.from_dict(data.get("input"))
        return _construct(cls, data, "target")


def _construct(cls, data: dict, what: str):
    """``cls(**data)``, with unknown and missing keys reported as one ``ValueError``."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ValueError(f"invalid {what} (keys {sorted(data)}): {err}") from None  # the dict itself can be huge
