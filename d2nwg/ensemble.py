"""Train and evaluate many copies of one architecture at once with ``torch.func``.

A zoo of small networks is cheap to train when every member is a slice of one
stacked parameter tensor: ``vmap`` over ``functional_call`` runs all of them in a
single batched forward, and Adam (elementwise) on the stacked tensors is exactly
per-member Adam, because the summed loss gives each member its own gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def stack_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``[{name: t}, ...] -> {name: stacked [N, *t.shape]}``."""
    return {k: torch.stack([sd[k] for sd in state_dicts]) for k in state_dicts[0]}


def unstack_state_dict(stacked: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n = next(iter(stacked.values())).shape[0]
    return [{k: v[i].detach().clone() for k, v in stacked.items()} for i in range(n)]


def full_params(module: nn.Module, stacked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill tensors that ``stacked`` does not hold (e.g. layers outside a layout) from ``module``."""
    n = next(iter(stacked.values())).shape[0]
    base = dict(module.named_parameters()) | dict(module.named_buffers())
    return {k: stacked[k] if k in stacked else v.detach().expand(n, *v.shape) for k, v in base.items()}


def ensemble_logits(module: nn.Module, stacked: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of N parameter sets. ``x`` is shared ``[n, d]`` or per member ``[N, n, d]``; returns ``[N, n, C]``."""
    params = full_params(module, stacked)

    def one(p, inputs):
        return functional_call(module, p, (inputs,))

    in_dims = (0, 0) if x.dim() == 3 else (0, None)
    return vmap(one, in_dims=in_dims)(params, x)


@torch.no_grad()
def ensemble_accuracy(
    module: nn.Module, stacked: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Accuracy of each of N parameter sets, shape ``[N]``."""
    return logits_accuracy(ensemble_logits(module, stacked, x), y)


def logits_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of samples whose argmax is the label: logits ``[..., n, C]``, y ``[..., n]`` -> ``[...]``.

    The one definition of accuracy, for one model (``model(x)``) and for stacked members alike.
    """
    return (logits.argmax(-1) == y).float().mean(-1)


def train_ensemble(
    module: nn.Module,
    init: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    record_at: Sequence[int] = (),
    eval_x: torch.Tensor | None = None,
    eval_y: torch.Tensor | None = None,
    stacked_init: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Full-batch training of N members at once, every member starting from ``init``.

    Args:
        module: the architecture (its own parameters are not touched).
        init: the shared initial state_dict (unstacked), or with ``stacked_init=True`` one initial state per
            member stacked ``{name: [N, *shape]}`` (members from independent random initialisations).
        x, y: per-member training data ``[N, n, d]`` and ``[N, n]``.
        steps: optimiser steps; lr, weight_decay: optimiser settings.
        optimizer: ``"adamw"`` or ``"sgd"`` (with ``momentum``); both act elementwise, hence per member.
        record_at: step counts after which to record accuracy on ``eval_x/eval_y``.

    Returns:
        The trained stacked parameters and ``{step: accuracy [N]}`` for ``record_at``.
    """
    n = x.shape[0]
    if stacked_init:
        bad = [k for k, v in init.items() if v.dim() == 0 or v.shape[0] != n]
        if bad:
            raise ValueError(f"stacked_init needs {n} initial states per tensor (one per member); {bad[0]!r} does not have them")
        # clone(): the optimiser updates params in place and must not write into the caller's inits.
        params = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
    else:
        params = {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())).requires_grad_(True) for k, v in init.items()}
    if optimizer == "adamw":
        optimiser = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        optimiser = torch.optim.SGD(params.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adamw' or 'sgd'")
    curves: dict[int, torch.Tensor] = {}
    if 0 in record_at and eval_x is not None:
        curves[0] = ensemble_accuracy(module, params, eval_x, eval_y)
    for step in range(1, steps + 1):
        logits = ensemble_logits(module, params, x)  # [N, n, C]
        # Sum over members of each member's mean loss: member i's gradient is its own.
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(n, -1)
        optimiser.zero_grad(set_to_none=True)
        loss.mean(1).sum().backward()
        optimiser.step()
        if step in record_at and eval_x is not None:
            curves[step] = ensemble_accuracy(module, params, eval_x, eval_y)
    return {k: v.detach() for k, v in params.items()}, curves


def recipe_optimizer(recipe: Mapping) -> dict:
    """The optimiser settings a zoo recipe trained its members with (for the fine-tuning baseline)."""
    return {
        "optimizer": str(recipe.get("optimizer", "adamw")),
        "lr": float(recipe.get("lr", 1e-2)),
        "weight_decay": float(recipe.get("weight_decay", 0.0)),
        "momentum": float(recipe.get("momentum", 0.9)),
    }


def initial_state(module_factory, seed: int) -> dict[str, torch.Tensor]:
    """The state_dict of a freshly built module under ``seed`` (the zoo's shared initialisation)."""
    torch.manual_seed(seed)
    module = module_factory()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- accuracy of many weight sets
EVAL_BATCH = 256  # weight sets per vmapped forward: bounds memory for larger targets


def _to_float(sd: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device) for k, v in sd.items()}


def shared_accuracy(
    module: nn.Module, state_dicts: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Accuracy ``[N]`` of N weight sets on one dataset ``x [n, D]``, ``y [n]`` (batched on ``x``'s device)."""
    device = x.device
    out = []
    for i in range(0, len(state_dicts), EVAL_BATCH):
        stacked = stack_state_dicts([_to_float(sd, device) for sd in state_dicts[i : i + EVAL_BATCH]])
        out.append(ensemble_accuracy(module, stacked, x, y).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def paired_accuracy(
    module: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Accuracy ``[N]`` of weight set i on dataset i; datasets of equal shape run in one batch.

    Raises:
        ValueError: the numbers of weight sets and datasets differ.
    """
    if len(state_dicts) != len(data):
        raise ValueError(f"got {len(state_dicts)} weight sets for {len(data)} datasets")
    groups: dict[tuple, list[int]] = {}
    for i, (x, y) in enumerate(data):
        groups.setdefault((tuple(x.shape), tuple(y.shape)), []).append(i)
    acc = torch.zeros(len(data))
    for idx in groups.values():
        for s in range(0, len(idx), EVAL_BATCH):
            chunk = idx[s : s + EVAL_BATCH]
            device = data[chunk[0]][0].device
            stacked = stack_state_dicts([_to_float(state_dicts[i], device) for i in chunk])
            x = torch.stack([data[i][0] for i in chunk])
            y = torch.stack([data[i][1] for i in chunk])
            acc[chunk] = ensemble_accuracy(module, stacked, x, y).cpu()
    return acc


def mean_state_dict(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Elementwise mean of floating tensors (float64 running sum); other tensors from the first."""
    first = state_dicts[0]
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in first.items() if v.is_floating_point()}
    for sd in state_dicts:
        for k in total:
            total[k] += sd[k].double()
    return {k: (total[k] / len(state_dicts)).to(v.dtype) if k in total else v for k, v in first.items()}
