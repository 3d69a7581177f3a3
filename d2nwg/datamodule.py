"""The zoo DataModule: weight tokens of training members plus freshly drawn conditioning sets."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from d2nwg.zoo import ModelZoo


def draw_class_sets(per_class: list[torch.Tensor], samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[K, samples, D]``: a random subset of each class (with replacement only if a class is too small)."""
    out = []
    for x in per_class:
        if len(x) >= samples:
            idx = torch.randperm(len(x), generator=generator)[:samples]
        else:
            idx = torch.randint(len(x), (samples,), generator=generator)
        out.append(x[idx])
    return torch.stack(out)


class ZooTokenDataset(Dataset):
    """Member ``i`` -> ``(i, tokens [T, chunk], class samples [K, S, D])``, samples redrawn every time.

    The samples are whole model inputs: the hyper-model conditions on their leading
    features and its VAE may run the member on them (function-space loss).
    """

    def __init__(self, tokens: torch.Tensor, class_samples: list[list[torch.Tensor]], samples_per_class: int):
        self.tokens = tokens
        self.class_samples = class_samples
        self.samples_per_class = samples_per_class

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.tokens[i], draw_class_sets(self.class_samples[i], self.samples_per_class)


class ZooDataModule(L.LightningDataModule):
    """Serves a zoo's training members to the hyper-model.

    Args:
        zoo: path of the model zoo directory.
        batch_size: members per batch.
        samples_per_class: samples drawn per class to condition on (redrawn every time, as augmentation);
            the VAE's function-space loss runs members on the same samples.
        split: which members to train on; held-out members are never served.
    """

    def __init__(self, zoo: str = "runs/zoo", batch_size: int = 64, samples_per_class: int = 10, split: str = "train"):
        super().__init__()
        self.save_hyperparameters()
        self.zoo = ModelZoo.open(zoo)
        self.tokens = self.zoo.tokens(split)  # (N, T, chunk), normalised
        members = self.zoo.members(split)
        # Zoos whose samples carry more than the dataset description (e.g. cached encoder states
        # for text adapters) say how many leading features describe the dataset.
        self.condition_features: int | None = self.zoo.input_spec.condition_features
        self.class_samples = [self.zoo.class_samples(m.task, "train") for m in members]
        counts = {len(c) for c in self.class_samples}
        if len(counts) != 1:
            raise ValueError(f"zoo members have different class counts {sorted(counts)}; one zoo needs one head size")
        self.num_classes = counts.pop()
        self.feature_dim = self.class_samples[0][0][:, : self.condition_features].shape[-1]

    def train_dataloader(self) -> DataLoader:
        dataset = ZooTokenDataset(self.tokens, self.class_samples, self.hparams.samples_per_class)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=True, drop_last=len(dataset) > self.hparams.batch_size)
