"""Build a `ModelZoo` from a user's own checkpoints (``d2nwg zoo ingest``).

Inputs:

* a folder of checkpoints, all of one architecture, at any depth below it:

  - checkpoint files: ``*.safetensors``, or ``*.pt``/``*.pth``/``*.bin`` and Lightning ``*.ckpt`` read with
    ``torch.load(weights_only=True)`` (weights at the top level or under ``state_dict``; optimizer states and
    the like are ignored);
  - *model folders* of population-of-models zoos: ``<model>/checkpoint_<epoch>/checkpoints`` (a
    ``torch.save`` state_dict without a suffix) beside ``<model>/result.json`` (JSON lines of per-epoch
    metrics). The mapping names the model folder (its path below the checkpoint folder, or its bare name
    when that is unique); ``epochs`` (``--epochs``) picks ``last`` (default), ``all`` or the last N epochs,
    each one a member, and each member's metrics gain the numbers of its epoch's ``result.json`` line as
    ``reported_<key>``;

* a folder of datasets (image folders of class subfolders, ``.npz`` with ``x``/``y``
  or ``.csv`` with a label column), read with `d2nwg.datasets.load_dataset`;
* a mapping file saying which dataset each checkpoint (or model folder) was trained on, as CSV with
  columns ``checkpoint,dataset[,split][,run]`` or JSON ``{checkpoint: dataset}`` /
  ``{checkpoint: {"dataset": ..., "split": ..., "run": ...}}`` (``group`` may stand for ``run``).

**Tasks are datasets.** Each dataset's samples are split per class into train/support/test; its classes
enter the zoo's class pool as ``"<dataset>/<class>"``, and the dataset becomes one task (its classes in
label order, named by the dataset) whose members are every checkpoint mapped to it: several epochs of one
run, several runs. Label order is the sorted class names, numerically when every name is an integer (so
``.npz`` labels ``0..10`` keep their ids). The held-out choice is made per task, so a dataset is never on both
sides; a ``run``/``group`` value shared by checkpoints of different datasets keeps those datasets on one
side too. The manifest records each task's dataset, which `d2nwg.zoo.ModelZoo.split_leaks` checks.

Every checkpoint is checked before anything is written: it must load, hold every
layout tensor with the right shape and finite values, hold no unexpected tensor
among those the include/exclude globs select, and the model's output width must
equal its dataset's class count. A key prefix shared by every key (``module.``,
``model.``, ``_orig_mod.``) is stripped with a notice when that makes the keys
match; a prefix that stripping does not fix is reported as such. Bad checkpoints are
collected and reported together (`BadCheckpointsError`) unless ``skip_bad`` leaves
them out. The zoo is written into a temp folder and renamed into place, so a failure
leaves no output.

Buffers: float running statistics (BatchNorm ``running_mean``/``running_var``) are
floating tensors, so the layout holds them by default and the hyper-model generates
them (``running_var`` in log space, always positive: `d2nwg.weights`). Integer buffers
(``num_batches_tracked``) are never in the layout. Member accuracies are those of the
checkpoint as saved: eval mode, with its own running statistics, even when
``--exclude`` leaves them out of the layout (a warning then says that the zoo and
generated models use the architecture's initial statistics).
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from d2nwg.architectures import build_model
from d2nwg.datasets import LabelledDataset, load_dataset, to_xy
from d2nwg.ensemble import logits_accuracy
from d2nwg.errors import one_line
from d2nwg.io import atomic_dir, load_weights
from d2nwg.security import allow_code_name, inside, is_code_name
from d2nwg.specs import InputSpec
from d2nwg.weights import WeightLayout
from d2nwg.zoo import SPLITS, ModelZoo

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
EPOCH_FOLDER = re.compile(r"checkpoint_(\d+)")
"""A model folder's per-epoch subfolders, ``checkpoint_<epoch>``, each holding a ``checkpoints`` file."""
EPOCH_FILE = "checkpoints"
GROUP_COLUMNS = ("run", "group")
"""Mapping columns (either name) that keep checkpoints together on one side of the train/held-out split."""
DATASET_SUFFIXES = (".npz", ".csv")
TASK_SPLITS = ("train", "heldout")


