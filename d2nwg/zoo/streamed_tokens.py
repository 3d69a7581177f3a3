"""Zoo members' weight tokens, read from disk member by member, for zoos larger than memory.

`MemberTokens` is what `d2nwg.training.datamodule.ZooDataModule` serves from when a zoo's tokens exceed its
memory limit: ``tokens[i]`` opens member ``i``'s safetensors file, tokenizes it (float64 arithmetic, as
`WeightLayout.tokenize` always does, so a row equals the in-memory tensor's row bit for bit) and lets the
file go. Nothing is cached and no file stays mapped, so the process's resident memory holds a batch of
members at a time however many the zoo has; the OS page cache, which RSS does not count, keeps hot
files fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from d2nwg.zoo.model_zoo import Member, ModelZoo


class MemberTokens:
    """Normalised float32 tokens ``[T, chunk]`` of ``members``, read on demand.

    Args:
        zoo: the zoo the members belong to (its layout holds the normalisation statistics).
        members: the members, in the order indices refer to.

    Example:
        >>> tokens = MemberTokens(zoo, zoo.members("train"))  # doctest: +SKIP
        >>> tokens[0].shape, tokens[0:4].shape                # [T, chunk], [4, T, chunk]  # doctest: +SKIP
    """

    def __init__(self, zoo: ModelZoo, members: Sequence[Member]):
        if not members:
            raise ValueError(f"the zoo at {zoo.root} has no members to tokenize")
        self.zoo = zoo
        self.members = list(members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.zoo.layout.num_tokens, self.zoo.layout.chunk_size)

    @property
    def nbytes(self) -> int:
        """Bytes the tokens would take in memory (what this class avoids holding)."""
        return self.zoo.token_bytes(len(self))

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        """Member ``index`` -> ``[T, chunk]``; a slice -> ``[n, T, chunk]``."""
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
            if not rows:
                return torch.empty(0, *self.shape[1:])
            return torch.stack([self[i] for i in rows])
        return self.zoo.layout.tokenize(self.zoo.load_member(self.members[index]))[0]

    def sum(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Float64 sum ``[T, chunk]`` of members ``[start, stop)`` (a streaming pass, one member at a time)."""
        total = torch.zeros(self.shape[1:], dtype=torch.float64)
        for i in range(start, len(self) if stop is None else stop):
            total += self[i]
        return total

    def members_per_chunk(self, budget_bytes: int = 64 * 2**20) -> int:
        """How many members fit in ``budget_bytes`` of float32 tokens (at least one)."""
        return max(1, budget_bytes // self.zoo.token_bytes(1))
