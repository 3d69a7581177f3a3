"""Build a `ModelZoo` from a user's own checkpoints (``d2nwg zoo ingest``).

Inputs:

* a folder of checkpoints (``*.safetensors``, or ``*.pt``/``*.pth`` read with
  ``torch.load(weights_only=True)``), all of one architecture;
* a folder of datasets (image folders of class subfolders, ``.npz`` with ``x``/``y``
  or ``.csv`` with a label column), read with `d2nwg.datasets.load_dataset`;
* a mapping file saying which dataset each checkpoint was trained on, as CSV with
  columns ``checkpoint,dataset[,split]`` or JSON
  ``{checkpoint: dataset}`` / ``{checkpoint: {"dataset": ..., "split": ...}}``.

Each dataset's samples are split per class into train/support/test; its classes
enter the zoo's class pool as ``"<dataset>/<class>"``, and each checkpoint becomes
one task (the dataset's classes in label order) with one member. Label order is
the sorted class names, numerically when every name is an integer (so ``.npz``
labels ``0..10`` keep their ids).

Every checkpoint is checked before anything is written: it must load, hold every
layout tensor with the right shape and finite values, hold no unexpected tensor
among those the include/exclude globs select, and the model's output width must
equal its dataset's class count. Bad checkpoints are collected and reported
together (`BadCheckpointsError`) unless ``skip_bad`` leaves them out. The zoo is
written into a temp folder and renamed into place, so a failure leaves no output.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from d2nwg.architectures import build_model
from d2nwg.datasets import LabelledDataset, load_dataset
from d2nwg.io import atomic_dir, load_weights
from d2nwg.weights import WeightLayout
from d2nwg.zoo import SPLITS, ModelZoo

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
DATASET_SUFFIXES = (".npz", ".csv")
TASK_SPLITS = ("train", "heldout")


@dataclass
class MappingEntry:
    """One row of the mapping file: a checkpoint file, its dataset and optionally its task split."""

    checkpoint: str
    dataset: str
    split: str | None = None


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
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source} must be a JSON object of builder arguments, got {type(config).__name__}")
    return config


def read_mapping(path: str | Path) -> list[MappingEntry]:
    """The mapping file as entries; malformed files raise ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mapping file not found: {path}")
    text = path.read_text()
    is_json = path.suffix.lower() == ".json" or (path.suffix.lower() != ".csv" and text.lstrip().startswith("{"))
    entries = _read_json_mapping(path, text) if is_json else _read_csv_mapping(path, text)
    if not entries:
        raise ValueError(f"mapping file {path} names no checkpoints")
    seen: set[str] = set()
    for entry in entries:
        if not entry.checkpoint or not entry.dataset:
            raise ValueError(f"mapping file {path}: every entry needs a checkpoint and a dataset, got {entry}")
        if entry.checkpoint in seen:
            raise ValueError(f"mapping file {path} lists checkpoint '{entry.checkpoint}' twice")
        seen.add(entry.checkpoint)
        if entry.split is not None and entry.split not in TASK_SPLITS:
            raise ValueError(
                f"mapping file {path}: checkpoint '{entry.checkpoint}' has split '{entry.split}', expected one of {TASK_SPLITS}"
            )
    return entries


