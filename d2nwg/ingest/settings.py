"""The settings of ``d2nwg zoo ingest``, parsed and checked before any checkpoint is read."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


# ----------------------------------------------------------------------------- parsing helpers
def parse_floats(text: str | Sequence[float], count: int, what: str) -> tuple[float, ...]:
    """``"0.6,0.2,0.2"`` (or a sequence) as ``count`` floats."""
    if isinstance(text, str):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"{what} expects {count} comma-separated numbers, got {text!r}") from None
    else:
        values = tuple(float(v) for v in text)
    if len(values) != count:
        raise ValueError(f"{what} expects {count} comma-separated numbers, got {text!r}")
    return values


def parse_split_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """Train/support/test fractions: three positive numbers summing to 1."""
    fractions = parse_floats(text, 3, "--split-fractions")
    if not all(math.isfinite(f) and f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"--split-fractions must be three positive numbers summing to 1 (train,support,test), got {text!r}")
    return fractions  # type: ignore[return-value]


def parse_image_size(text: str | Sequence[int]) -> tuple[int, int]:
    values = parse_floats(text, 2, "--image-size")
    if not all(v.is_integer() and v >= 1 for v in values):
        raise ValueError(f"--image-size expects two positive integers H,W, got {text!r}")
    return int(values[0]), int(values[1])


def parse_arch_config(text: str | Mapping | None) -> dict:
    """``--arch-config``: a JSON object, or the path of a JSON file holding one."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    source = "--arch-config"
    if not text.lstrip().startswith("{") and Path(text).is_file():
        source, text = text, Path(text).read_text()
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source} must be a JSON object of builder arguments, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------- stages
# ingest() runs these in order: parse_settings -> discover -> read_datasets -> build_target ->
# validate_checkpoints -> group_into_tasks -> split_tasks -> write_zoo. Each stage takes what the
# earlier ones produced and raises ValueError before anything is written.
# discover expands model folders into one entry per epoch; every checkpoint read goes through
# Target.read (key-prefix stripping); a task is a dataset and split_tasks chooses per task (joined by
# run/group), so no dataset is on both sides; a weight transform such as alignment fits before write_zoo.


@dataclass(frozen=True)
class IngestSettings:
    """The checked options of one ingest (see `ingest` for their meaning)."""

    arch: str
    arch_config: dict
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    chunk_size: int
    heldout_fraction: float
    split_fractions: tuple[float, float, float]
    seed: int
    skip_bad: bool
    image_size: tuple[int, int]
    label_column: str
    epochs: str | int = "last"
    """Which epochs of a model folder become members: ``"last"``, ``"all"`` or the last N (an int)."""


def parse_epochs(value: str | int) -> str | int:
    """``--epochs``: ``"last"``, ``"all"``, or a positive integer N (each model's last N epochs).

    Raises:
        ValueError: anything else.
    """
    text = str(value).strip().lower()
    if text in ("last", "all"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--epochs must be 'last', 'all' or a positive number of last epochs per model, got {value!r}")


def parse_settings(
    arch: str,
    *,
    arch_config: str | Mapping | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    chunk_size: int = 32,
    heldout_fraction: float = 0.1,
    split_fractions: str | Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    skip_bad: bool = False,
    image_size: str | Sequence[int] = (8, 8),
    label_column: str = "label",
    epochs: str | int = "last",
) -> IngestSettings:
    """Check and normalise `ingest`'s options (CLI strings or Python values).

    Returns:
        The settings; ``include`` defaults to every tensor (``"*"``).

    Raises:
        ValueError: malformed split fractions, image size, architecture config or epochs choice, or a held-out
            fraction outside [0, 1).
    """
    fractions = parse_split_fractions(split_fractions)
    size = parse_image_size(image_size)
    config = parse_arch_config(arch_config)
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    return IngestSettings(
        arch=arch,
        arch_config=config,
        include=tuple(include or ("*",)),
        exclude=tuple(exclude),
        chunk_size=chunk_size,
        heldout_fraction=heldout_fraction,
        split_fractions=fractions,
        seed=seed,
        skip_bad=skip_bad,
        image_size=size,
        label_column=label_column,
        epochs=parse_epochs(epochs),
    )


def check_new_folder(out: str | Path) -> Path:
    """``out`` as a path, if it does not exist or is an empty folder (the zoo must not mix with other files).

    Raises:
        ValueError: ``out`` is a file or a non-empty folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder; choose a new one")
    return out
