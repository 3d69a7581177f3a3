"""The mapping file of ``d2nwg zoo ingest``: which dataset (task) each checkpoint was trained on.

A CSV ``checkpoint,dataset[,split][,run]`` or a JSON ``{checkpoint: dataset | {dataset, split, run}}``; checkpoints
sharing a run (or group) value stay on one side of the train/held-out split."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

GROUP_COLUMNS = ("run", "group")
"""Mapping columns (either name) that keep checkpoints together on one side of the train/held-out split."""
TASK_SPLITS = ("train", "heldout")


@dataclass
class MappingEntry:
    """One row of the mapping file: a checkpoint file (or model folder), its dataset, and optionally its task
    split and its run/group (checkpoints sharing a group land on the same side of the split)."""

    checkpoint: str
    dataset: str
    split: str | None = None
    group: str | None = None


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
