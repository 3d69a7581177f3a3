"""Every checkpoint checked against the target before anything is written; bad ones named one per line."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from d2nwg.errors import one_line
from d2nwg.ingest.checkpoints import BadCheckpoint, BadCheckpointsError, Target
from d2nwg.ingest.datasets import ZooDataset
from d2nwg.ingest.discovery import EPOCH_FILE, EPOCH_FOLDER, Sources
from d2nwg.ingest.mapping import MappingEntry
from d2nwg.targets.population import logits_accuracy
from d2nwg.zoo.model_zoo import SPLITS


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