@dataclass
class MappingEntry:
    """One row of the mapping file: a checkpoint file (or model folder), its dataset, and optionally its task
    split and its run/group (checkpoints sharing a group land on the same side of the split)."""

    checkpoint: str
    dataset: str
    split: str | None = None
    group: str | None = None


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
    except (json.JSONDecodeError, RecursionError) as err:
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
    except (json.JSONDecodeError, RecursionError) as err:
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
            groups = [value[k] for k in GROUP_COLUMNS if value.get(k) is not None]
            if len(groups) > 1 or any(not isinstance(g, (str, int)) or isinstance(g, bool) for g in groups):
                raise ValueError(f"mapping file {path}: '{checkpoint}' needs at most one of run/group, a string")
            entries.append(MappingEntry(checkpoint, value["dataset"], split or None, str(groups[0]) if groups else None))
        else:
            raise ValueError(
                f"mapping file {path}: '{checkpoint}' must map to a dataset name or "
                f"{{\"dataset\": ..., \"split\": ..., \"run\": ...}}"
            )
    return entries


def _read_csv_mapping(path: Path, text: str) -> list[MappingEntry]:
    rows = [[c.strip() for c in row] for row in csv.reader(line for line in text.splitlines() if line.strip())]
    header = rows[0] if rows else []
    if "checkpoint" not in header or "dataset" not in header:
        raise ValueError(
            f"mapping file {path} needs a CSV header with columns checkpoint,dataset[,split][,run]; found {header}"
        )
    group_columns = [c for c in GROUP_COLUMNS if c in header]
    if len(group_columns) > 1:
        raise ValueError(f"mapping file {path} has both a 'run' and a 'group' column; keep one")
    entries = []
    for row in rows[1:]:
        values = dict(zip(header, row))
        group = values.get(group_columns[0]) if group_columns else None
        entries.append(
            MappingEntry(values.get("checkpoint", ""), values.get("dataset", ""), values.get("split") or None, group or None)
        )
    return entries


# ----------------------------------------------------------------------------- datasets
def _resolve_dataset(root: Path, name: str) -> Path | None:
    path = inside(root, name, "mapped dataset")
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


def _member_stem(name: str) -> str:
    """``<model>-e<epoch>`` for ``.../<model>/checkpoint_<epoch>/checkpoints``, else the file name's stem."""
    parts = Path(name).parts
    if len(parts) >= 3 and parts[-1] == EPOCH_FILE and EPOCH_FOLDER.fullmatch(parts[-2]):
        return f"{parts[-3]}-e{int(EPOCH_FOLDER.fullmatch(parts[-2]).group(1))}"
    return Path(name).stem


def _member_ids(names: Sequence[str]) -> dict[str, str]:
    """Checkpoint file name -> a file-system-safe member id (its stem; the whole name on a clash)."""

    def clean(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".") or "member"

    stems = [clean(_member_stem(n)) for n in names]
    ids = {n: s if stems.count(s) == 1 else clean(n) for n, s in zip(names, stems)}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"checkpoint names give clashing member ids: {sorted(ids)}")
    return ids


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


@dataclass
class Sources:
    """What an ingest reads: one entry per checkpoint file (a mapped model folder expanded into the epochs
    ``--epochs`` selects), with the checkpoint and dataset each one names."""

    checkpoint_root: Path
    dataset_root: Path
    mapping: Path
    entries: list[MappingEntry]
    dataset_paths: dict[str, Path]
    """The mapping's dataset names -> the file or folder each resolves to."""
    reported: dict[str, dict[str, float]] = field(default_factory=dict)
    """Entry checkpoint -> the metrics its model folder's ``result.json`` gives for its epoch (``reported_<key>``)."""

    def checkpoint_path(self, entry: MappingEntry) -> Path:
        return inside(self.checkpoint_root, entry.checkpoint, "mapped checkpoint")

    def dataset_key(self, entry: MappingEntry) -> str:
        """The class namespace of the entry's dataset (see `_dataset_key`)."""
        return _dataset_key(self.dataset_paths[entry.dataset])


# Bookkeeping numbers of Ray Tune's result.json lines: not metrics of the model.
_RESULT_BOOKKEEPING = {"epoch", "training_iteration", "timestamp", "pid", "iterations_since_restore", "done"}


