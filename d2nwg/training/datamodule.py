"""The zoo DataModule: weight tokens of training members plus freshly drawn conditioning sets.

Under a multi-process strategy Lightning swaps the loader's sampler for a ``DistributedSampler``
(``use_distributed_sampler``, on by default), so each rank trains on its own shard of the members.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from d2nwg.training.distributed import gather_rank_states, own_rank_state
from d2nwg.zoo.model_zoo import ModelZoo
from d2nwg.zoo.streamed_tokens import MemberTokens


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

    def __init__(self, tokens: torch.Tensor | MemberTokens, class_samples: list[list[torch.Tensor]], samples_per_class: int):
        self.tokens = tokens
        self.class_samples = class_samples
        self.samples_per_class = samples_per_class

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.tokens[i], draw_class_sets(self.class_samples[i], self.samples_per_class)


class ResumableLoader(DataLoader):
    """A shuffled ``DataLoader`` whose place in the epoch survives a checkpoint (Lightning's ``_Stateful``).

    It draws exactly what ``DataLoader(dataset, batch_size, shuffle=True, drop_last=...)`` draws, from the
    global torch RNG and at the same moments, so training numerics do not change: the epoch's permutation
    (one global draw, when the first batch is asked for, as ``RandomSampler`` does) and each member's
    conditioning samples (drawn by the dataset as its batch is collated). `state_dict` saves the epoch's
    batches of indices, how many of them training has consumed and any batch already collated but not yet
    trained on; after `load_state_dict` the next iterator continues that epoch. With the global RNG state
    that `d2nwg.training.lightning_module.D2NWGModule` saves, a resumed run draws what an uninterrupted one would have.

    Under DDP, Lightning re-creates the loader with a ``DistributedSampler`` (through ``**kwargs``); each
    rank's state then goes into the checkpoint (`d2nwg.training.distributed.gather_rank_states`) and each rank
    resumes its own shard.

    Args:
        dataset: the member dataset (``__getitem__`` may draw from the global RNG).
        batch_size, drop_last: as for ``DataLoader``.
        consumed: returns how many batches of the current epoch training has consumed (``None``: unknown,
            taken as every batch collated so far).
        **kwargs: further ``DataLoader`` arguments (``sampler`` and ``shuffle=False`` when Lightning injects
            a distributed sampler); the default is ``shuffle=True``.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, drop_last: bool, consumed: Callable[[], int | None] = lambda: None, **kwargs
    ):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, **{"shuffle": True, **kwargs})
        self.consumed = consumed
        self._order: list[list[int]] = []  # the current epoch's batches of member indices
        self._collated = 0  # batches of the epoch collated so far
        self._recent: deque = deque(maxlen=2)  # (position, batch) of the last batches collated
        self._resume: dict | None = None
        self._epochs = 0  # epochs begun, restored with the state: a distributed sampler's permutation follows it

    @property
    def _index_sampler(self):
        # The base iterator asks this for batches of indices; the whole epoch is materialised at the first
        # request, which is when ``RandomSampler`` makes its one global RNG draw anyway.
        batches = super()._index_sampler
        loader = self

        class WholeEpoch:
            def __iter__(self):
                def gen():
                    loader._order = [list(b) for b in batches]
                    yield from loader._order

                return gen()

            def __len__(self):
                return len(batches)

        return WholeEpoch()

    def __iter__(self) -> Iterator:
        if self._resume is not None:
            state, self._resume = self._resume, None
            return self._continue(state)
        return self._epoch()

    def _epoch(self) -> Iterator:
        self._order, self._collated, self._recent = [], 0, deque(maxlen=2)
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler: seeded by epoch, which must survive a resume exactly
            self.sampler.set_epoch(self._epochs)
        self._epochs += 1
        for batch in super().__iter__():  # the base loader's draws, unchanged
            self._yielded(batch)
            yield batch

    def _yielded(self, batch) -> None:
        self._recent.append((self._collated, batch))
        self._collated += 1

    def _continue(self, state: dict) -> Iterator:
        self._order, self._recent = [list(b) for b in state["order"]], deque(maxlen=2)
        self._collated = int(state["consumed"])
        for batch in state["pending"]:  # collated before the checkpoint, not yet trained on
            self._yielded(batch)
            yield batch
        for indices in self._order[self._collated :]:
            batch = self.collate_fn([self.dataset[i] for i in indices])
            self._yielded(batch)
            yield batch

    def state_dict(self) -> dict:
        """``{"order", "consumed", "pending", "size", "batch_size", "epochs"}`` of the current epoch; under DDP
        ``{"ranks": [one such dict per rank]}`` (every rank must call it, as ``Trainer.save_checkpoint`` does)."""
        local = self._local_state()
        ranks = gather_rank_states(local)
        return local if ranks is None else {"ranks": ranks}

    def _local_state(self) -> dict:
        consumed = self.consumed()
        consumed = self._collated if consumed is None else min(int(consumed), self._collated)
        pending = [batch for pos, batch in self._recent if pos >= consumed]
        if len(pending) != self._collated - consumed:  # more in flight than kept: redraw them instead
            pending, consumed = [], self._collated
        return {"order": self._order, "consumed": consumed, "pending": pending, "size": len(self.dataset),
                "batch_size": self.batch_size, "epochs": self._epochs}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch at the next iterator, if the zoo and batch size are the same (else start anew).

        A multi-process state continues only on as many ranks as saved it (each rank takes its own)."""
        if "ranks" in state:
            state = own_rank_state(state["ranks"]) or {}
        same = state.get("size") == len(self.dataset) and state.get("batch_size") == self.batch_size
        unfinished = state.get("pending") or int(state.get("consumed", 0)) < len(state.get("order", []))
        if same:
            self._epochs = int(state.get("epochs", 0))
        if same and unfinished:  # a finished epoch resumes as the next one starts: with a fresh permutation
            self._resume = state


class ZooDataModule(L.LightningDataModule):
    """Serves a zoo's training members to the hyper-model.

    Args:
        zoo: path of the model zoo directory.
        batch_size: members per batch on each process (under DDP the effective batch is this times the
            number of processes).
        samples_per_class: samples drawn per class to condition on (redrawn every time, as augmentation);
            the VAE's function-space loss runs members on the same samples.
        split: which members to train on; held-out members are never served.
        memory_limit_mb: zoos whose float32 tokens fit in this many MiB are tokenized once into memory
            (fastest); larger zoos are read member by member from their safetensors files
            (`d2nwg.zoo.streamed_tokens.MemberTokens`), so memory does not grow with the number of members.
    """

    def __init__(
        self,
        zoo: str = "runs/zoo",
        batch_size: int = 64,
        samples_per_class: int = 10,
        split: str = "train",
        memory_limit_mb: int = 1024,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.zoo = ModelZoo.open(zoo)
        members = self.zoo.members(split)
        if members and self.zoo.token_bytes(len(members)) > memory_limit_mb * 2**20:
            self.tokens: torch.Tensor | MemberTokens = MemberTokens(self.zoo, members)
        else:
            self.tokens = self.zoo.tokens(split)  # (N, T, chunk), normalised
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
        # Under DDP each rank gets ceil(N / world) members; a shard no larger than one batch keeps its last one.
        world = getattr(getattr(self, "trainer", None), "world_size", 1)
        drop_last = -(-len(dataset) // world) > self.hparams.batch_size
        return ResumableLoader(dataset, self.hparams.batch_size, drop_last, consumed=self._consumed_batches)

    def _consumed_batches(self) -> int | None:
        """Batches of the current epoch that training has run (what a resumed epoch skips)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed
