"""Reading a user's labelled dataset: a folder of class subfolders of images, an ``.npz`` or a ``.csv``.

Every reader returns per-class feature tensors in label order plus the class
names, after converting samples to the input format the pipeline's zoo used
(``input`` spec: e.g. 8x8 grey images scaled to [0, 1] for digits).

Text pipelines (`d2nwg.zoo.specs.InputSpec` of kind ``"text"``) read raw sentences instead:
a ``.csv`` with a text and a label column, or a folder of class subfolders of
``.txt`` files with one sentence per line. The sentences go through the zoo's
frozen base model (`d2nwg.targets.text_classifier.modeling.text_features`), truncated to its
``max_length`` tokens, to become the same per-sample features as the zoo's.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2nwg.zoo.specs import InputSpec

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


def to_xy(per_class: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-class samples into one labelled batch.

    Args:
        per_class: ``per_class[i]`` holds the ``[n_i, D]`` samples of class i.

    Returns:
        ``x [sum n_i, D]`` (classes in order) and ``y [sum n_i]`` (int64, class i repeated ``n_i`` times).
    """
    x = torch.cat(list(per_class))
    y = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(per_class)])
    return x, y


def _order_classes(found: Sequence[str], classes: Sequence[str] | None, where: Path) -> list[str]:
    if classes is None:
        return sorted(found)
    unknown = [c for c in classes if c not in found]
    if unknown:
        raise ValueError(f"classes {unknown} not found in {where}; available: {sorted(found)}")
    return list(classes)


def load_image(path: Path, input_spec: InputSpec) -> np.ndarray:
    """One image as a flat float vector in the zoo's format (``image_size``, grey, scaled to [0, 1]).

    Without an ``image_size`` (a vector zoo) the image keeps its own size.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if input_spec.grayscale else "RGB")
            size = input_spec.image_size or (img.size[1], img.size[0])
            img = img.resize((size[1], size[0]), Image.BILINEAR) if img.size != (size[1], size[0]) else img
            return np.asarray(img, dtype=np.float32).reshape(-1) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"unreadable image {path}: {err}") from None


def load_image_folder(root: Path, input_spec: InputSpec, classes: Sequence[str] | None = None) -> LabelledDataset:
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


def _group(
    x: np.ndarray, labels: Sequence[str], classes: Sequence[str] | None, where: Path, row_sources: Sequence[str] | None = None
) -> LabelledDataset:
    """Rows ``x [n, ...]`` grouped by label; ``row_sources[i]`` names row i (default ``"row i"``)."""
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
        sources.append([f"row {i}" if row_sources is None else row_sources[i] for i in idx])
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


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a ``.csv``, checking that it has rows and the named ``columns``."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"unreadable csv file {path}: {err}") from None
    if not rows:
        raise ValueError(f"{path} has no rows")
    for column in columns:
        if column not in rows[0]:
            raise ValueError(f"{path} has no column '{column}'; columns: {list(rows[0])}")
    return rows


def load_csv(path: Path, label_column: str = "label", classes: Sequence[str] | None = None) -> LabelledDataset:
    """A ``.csv`` with numeric feature columns and a label column."""
    rows = _read_csv(path, [label_column])
    features = [c for c in rows[0] if c != label_column]
    try:
        x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: non-numeric feature value ({err})") from None
    return _group(x, [r[label_column] for r in rows], classes, path)


# ----------------------------------------------------------------------------- text
def read_text_csv(path: Path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str], list[str]]:
    """Sentences, labels and sources (``"row i"``, 0-based data rows) of a ``.csv``."""
    rows = _read_csv(path, [text_column, label_column])
    empty = [i for i, r in enumerate(rows) if not (r[text_column] or "").strip()]
    if empty:
        raise ValueError(f"{path}: empty text in row(s) {empty[:5]}")
    return [r[text_column] for r in rows], [r[label_column] for r in rows], [f"row {i}" for i in range(len(rows))]


def read_text_folder(root: Path) -> tuple[list[str], list[str], list[str]]:
    """Sentences, labels and sources (``"class/file.txt:line"``) of ``root/<class>/*.txt``, one sentence per line."""
    found = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"{root} has no class subfolders")
    texts, labels, sources = [], [], []
    for folder in found:
        before = len(texts)
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() == ".txt"):
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"unreadable text file {file}: {err}") from None
            for number, line in enumerate(lines, start=1):
                if line.strip():  # blank lines separate nothing: skip them
                    texts.append(line.strip())
                    labels.append(folder.name)
                    sources.append(f"{folder.name}/{file.name}:{number}")
        if len(texts) == before:
            raise ValueError(f"class '{folder.name}' in {root} has no sentences (.txt files, one per line)")
    return texts, labels, sources


def load_text_dataset(
    path: Path, input_spec: InputSpec, classes: Sequence[str] | None = None, label_column: str = "label", text_column: str = "text"
) -> LabelledDataset:
    """Sentences from a ``.csv`` or a folder of ``.txt`` class folders, as the zoo's features (see module docstring)."""
    if path.is_dir():
        texts, labels, sources = read_text_folder(path)
    elif path.suffix == ".csv":
        texts, labels, sources = read_text_csv(path, text_column, label_column)
    else:
        raise ValueError(f"unsupported text dataset {path}: expected a .csv with a text column or a folder of class folders of .txt files")
    _order_classes(sorted(set(labels)), classes, path)  # fail on unknown --classes before running the encoder
    from d2nwg.targets.text_classifier.modeling import text_features

    x = text_features(texts, input_spec.first_layer, input_spec.max_length, input_spec.base)
    return _group(x.numpy(), labels, classes, path, sources)


def load_dataset(
    path: str | Path,
    input_spec: InputSpec | Mapping | None = None,
    classes: Sequence[str] | None = None,
    label_column: str = "label",
    text_column: str = "text",
) -> LabelledDataset:
    """Read a dataset from a folder of class subfolders of images, an ``.npz`` or a ``.csv`` (or text, see above).

    Args:
        path: the dataset file or folder.
        input_spec: the zoo's input format (a dict is read with `InputSpec.from_dict`; ``None``: vectors).
        classes: class order (label i = ``classes[i]``); default: sorted class names.
        label_column: label column of a ``.csv``.
        text_column: sentence column of a text ``.csv``.

    Raises:
        ValueError: a missing or unsupported path, unknown ``classes``, or unreadable samples.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset not found: {path}")
    spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_dict(input_spec)
    if spec.kind == "text":
        return load_text_dataset(path, spec, classes, label_column, text_column)
    if spec.kind == "generative-text":
        raise ValueError(f"cannot read {path}: datasets of 'generative-text' pipelines are not supported yet")
    if path.is_dir():
        return load_image_folder(path, spec, classes)
    if path.suffix == ".npz":
        return load_npz(path, classes)
    if path.suffix == ".csv":
        return load_csv(path, label_column, classes)
    raise ValueError(f"unsupported dataset {path}: expected a folder of class folders, a .npz or a .csv")