def scan_checkpoints(root: Path) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """Every checkpoint under ``root``, recursively (hidden folders skipped).

    Returns:
        The checkpoint files (known suffixes, outside model folders) and the model folders, as paths relative
        to ``root`` in POSIX form; a model folder holds ``checkpoint_<epoch>/checkpoints`` files and maps to its
        ``(epoch, file)`` pairs in epoch order.
    """
    files: list[str] = []
    models: dict[str, list[tuple[int, str]]] = {}
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        rel = here.relative_to(root).as_posix()
        epochs = []
        for sub in subfolders:
            match = EPOCH_FOLDER.fullmatch(sub)
            if match and (here / sub / EPOCH_FILE).is_file():
                epochs.append((int(match.group(1)), (Path(rel) / sub / EPOCH_FILE).as_posix()))
        if epochs:
            models[rel] = sorted(epochs)
        # Not into epoch folders (their files are the model's) nor hidden folders (.ipynb_checkpoints, .git).
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and not (epochs and EPOCH_FOLDER.fullmatch(d)))
        files += [(Path(rel) / n).as_posix() for n in sorted(names) if Path(n).suffix.lower() in CHECKPOINT_SUFFIXES]
    return sorted(files), models


def select_epochs(epochs: Sequence[tuple[int, str]], choice: str | int) -> list[tuple[int, str]]:
    """The ``(epoch, file)`` pairs ``choice`` keeps: ``"last"``, ``"all"`` or the last N."""
    if choice == "all":
        return list(epochs)
    return list(epochs[-(1 if choice == "last" else int(choice)) :])


