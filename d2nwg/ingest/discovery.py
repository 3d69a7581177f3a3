"""Finding what to ingest: checkpoint files and model folders below ``--checkpoints``, and their datasets.

`discover` pairs every mapped checkpoint (a file, or the epochs of a ``<model>/checkpoint_<epoch>/`` folder
chosen by ``--epochs``) with its dataset and a model folder's ``result.json`` figures."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d2nwg.ingest.mapping import MappingEntry, read_mapping
from d2nwg.ingest.settings import parse_epochs
from d2nwg.security import inside

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
EPOCH_FOLDER = re.compile(r"checkpoint_(\d+)")
"""A model folder's per-epoch subfolders, ``checkpoint_<epoch>``, each holding a ``checkpoints`` file."""
EPOCH_FILE = "checkpoints"
DATASET_SUFFIXES = (".npz", ".csv")


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