def _read_json_mapping(path: Path, text: str) -> list[MappingEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"mapping file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"mapping file {path} must hold a JSON object {{checkpoint: dataset}}")
    entries = []
    for checkpoint, value in data.items():
        if isinstance(value, str):
            entries.append(MappingEntry(checkpoint, value))
        elif isinstance(value, dict) and isinstance(value.get("dataset"), str):
            split = value.get("split")
            if split is not None and not isinstance(split, str):
                raise ValueError(f"mapping file {path}: split of '{checkpoint}' must be a string")
            entries.append(MappingEntry(checkpoint, value["dataset"], split or None))
        else:
            raise ValueError(
                f"mapping file {path}: '{checkpoint}' must map to a dataset name or {{\"dataset\": ..., \"split\": ...}}"
            )
    return entries


def _read_csv_mapping(path: Path, text: str) -> list[MappingEntry]:
    rows = [[c.strip() for c in row] for row in csv.reader(line for line in text.splitlines() if line.strip())]
    header = rows[0] if rows else []
    if "checkpoint" not in header or "dataset" not in header:
        raise ValueError(f"mapping file {path} needs a CSV header with columns checkpoint,dataset[,split]; found {header}")
    entries = []
    for row in rows[1:]:
        values = dict(zip(header, row))
        entries.append(MappingEntry(values.get("checkpoint", ""), values.get("dataset", ""), values.get("split") or None))
    return entries


# ----------------------------------------------------------------------------- datasets
def _resolve_dataset(root: Path, name: str) -> Path | None:
    path = root / name
    if path.exists():
        return path
    if not Path(name).suffix:
        for suffix in DATASET_SUFFIXES:
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
    return None


def _dataset_key(path: Path) -> str:
    """The pool namespace of a dataset: its folder name, or its file name without ``.npz``/``.csv``."""
    return path.name if path.is_dir() else path.stem


def numeric_label_order(dataset: LabelledDataset) -> LabelledDataset:
    """Order classes numerically when every class name is an integer (``"2"`` before ``"10"``)."""
    try:
        keys = [int(name) for name in dataset.class_names]
    except ValueError:
        return dataset
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return LabelledDataset(
        [dataset.per_class[i] for i in order], [dataset.class_names[i] for i in order], [dataset.sources[i] for i in order]
    )


def split_dataset(
    name: str, dataset: LabelledDataset, fractions: Sequence[float], seed: int
) -> list[dict[str, torch.Tensor]]:
    """Per class (label order): ``{"train", "support", "test"}`` samples, a seeded shuffle of the class.

    The shuffle depends on ``seed`` and the dataset name only, not on the mapping's order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = []
    for cls, x in zip(dataset.class_names, dataset.per_class):
        n = len(x)
        n_support = max(1, round(fractions[1] * n))
        n_test = max(1, round(fractions[2] * n))
        n_train = n - n_support - n_test
        if n_train < 1:
            raise ValueError(
                f"dataset '{name}': class '{cls}' has {n} sample(s), too few for train/support/test "
                f"splits of {list(fractions)} (each split needs at least 1)"
            )
        perm = torch.randperm(n, generator=g)
        out.append(
            {
                "train": x[perm[:n_train]],
                "support": x[perm[n_train : n_train + n_support]],
                "test": x[perm[n_train + n_support :]],
            }
        )
    return out


# ----------------------------------------------------------------------------- checkpoints
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def load_checkpoint(
    path: Path, layout: WeightLayout, include: Sequence[str], exclude: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The layout's tensors of a checkpoint (in the layout's dtypes); ``ValueError`` says what is wrong."""
    state = load_weights(path)
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


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def _split_data(splits: list[dict[str, torch.Tensor]], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([s[split] for s in splits]).float()
    y = torch.cat([torch.full((len(s[split]),), i, dtype=torch.long) for i, s in enumerate(splits)])
    return x, y


def _member_ids(names: Sequence[str]) -> dict[str, str]:
    """Checkpoint file name -> a file-system-safe member id (its stem; the whole name on a clash)."""

    def clean(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".") or "member"

    stems = [clean(Path(n).stem) for n in names]
    ids = {n: s if stems.count(s) == 1 else clean(n) for n, s in zip(names, stems)}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"checkpoint names give clashing member ids: {sorted(ids)}")
    return ids


# ----------------------------------------------------------------------------- ingest
def ingest(
    checkpoints: str | Path,
    datasets: str | Path,
    mapping: str | Path,
    arch: str,
    out: str | Path,
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
    warn: Callable[[str], None] | None = None,
) -> ModelZoo:
    """Build a zoo at ``out`` from the checkpoints in ``checkpoints`` (see the module docstring).

    Args:
        checkpoints: folder of ``*.safetensors``/``*.pt``/``*.pth`` state_dicts.
        datasets: folder holding the datasets the mapping names.
        mapping: CSV ``checkpoint,dataset[,split]`` or JSON mapping file.
        arch: a registered architecture name or ``"module:callable"``; ``arch_config`` its arguments.
        out: the new zoo folder (must not exist or be empty).
        include, exclude: globs selecting the tensors that make up the layout.
        chunk_size: numbers per weight token.
        heldout_fraction: share of checkpoints without a split in the mapping that become held-out tasks.
        split_fractions: per-class train/support/test fractions of every dataset.
        seed: seeds the data splits, the held-out choice and the architecture's initialisation.
        skip_bad: leave bad checkpoints out (reported through ``warn``) instead of raising.
        image_size: ``H,W`` image folders are resized to.
        label_column: label column of ``.csv`` datasets.
        warn: receives one line per warning (skipped or unmapped checkpoints).

    Raises:
        BadCheckpointsError: bad checkpoints without ``skip_bad`` (nothing is written).
        ValueError: any other problem with the inputs (nothing is written).
    """
    warn = warn or (lambda message: None)
    include = tuple(include or ("*",))
    exclude = tuple(exclude)
    fractions = parse_split_fractions(split_fractions)
    height, width = parse_image_size(image_size)
    config = parse_arch_config(arch_config)
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder; choose a new one")
    ckpt_root, data_root = Path(checkpoints), Path(datasets)
    for flag, root in (("--checkpoints", ckpt_root), ("--datasets", data_root)):
        if not root.is_dir():
            raise ValueError(f"{flag} folder not found: {root}")

    # --- mapping: every named checkpoint and dataset must exist
    entries = read_mapping(mapping)
    missing_ckpts = [e.checkpoint for e in entries if not (ckpt_root / e.checkpoint).is_file()]
    wrong_type = [e.checkpoint for e in entries if Path(e.checkpoint).suffix.lower() not in CHECKPOINT_SUFFIXES]
    dataset_paths = {e.dataset: _resolve_dataset(data_root, e.dataset) for e in entries}
    missing_data = sorted(name for name, p in dataset_paths.items() if p is None)
    problems = []
    if missing_ckpts:
        problems.append(f"checkpoint(s) not found in {ckpt_root}: {', '.join(missing_ckpts)}")
    if wrong_type:
        problems.append(f"checkpoint(s) {', '.join(wrong_type)} are not {'/'.join(CHECKPOINT_SUFFIXES)} files")
    if missing_data:
        problems.append(f"dataset(s) not found in {data_root}: {', '.join(missing_data)}")
    if problems:
        raise ValueError(f"mapping file {mapping}: " + "; ".join(problems))
    mapped = {e.checkpoint for e in entries}
    for path in sorted(ckpt_root.iterdir()):
        if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.name not in mapped:
            warn(f"checkpoint {path.name} is not in the mapping; ignored")

    # --- datasets: load, check feature dims, split per class
    keys: dict[str, str] = {}  # dataset key -> the mapping name that first resolved to it
    for name, path in dataset_paths.items():
        key = _dataset_key(path)
        if key in keys and dataset_paths[keys[key]] != path:
            raise ValueError(f"datasets '{keys[key]}' and '{name}' both map to the class namespace '{key}'; rename one")
        keys.setdefault(key, name)
    images = any(p.is_dir() for p in dataset_paths.values())
    input_spec = {"image_size": [height, width], "grayscale": True} if images else {}
    loaded: dict[str, LabelledDataset] = {}
    for key, name in keys.items():
        loaded[key] = numeric_label_order(load_dataset(dataset_paths[name], input_spec, None, label_column))
    dims = {key: int(ds.per_class[0].shape[-1]) for key, ds in loaded.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"datasets have different feature dimensions {dims}; one zoo needs one input size")
    splits = {key: split_dataset(key, ds, fractions, seed) for key, ds in loaded.items()}

    # --- architecture and layout
    spec = {"name": arch, "config": config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    model.eval()
    layout = WeightLayout.from_module(model, include, exclude, chunk_size)
    widths: dict[str, int] = {}
    for key, data in splits.items():
        x, _ = _split_data(data, "test")
        try:
            with torch.no_grad():
                logits = model(x)
        except Exception as err:  # a user's module raises anything on a wrong input size
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"architecture '{arch}' cannot run on dataset '{key}' ({dims[key]} features per sample): {first}"
            ) from None
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != len(x):
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"architecture '{arch}' must return logits [n, classes]; got {shape} on dataset '{key}'")
        widths[key] = int(logits.shape[-1])

    # --- checkpoints: validate every one, collect all problems
    ids = _member_ids([e.checkpoint for e in entries])
    good: list[tuple[MappingEntry, str, dict[str, float]]] = []  # entry, dataset key, metrics
    bad: list[BadCheckpoint] = []
    for entry in entries:
        key = _dataset_key(dataset_paths[entry.dataset])
        try:
            state = load_checkpoint(ckpt_root / entry.checkpoint, layout, include, exclude)
            classes = loaded[key].num_classes
            if widths[key] != classes:
                raise ValueError(
                    f"class count mismatch: the model outputs {widths[key]} logits but dataset '{key}' has {classes} classes"
                )
            layout.inject(model, state)
            metrics = {f"{s}_acc": accuracy(model, *_split_data(splits[key], s)) for s in SPLITS}
        except ValueError as err:
            bad.append(BadCheckpoint(entry.checkpoint, str(err).splitlines()[0] if str(err) else "unusable"))
            continue
        good.append((entry, key, metrics))
    if bad and not skip_bad:
        raise BadCheckpointsError(bad)
    for b in bad:
        warn(f"skipping bad checkpoint {b.name}: {b.reason}")
    if not good:
        raise ValueError("no usable checkpoints: nothing to build a zoo from")

    # --- task splits: from the mapping, else a seeded heldout_fraction of the rest
    task_split = {e.checkpoint: e.split for e, _, _ in good if e.split}
    free = sorted(e.checkpoint for e, _, _ in good if not e.split)
    n_heldout = round(heldout_fraction * len(free))
    if "train" not in task_split.values():
        n_heldout = min(n_heldout, len(free) - 1)
    perm = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed)).tolist()
    for rank, i in enumerate(perm):
        task_split[free[i]] = "heldout" if rank < max(n_heldout, 0) else "train"
    if "train" not in task_split.values():
        raise ValueError("every usable checkpoint is held out; a zoo needs at least one 'train' member")
    counts = {loaded[key].num_classes for _, key, _ in good}
    if len(counts) != 1:
        raise ValueError(f"checkpoints have different class counts {sorted(counts)}; one zoo needs one head size")

    # --- write atomically
    used = sorted({key for _, key, _ in good})
    classes = {
        f"{key}/{cls}": splits[key][i] for key in used for i, cls in enumerate(loaded[key].class_names)
    }
    tasks = {
        ids[e.checkpoint]: {"classes": [f"{key}/{c}" for c in loaded[key].class_names], "split": task_split[e.checkpoint]}
        for e, key, _ in good
    }
    recipe = {
        "name": "ingest",
        "checkpoints": str(ckpt_root.resolve()),
        "datasets": str(data_root.resolve()),
        "mapping": str(Path(mapping).resolve()),
        "include": list(include),
        "exclude": list(exclude),
        "chunk_size": chunk_size,
        "heldout_fraction": heldout_fraction,
        "split_fractions": list(fractions),
        "seed": seed,
        "skip_bad": skip_bad,
        "skipped": [b.name for b in bad],
        "sources": {ids[e.checkpoint]: e.checkpoint for e, _, _ in good},
    }
    with atomic_dir(out) as tmp:
        zoo = ModelZoo.create(
            tmp,
            architecture=spec,
            layout=layout,
            classes=classes,
            tasks=tasks,
            feature="identity",
            input_spec=input_spec,
            recipe=recipe,
        )
        for entry, _, metrics in good:
            state = load_checkpoint(ckpt_root / entry.checkpoint, layout, include, exclude)
            zoo.add(state, ids[entry.checkpoint], metrics, seed=0, member_id=ids[entry.checkpoint], flush=False)
        zoo.flush()
        zoo.fit_layout("train")
    return ModelZoo.open(out)
