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
from d2nwg.datasets import LabelledDataset, load_dataset, to_xy
from d2nwg.ensemble import logits_accuracy
from d2nwg.errors import one_line
from d2nwg.io import atomic_dir, load_weights
from d2nwg.specs import InputSpec
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


def _member_ids(names: Sequence[str]) -> dict[str, str]:
    """Checkpoint file name -> a file-system-safe member id (its stem; the whole name on a clash)."""

    def clean(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".") or "member"

    stems = [clean(Path(n).stem) for n in names]
    ids = {n: s if stems.count(s) == 1 else clean(n) for n, s in zip(names, stems)}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"checkpoint names give clashing member ids: {sorted(ids)}")
    return ids


# ----------------------------------------------------------------------------- stages
# ingest() runs these in order: parse_settings -> discover -> read_datasets -> build_target ->
# validate_checkpoints -> group_into_tasks -> split_tasks -> write_zoo. Each stage takes what the
# earlier ones produced and raises ValueError before anything is written.
# Shaped for what comes next: a task holds a list of members and split_tasks chooses per task, so
# grouping several checkpoints of one run or dataset into one task changes group_into_tasks only;
# nested checkpoint folders belong to discover; every checkpoint read goes through Target.read
# (the place for key-prefix stripping); a weight transform such as alignment fits before write_zoo.


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
) -> IngestSettings:
    """Check and normalise `ingest`'s options (CLI strings or Python values).

    Returns:
        The settings; ``include`` defaults to every tensor (``"*"``).

    Raises:
        ValueError: malformed split fractions, image size or architecture config, or a held-out fraction outside [0, 1).
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


@dataclass
class Sources:
    """What an ingest reads: the mapping's entries, with the checkpoint and dataset each one names."""

    checkpoint_root: Path
    dataset_root: Path
    mapping: Path
    entries: list[MappingEntry]
    dataset_paths: dict[str, Path]
    """The mapping's dataset names -> the file or folder each resolves to."""

    def checkpoint_path(self, entry: MappingEntry) -> Path:
        return self.checkpoint_root / entry.checkpoint

    def dataset_key(self, entry: MappingEntry) -> str:
        """The class namespace of the entry's dataset (see `_dataset_key`)."""
        return _dataset_key(self.dataset_paths[entry.dataset])


def discover(
    checkpoints: str | Path, datasets: str | Path, mapping: str | Path, warn: Callable[[str], None]
) -> Sources:
    """Stage 1: find the inputs. Reads the mapping and checks that every file it names exists.

    Args:
        checkpoints: folder of ``*.safetensors``/``*.pt``/``*.pth`` files.
        datasets: folder of datasets (``name``, ``name.npz``, ``name.csv`` or a class-folder directory).
        mapping: the mapping file (see `read_mapping`).
        warn: receives one line per checkpoint file that the mapping does not name.

    Returns:
        The mapping's entries with resolved dataset paths.

    Raises:
        ValueError: a missing folder, a malformed mapping, or mapped files that are missing or of the wrong type
            (all of them in one message).
    """
    ckpt_root, data_root = Path(checkpoints), Path(datasets)
    for flag, root in (("--checkpoints", ckpt_root), ("--datasets", data_root)):
        if not root.is_dir():
            raise ValueError(f"{flag} folder not found: {root}")
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
    return Sources(ckpt_root, data_root, Path(mapping), entries, dataset_paths)  # type: ignore[arg-type]


@dataclass
class ZooDataset:
    """One dataset as it enters the zoo: classes in label order and each class's train/support/test samples."""

    key: str
    data: LabelledDataset
    splits: list[dict[str, torch.Tensor]]
    """Per class (label order): ``{"train", "support", "test"}`` samples."""

    def xy(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [n, D], y [n])`` of one split."""
        x, y = to_xy([s[split] for s in self.splits])
        return x.float(), y


def read_datasets(sources: Sources, settings: IngestSettings) -> tuple[dict[str, ZooDataset], InputSpec]:
    """Stage 2: load every mapped dataset and split each class into train/support/test.

    Image folders are resized to ``settings.image_size``; if any dataset is an image folder the zoo's input is
    images. Label order is numeric when every class name is an integer (`numeric_label_order`).

    Returns:
        ``{dataset key: ZooDataset}`` and the zoo's input spec.

    Raises:
        ValueError: two datasets share a class namespace, a dataset is unreadable, feature sizes differ,
            or a class has too few samples for the split fractions.
    """
    keys: dict[str, str] = {}  # dataset key -> the mapping name that first resolved to it
    for name, path in sources.dataset_paths.items():
        key = _dataset_key(path)
        if key in keys and sources.dataset_paths[keys[key]] != path:
            raise ValueError(f"datasets '{keys[key]}' and '{name}' both map to the class namespace '{key}'; rename one")
        keys.setdefault(key, name)
    images = any(p.is_dir() for p in sources.dataset_paths.values())
    input_spec = InputSpec(kind="image", image_size=settings.image_size) if images else InputSpec(kind="vector")
    loaded: dict[str, LabelledDataset] = {}
    for key, name in keys.items():
        dataset = load_dataset(sources.dataset_paths[name], input_spec, None, settings.label_column)
        loaded[key] = numeric_label_order(dataset)
    dims = {key: int(ds.per_class[0].shape[-1]) for key, ds in loaded.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"datasets have different feature dimensions {dims}; one zoo needs one input size")
    return {
        key: ZooDataset(key, ds, split_dataset(key, ds, settings.split_fractions, settings.seed))
        for key, ds in loaded.items()
    }, input_spec


@dataclass
class Target:
    """The architecture every checkpoint must fit: its spec, a model built from it and the weight layout."""

    spec: dict
    model: nn.Module
    layout: WeightLayout
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        """The layout's tensors of one checkpoint file (see `load_checkpoint`)."""
        return load_checkpoint(path, self.layout, self.include, self.exclude)


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


