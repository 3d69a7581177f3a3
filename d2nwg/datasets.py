"""Reading a user's labelled dataset: a folder of class subfolders of images, an ``.npz`` or a ``.csv``.

Every reader returns per-class feature tensors in label order plus the class
names, after converting samples to the input format the pipeline's zoo used
(``input`` spec: e.g. 8x8 grey images scaled to [0, 1] for digits).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class LabelledDataset:
    """Per-class samples in label order; ``sources[i][j]`` names sample j of class i (file or row)."""

    per_class: list[torch.Tensor]
    class_names: list[str]
    sources: list[list[str]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _order_classes(found: Sequence[str], classes: Sequence[str] | None, where: Path) -> list[str]:
    if classes is None:
        return sorted(found)
    unknown = [c for c in classes if c not in found]
    if unknown:
        raise ValueError(f"classes {unknown} not found in {where}; available: {sorted(found)}")
    return list(classes)


def load_image(path: Path, input_spec: Mapping) -> np.ndarray:
    """One image as a flat float vector in the zoo's format (``image_size``, grey, scaled to [0, 1])."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if input_spec.get("grayscale", True) else "RGB")
            size = tuple(input_spec.get("image_size", img.size))
            img = img.resize((size[1], size[0]), Image.BILINEAR) if img.size != (size[1], size[0]) else img
            return np.asarray(img, dtype=np.float32).reshape(-1) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"unreadable image {path}: {err}") from None


def load_image_folder(root: Path, input_spec: Mapping, classes: Sequence[str] | None = None) -> LabelledDataset:
    """``root/<class>/*.png``; class order is sorted folder names unless ``classes`` is given."""
    found = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not found:
        raise ValueError(f"{root} has no class subfolders")
    names = _order_classes(found, classes, root)
    per_class, sources = [], []
    for name in names:
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class '{name}' in {root} has no images")
        per_class.append(torch.tensor(np.stack([load_image(f, input_spec) for f in files])))
        sources.append([f"{name}/{f.name}" for f in files])
    return LabelledDataset(per_class, names, sources)


def _group(x: np.ndarray, labels: Sequence[str], classes: Sequence[str] | None, where: Path) -> LabelledDataset:
    if x.ndim < 2 or len(x) != len(labels):
        raise ValueError(f"{where}: expected features [n, ...] and n labels, got {list(x.shape)} and {len(labels)}")
    x = x.reshape(len(x), -1).astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: features contain NaN or Inf values")
    names = _order_classes(sorted(set(labels)), classes, where)
    per_class, sources = [], []
    for name in names:
        idx = [i for i, label in enumerate(labels) if label == name]
        if not idx:
            raise ValueError(f"class '{name}' in {where} has no samples")
        per_class.append(torch.tensor(x[idx]))
        sources.append([f"row {i}" for i in idx])
    return LabelledDataset(per_class, names, sources)


def load_npz(path: Path, classes: Sequence[str] | None = None) -> LabelledDataset:
    """An ``.npz`` with arrays ``x`` (features) and ``y`` (labels)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise ValueError(f"{path} must hold arrays 'x' and 'y', found {sorted(data.files)}")
            x, y = data["x"], data["y"]
    except (OSError, EOFError) as err:
        raise ValueError(f"unreadable npz file {path}: {err}") from None
    return _group(x, [str(v) for v in y.tolist()], classes, path)


def load_csv(path: Path, label_column: str = "label", classes: Sequence[str] | None = None) -> LabelledDataset:
    """A ``.csv`` with numeric feature columns and a label column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    if label_column not in rows[0]:
        raise ValueError(f"{path} has no label column '{label_column}'; columns: {list(rows[0])}")
    features = [c for c in rows[0] if c != label_column]
    try:
        x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: non-numeric feature value ({err})") from None
    return _group(x, [r[label_column] for r in rows], classes, path)


def load_dataset(
    path: str | Path, input_spec: Mapping | None = None, classes: Sequence[str] | None = None, label_column: str = "label"
) -> LabelledDataset:
    """Read a dataset from a folder of class subfolders of images, an ``.npz`` or a ``.csv``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset not found: {path}")
    if path.is_dir():
        return load_image_folder(path, input_spec or {}, classes)
    if path.suffix == ".npz":
        return load_npz(path, classes)
    if path.suffix == ".csv":
        return load_csv(path, label_column, classes)
    raise ValueError(f"unsupported dataset {path}: expected a folder of class folders, a .npz or a .csv")
