"""What each process of a multi-process (DDP) run keeps for itself in a shared checkpoint.

Lightning writes a checkpoint from global rank zero only, but some training state is per rank: the
global RNG (each rank draws its own noise and conditioning samples) and the data loader's place in its
shard of the zoo. `gather_rank_states` collects one state per rank into the checkpoint and
`own_rank_state` hands each rank its own back on resume. Both are no-ops in a single process, so a
single-process checkpoint is what it was before multi-process training existed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(global rank, world size)`` of this process; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rank_states(state: Any) -> list[Any] | None:
    """Every rank's ``state`` in rank order (a collective: all ranks must call it); None in a single process."""
    _, size = world()
    if size == 1:
        return None
    states: list[Any] = [None] * size
    dist.all_gather_object(states, state)
    return states


def own_rank_state(states: list[Any] | None) -> Any | None:
    """This rank's entry of `gather_rank_states`' list; None when the list is missing or from another world size."""
    rank, size = world()
    if not states or len(states) != size:
        return None
    return states[rank]


def fork_rank_rng() -> None:
    """Give every rank its own global RNG stream, derived from the shared one (no-op in a single process).

    Ranks start from one seed (``seed_everything``), so without this they would draw the same noise,
    timesteps and conditioning samples for their (different) members.
    """
    rank, size = world()
    if size == 1:
        return
    base = int(torch.randint(0, 2**62, ()))  # the same draw on every rank: they share one state here
    torch.manual_seed(base + rank)


def assert_same_on_ranks(values: torch.Tensor, what: str) -> None:
    """Raise ``RuntimeError`` if ``values`` (a small tensor, e.g. checksums) differ between ranks.

    Raises:
        RuntimeError: naming ``what`` and the first rank that disagrees with rank zero.
    """
    states = gather_rank_states(values.detach().cpu())
    if states is None:
        return
    for rank, other in enumerate(states[1:], start=1):
        if not torch.equal(states[0], other):
            raise RuntimeError(f"rank {rank} disagrees with rank 0 on {what}; multi-process training went out of step")