def read_results(model_dir: Path, warn: Callable[[str], None]) -> dict[int, dict[str, float]]:
    """Per-epoch metrics from a model folder's ``result.json`` (JSON lines, one per epoch), if there is one.

    A line's epoch is its ``epoch`` value, else its ``training_iteration`` (Ray Tune's count, which names the
    ``checkpoint_<N>`` saved after it). Its finite numbers other than bookkeeping (timestamps, pids, times)
    become ``reported_<key>`` metrics. Unreadable lines are skipped with one ``warn`` line per file.
    """
    path = model_dir / "result.json"
    if not path.is_file():
        return {}
    results: dict[int, dict[str, float]] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            bad += 1
            continue
        epoch = row.get("epoch", row.get("training_iteration")) if isinstance(row, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not float(epoch).is_integer():
            bad += 1
            continue
        results[int(epoch)] = {
            f"reported_{k}": float(v)
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and k not in _RESULT_BOOKKEEPING and not k.startswith("time")
        }  # fmt: skip
    if bad:
        warn(f"{path}: {bad} line(s) without JSON or an epoch/training_iteration number; ignored")
    return results


def discover(
    checkpoints: str | Path,
    datasets: str | Path,
    mapping: str | Path,
    warn: Callable[[str], None],
    epochs: str | int = "last",
) -> Sources:
    """Stage 1: find the inputs. Reads the mapping and checks that every file it names exists.

    A mapping entry names a checkpoint file (a path relative to ``checkpoints``), or a *model folder*: a folder
    of ``checkpoint_<epoch>/checkpoints`` files (``torch.save`` state_dicts without a suffix) beside a
    ``result.json``, named by its path relative to ``checkpoints`` or, when unique, by its folder name alone
    (found by a recursive scan). A model folder becomes one entry per selected epoch, with the mapping row's
    dataset, split and run/group, and metrics from ``result.json``.

    Args:
        checkpoints: folder of ``*.safetensors``/``*.pt``/``*.pth``/``*.ckpt``/``*.bin`` files or model folders,
            nested at any depth.
        datasets: folder of datasets (``name``, ``name.npz``, ``name.csv`` or a class-folder directory).
        mapping: the mapping file (see `read_mapping`).
        warn: receives one line per checkpoint file or model folder that the mapping does not name.
        epochs: which epochs of a model folder to take: ``"last"``, ``"all"`` or the last N.

    Returns:
        One entry per checkpoint file with resolved dataset paths.

    Raises:
        ValueError: a missing folder, a malformed mapping, or mapped files that are missing, ambiguous or of the
            wrong type (all of them in one message).
    """
    ckpt_root, data_root = Path(checkpoints), Path(datasets)
    for flag, root in (("--checkpoints", ckpt_root), ("--datasets", data_root)):
        if not root.is_dir():
            raise ValueError(f"{flag} folder not found: {root}")
    choice = parse_epochs(epochs)
    rows = read_mapping(mapping)
    files, models = scan_checkpoints(ckpt_root)
    by_name: dict[str, list[str]] = {}
    for rel in models:
        by_name.setdefault(Path(rel).name, []).append(rel)
    entries: list[MappingEntry] = []
    reported: dict[str, dict[str, float]] = {}
    missing, wrong_type, not_models, ambiguous = [], [], [], []
    mapped_models: set[str] = set()
    for row in rows:
        path = ckpt_root / row.checkpoint
        rel = Path(row.checkpoint).as_posix()
        if path.is_file() or not (path.is_dir() or by_name.get(rel)):
            if not path.is_file():
                missing.append(row.checkpoint)
            suffix_ok = Path(rel).suffix.lower() in CHECKPOINT_SUFFIXES
            epoch_file = Path(rel).name == EPOCH_FILE and EPOCH_FOLDER.fullmatch(Path(rel).parent.name)
            if not (suffix_ok or epoch_file):
                wrong_type.append(row.checkpoint)
            entries.append(MappingEntry(rel, row.dataset, row.split, row.group))
            continue
        if path.is_dir():
            model = path.relative_to(ckpt_root).as_posix() if path != ckpt_root else "."
            if model not in models:
                not_models.append(row.checkpoint)
                continue
        elif len(by_name[rel]) > 1:
            ambiguous.append(f"{row.checkpoint} ({', '.join(by_name[rel])})")
            continue
        else:
            model = by_name[rel][0]
        mapped_models.add(model)
        results = read_results(ckpt_root / model, warn)
        for epoch, file in select_epochs(models[model], choice):
            entries.append(MappingEntry(file, row.dataset, row.split, row.group))
            if epoch in results:
                reported[file] = results[epoch]
    dataset_paths = {e.dataset: _resolve_dataset(data_root, e.dataset) for e in rows}
    missing_data = sorted(name for name, p in dataset_paths.items() if p is None)
    problems = []
    if missing:
        problems.append(f"checkpoint(s) not found in {ckpt_root}: {', '.join(missing)}")
    if wrong_type:
        problems.append(f"checkpoint(s) {', '.join(wrong_type)} are not {'/'.join(CHECKPOINT_SUFFIXES)} files")
    if not_models:
        problems.append(f"folder(s) {', '.join(not_models)} hold no checkpoint_<epoch>/{EPOCH_FILE} files")
    if ambiguous:
        problems.append(f"model folder name(s) found more than once, give the path: {'; '.join(ambiguous)}")
    if missing_data:
        problems.append(f"dataset(s) not found in {data_root}: {', '.join(missing_data)}")
    seen: set[str] = set()
    twice = sorted({e.checkpoint for e in entries if e.checkpoint in seen or seen.add(e.checkpoint)})
    if twice:
        problems.append(f"checkpoint(s) mapped twice (directly and through their model folder?): {', '.join(twice)}")
    if problems:
        raise ValueError(f"mapping file {mapping}: " + "; ".join(problems))
    for rel in files:
        if rel not in seen:
            warn(f"checkpoint {rel} is not in the mapping; ignored")
    for rel in sorted(models):
        if rel not in mapped_models and not any(file in seen for _, file in models[rel]):
            warn(f"model folder {rel} is not in the mapping; ignored")
    return Sources(ckpt_root, data_root, Path(mapping), entries, dataset_paths, reported)  # type: ignore[arg-type]


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
        warn: receives the skipped checkpoints, and one notice per key prefix stripped (`strip_key_prefix`).

    Returns:
        The valid checkpoints in mapping order (metrics: accuracy per data split, plus ``reported_<key>`` from a
        model folder's ``result.json``), and the bad ones.

    Raises:
        ValueError: the architecture does not run on the datasets, checkpoint names give clashing member ids,
            or no checkpoint is usable.
        BadCheckpointsError: bad checkpoints without ``skip_bad``.
    """
    widths = output_widths(target, datasets)
    left_out = target.left_out_statistics()
    if left_out:
        warn(
            f"running statistics {left_out[:4]} are not in the layout (--include/--exclude): member accuracies are "
            "of the checkpoints as saved, but the zoo, its evaluation and generated models use the architecture's "
            "initial values for them; keep them in the layout to generate them"
        )
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
            model = target.load_as_saved(path, state)  # scored as saved: eval mode, its own running statistics
            metrics = {}
            for split in SPLITS:
                x, y = datasets[key].xy(split)
                with torch.no_grad():
                    metrics[f"{split}_acc"] = float(logits_accuracy(model(x), y))
        except ValueError as err:
            bad.append(BadCheckpoint(entry.checkpoint, one_line(err, empty="unusable")))
            continue
        metrics.update(sources.reported.get(entry.checkpoint, {}))  # result.json's numbers, as reported_<key>
        good.append(ValidCheckpoint(entry, path, ids[entry.checkpoint], key, metrics))
    for prefix, paths in sorted(target.prefixes.items()):
        example = Path(sorted(paths)[0]).relative_to(sources.checkpoint_root).as_posix()
        warn(
            f"stripped the key prefix '{prefix}' that every key of {len(paths)} checkpoint(s) shares "
            f"(e.g. {example}; nn.DataParallel, Lightning and torch.compile add such prefixes)"
        )
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
    groups: tuple[str, ...] = ()
    """The mapping's run/group values of the members: tasks sharing one land on the same side of the split."""


def group_into_tasks(checkpoints: Sequence[ValidCheckpoint]) -> list[IngestTask]:
    """Stage 4: one task per dataset, named by the dataset, whose members are every checkpoint mapped to it
    (several epochs of a run, several runs), in the order datasets first appear.

    A task is the unit of the held-out choice, so all of a dataset's checkpoints land on one side: an "unseen"
    task never uses a dataset that training used.

    Returns:
        The tasks; a task's split is the split its checkpoints are mapped to (if any).

    Raises:
        ValueError: checkpoints of one dataset are mapped to different splits.
    """
    by_dataset: dict[str, list[ValidCheckpoint]] = {}
    for c in checkpoints:
        by_dataset.setdefault(c.dataset, []).append(c)
    tasks = []
    for dataset, members in by_dataset.items():
        splits = {c.entry.split: c.entry.checkpoint for c in members if c.entry.split}
        if len(splits) > 1:
            named = " and ".join(f"{split} ({name})" for split, name in sorted(splits.items()))
            raise ValueError(
                f"checkpoints of dataset '{dataset}' are mapped to {named}; a dataset is one task on one side of "
                "the split, so give all of its checkpoints the same split (or none)"
            )
        groups = tuple(sorted({c.entry.group for c in members if c.entry.group}))
        tasks.append(IngestTask(dataset, dataset, members, next(iter(splits), None), dataset, groups))
    return tasks


def split_units(tasks: Sequence[IngestTask]) -> list[list[IngestTask]]:
    """The tasks joined by shared run/group values (connected components), each unit in task order."""
    parent = list(range(len(tasks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, task in enumerate(tasks):
        for group in task.groups:
            j = first_with.setdefault(group, i)
            parent[root(i)] = root(j)
    units: dict[int, list[IngestTask]] = {}
    for i, task in enumerate(tasks):
        units.setdefault(root(i), []).append(task)
    return list(units.values())


def split_tasks(tasks: Sequence[IngestTask], heldout_fraction: float, seed: int) -> dict[str, str]:
    """Stage 5: ``"train"`` or ``"heldout"`` per task id, chosen per dataset, never per checkpoint.

    Tasks (datasets) that share a run/group value form one unit that lands on one side. Units keep a split given
    in the mapping; of the others a seeded ``heldout_fraction`` is held out, always leaving at least one
    training task.

    Raises:
        ValueError: a unit's tasks are mapped to different splits, or every task is held out.
    """
    task_split: dict[str, str] = {}
    free: list[tuple[str, list[IngestTask]]] = []
    for unit in split_units(tasks):
        mapped = {t.split: t.id for t in unit if t.split}
        if len(mapped) > 1:
            shared = sorted(set.intersection(*(set(t.groups) for t in unit)) or {g for t in unit for g in t.groups})
            named = " and ".join(f"'{task}' ({split})" for split, task in sorted(mapped.items()))
            raise ValueError(
                f"run/group {', '.join(repr(g) for g in shared[:3])} joins datasets {named}; checkpoints of one "
                "run/group must land on one side of the split"
            )
        if mapped:
            task_split.update({t.id: next(iter(mapped)) for t in unit})
        else:
            free.append((min(t.order_key for t in unit), unit))
    free.sort(key=lambda item: item[0])
    n_heldout = round(heldout_fraction * len(free))
    if "train" not in task_split.values():
        n_heldout = min(n_heldout, len(free) - 1)
    perm = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed)).tolist()
    for rank, i in enumerate(perm):
        for task in free[i][1]:
            task_split[task.id] = "heldout" if rank < max(n_heldout, 0) else "train"
    if "train" not in task_split.values():
        raise ValueError("every usable checkpoint is held out; a zoo needs at least one 'train' member")
    return task_split


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
            "dataset": t.dataset,  # lets `zoo info`/`evaluate` check that no held-out task shares a train dataset
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
        "epochs": settings.epochs,
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
    warn: Callable[[str], None] | None = None,
    align: bool = False,
    **options,
) -> ModelZoo:
    """Build a zoo at ``out`` from the checkpoints in ``checkpoints`` (see the module docstring).

    Args:
        checkpoints: folder of ``*.safetensors``/``*.pt``/``*.pth``/``*.ckpt``/``*.bin`` state_dicts, or of model
            folders (``<model>/checkpoint_<epoch>/checkpoints`` + ``result.json``), at any depth.
        datasets: folder holding the datasets the mapping names.
        mapping: CSV ``checkpoint,dataset[,split][,run]`` or JSON mapping file (see the module docstring).
        arch: a registered architecture name or ``"module:callable"``; ``arch_config`` its arguments.
        out: the new zoo folder (must not exist or be empty).
        options: the keyword settings of `parse_settings` (one signature for both), described here:
        include, exclude: globs selecting the tensors that make up the layout.
        chunk_size: numbers per weight token.
        heldout_fraction: share of datasets (tasks; runs/groups joined) without a mapped split that are held out.
        split_fractions: per-class train/support/test fractions of every dataset.
        seed: seeds the data splits, the held-out choice and the architecture's initialisation.
        skip_bad: leave bad checkpoints out (reported through ``warn``) instead of raising.
        image_size: ``H,W`` image folders are resized to.
        label_column: label column of ``.csv`` datasets.
        warn: receives one line per warning (skipped or unmapped checkpoints, stripped key prefixes).
        epochs: which epochs of each model folder become members: ``"last"``, ``"all"`` or the last N.
        align: permute every member's hidden units into the basin of one reference member
            (weight matching, `d2nwg.align.align_zoo_dir`; ``alignment.json`` records it), for
            checkpoints trained from different random initialisations.

    Raises:
        BadCheckpointsError: bad checkpoints without ``skip_bad`` (nothing is written).
        ValueError: any other problem with the inputs (nothing is written).

    Example:
        >>> zoo = ingest("ckpts", "data", "map.csv", "mlp", "runs/zoo", arch_config={"hidden": [32]})  # doctest: +SKIP
    """
    warn = warn or (lambda message: None)
    if is_code_name(arch):  # the caller's own builder: consent given by passing it (a zoo read later asks again)
        allow_code_name(arch)
    settings = parse_settings(arch, **options)
    out = check_new_folder(out)
    sources = discover(checkpoints, datasets, mapping, warn, settings.epochs)
    data, input_spec = read_datasets(sources, settings)
    target = build_target(settings)
    good, bad = validate_checkpoints(sources, data, target, settings.skip_bad, warn)
    tasks = group_into_tasks(good)
    task_splits = split_tasks(tasks, settings.heldout_fraction, settings.seed)
    check_head_size(tasks, data)
    recipe = ingest_recipe(settings, sources, tasks, bad)
    if not align:
        return write_zoo(out, tasks, task_splits, data, target, input_spec, recipe)
    # Align as a last transform: written unaligned into a temp sibling, then permuted into ``out``.
    from d2nwg.align import align_zoo_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.unaligned-") as tmp:
        write_zoo(Path(tmp) / "zoo", tasks, task_splits, data, target, input_spec, recipe)
        return align_zoo_dir(Path(tmp) / "zoo", out, seed=settings.seed)