def output_widths(target: Target, datasets: Mapping[str, ZooDataset]) -> dict[str, int]:
    """How many logits the architecture gives on each dataset's test samples.

    Raises:
        ValueError: the architecture fails on a dataset's inputs, or does not return logits ``[n, classes]``.
    """
    arch = target.spec["name"]
    widths: dict[str, int] = {}
    for key, dataset in datasets.items():
        x, _ = dataset.xy("test")
        try:
            with torch.no_grad():
                logits = target.model(x)
        except Exception as err:  # a user's module raises anything on a wrong input size
            raise ValueError(
                f"architecture '{arch}' cannot run on dataset '{key}' ({x.shape[-1]} features per sample): "
                f"{one_line(err)}"
            ) from None
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != len(x):
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"architecture '{arch}' must return logits [n, classes]; got {shape} on dataset '{key}'")
        widths[key] = int(logits.shape[-1])
    return widths


@dataclass
class ValidCheckpoint:
    """A checkpoint that passed every check, with its zoo member id and its accuracy per data split."""

    entry: MappingEntry
    path: Path
    member_id: str
    dataset: str
    metrics: dict[str, float]


def validate_checkpoints(
    sources: Sources,
    datasets: Mapping[str, ZooDataset],
    target: Target,
    skip_bad: bool = False,
    warn: Callable[[str], None] = lambda message: None,
) -> tuple[list[ValidCheckpoint], list[BadCheckpoint]]:
    """Stage 3: check every checkpoint and measure its accuracy; collect all problems before failing.

    A checkpoint must load, hold every layout tensor with the right shape and finite values, hold no
    unexpected tensor among the selected ones, and output as many logits as its dataset has classes.

    Args:
        sources, datasets, target: what the earlier stages produced.
        skip_bad: leave bad checkpoints out (one ``warn`` line each) instead of raising.
        warn: receives the skipped checkpoints.

    Returns:
        The valid checkpoints in mapping order, and the bad ones.

    Raises:
        ValueError: the architecture does not run on the datasets, checkpoint names give clashing member ids,
            or no checkpoint is usable.
        BadCheckpointsError: bad checkpoints without ``skip_bad``.
    """
    widths = output_widths(target, datasets)
    ids = _member_ids([e.checkpoint for e in sources.entries])
    good: list[ValidCheckpoint] = []
    bad: list[BadCheckpoint] = []
    for entry in sources.entries:
        key, path = sources.dataset_key(entry), sources.checkpoint_path(entry)
        try:
            state = target.read(path)
            classes = datasets[key].data.num_classes
            if widths[key] != classes:
                raise ValueError(
                    f"class count mismatch: the model outputs {widths[key]} logits but dataset '{key}' has {classes} classes"
                )
            target.layout.inject(target.model, state)
            metrics = {}
            for split in SPLITS:
                x, y = datasets[key].xy(split)
                with torch.no_grad():
                    metrics[f"{split}_acc"] = float(logits_accuracy(target.model(x), y))
        except ValueError as err:
            bad.append(BadCheckpoint(entry.checkpoint, one_line(err, empty="unusable")))
            continue
        good.append(ValidCheckpoint(entry, path, ids[entry.checkpoint], key, metrics))
    if bad and not skip_bad:
        raise BadCheckpointsError(bad)
    for b in bad:
        warn(f"skipping bad checkpoint {b.name}: {b.reason}")
    if not good:
        raise ValueError("no usable checkpoints: nothing to build a zoo from")
    return good, bad


@dataclass
class IngestTask:
    """One zoo task: a dataset's classes in label order, and the checkpoints that become its members."""

    id: str
    dataset: str
    members: list[ValidCheckpoint]
    split: str | None
    """``"train"``/``"heldout"`` from the mapping, or None: `split_tasks` chooses."""
    order_key: str
    """Sorts the tasks whose split `split_tasks` chooses, so the choice ignores the mapping's order."""


def group_into_tasks(checkpoints: Sequence[ValidCheckpoint]) -> list[IngestTask]:
    """Stage 4: one task per checkpoint, named by its member id, in the checkpoints' order.

    Returns:
        The tasks; a task's split is its checkpoint's mapped split.
    """
    return [IngestTask(c.member_id, c.dataset, [c], c.entry.split, c.entry.checkpoint) for c in checkpoints]


