"""The task data of an ingested zoo: each dataset read once and split per class into train/support/test."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from d2nwg.data.labelled import LabelledDataset, load_dataset, to_xy
from d2nwg.ingest.discovery import Sources, _dataset_key
from d2nwg.ingest.settings import IngestSettings
from d2nwg.zoo.specs import InputSpec


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