def split_tasks(tasks: Sequence[IngestTask], heldout_fraction: float, seed: int) -> dict[str, str]:
    """Stage 5: ``"train"`` or ``"heldout"`` per task id.

    Tasks keep a split given in the mapping; of the others a seeded ``heldout_fraction`` is held out,
    always leaving at least one training task.

    Raises:
        ValueError: every task is held out.
    """
    task_split = {t.id: t.split for t in tasks if t.split}
    free = sorted((t for t in tasks if not t.split), key=lambda t: t.order_key)
    n_heldout = round(heldout_fraction * len(free))
    if "train" not in task_split.values():
        n_heldout = min(n_heldout, len(free) - 1)
    perm = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed)).tolist()
    for rank, i in enumerate(perm):
        task_split[free[i].id] = "heldout" if rank < max(n_heldout, 0) else "train"
    if "train" not in task_split.values():
        raise ValueError("every usable checkpoint is held out; a zoo needs at least one 'train' member")
    return task_split  # type: ignore[return-value]


def check_head_size(tasks: Sequence[IngestTask], datasets: Mapping[str, ZooDataset]) -> None:
    """Every task must have the same number of classes: the zoo's members share one head size.

    Raises:
        ValueError: the tasks' class counts differ.
    """
    counts = {datasets[t.dataset].data.num_classes for t in tasks}
    if len(counts) != 1:
        raise ValueError(f"checkpoints have different class counts {sorted(counts)}; one zoo needs one head size")


def write_zoo(
    out: Path,
    tasks: Sequence[IngestTask],
    task_splits: Mapping[str, str],
    datasets: Mapping[str, ZooDataset],
    target: Target,
    input_spec: InputSpec,
    recipe: Mapping,
) -> ModelZoo:
    """Stage 6: write the zoo atomically: ``out`` appears complete or not at all.

    The class pool holds the classes of the datasets the tasks use, as ``"<dataset>/<class>"``. Member
    weights are read from their checkpoint files again, so only one is in memory at a time.

    Returns:
        The written zoo, opened from ``out``.
    """
    used = sorted({t.dataset for t in tasks})
    classes = {
        f"{key}/{cls}": datasets[key].splits[i] for key in used for i, cls in enumerate(datasets[key].data.class_names)
    }
    zoo_tasks = {
        t.id: {
            "classes": [f"{t.dataset}/{c}" for c in datasets[t.dataset].data.class_names],
            "split": task_splits[t.id],
        }
        for t in tasks
    }
    with atomic_dir(out) as tmp:
        zoo = ModelZoo.create(
            tmp,
            architecture=target.spec,
            layout=target.layout,
            classes=classes,
            tasks=zoo_tasks,
            input_spec=input_spec,
            recipe=dict(recipe),
        )
        for task in tasks:
            for member in task.members:
                state = target.read(member.path)
                zoo.add(state, task.id, member.metrics, seed=0, member_id=member.member_id, flush=False)
        zoo.flush()
        zoo.fit_layout("train")
    return ModelZoo.open(out)


def ingest_recipe(
    settings: IngestSettings, sources: Sources, tasks: Sequence[IngestTask], skipped: Sequence[BadCheckpoint]
) -> dict:
    """The zoo's ``recipe`` record: where the members came from and with which options."""
    return {
        "name": "ingest",
        "checkpoints": str(sources.checkpoint_root.resolve()),
        "datasets": str(sources.dataset_root.resolve()),
        "mapping": str(sources.mapping.resolve()),
        "include": list(settings.include),
        "exclude": list(settings.exclude),
        "chunk_size": settings.chunk_size,
        "heldout_fraction": settings.heldout_fraction,
        "split_fractions": list(settings.split_fractions),
        "seed": settings.seed,
        "skip_bad": settings.skip_bad,
        "skipped": [b.name for b in skipped],
        "sources": {m.member_id: m.entry.checkpoint for t in tasks for m in t.members},
    }


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

    Example:
        >>> zoo = ingest("ckpts", "data", "map.csv", "mlp", "runs/zoo", arch_config={"hidden": [32]})  # doctest: +SKIP
    """
    warn = warn or (lambda message: None)
    settings = parse_settings(
        arch, arch_config=arch_config, include=include, exclude=exclude, chunk_size=chunk_size,
        heldout_fraction=heldout_fraction, split_fractions=split_fractions, seed=seed, skip_bad=skip_bad,
        image_size=image_size, label_column=label_column,
    )  # fmt: skip
    out = check_new_folder(out)
    sources = discover(checkpoints, datasets, mapping, warn)
    data, input_spec = read_datasets(sources, settings)
    target = build_target(settings)
    good, bad = validate_checkpoints(sources, data, target, settings.skip_bad, warn)
    tasks = group_into_tasks(good)
    task_splits = split_tasks(tasks, settings.heldout_fraction, settings.seed)
    check_head_size(tasks, data)
    recipe = ingest_recipe(settings, sources, tasks, bad)
    return write_zoo(out, tasks, task_splits, data, target, input_spec, recipe)
