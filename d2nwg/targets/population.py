"""Train and evaluate many copies of one architecture at once with ``torch.func``.

A zoo of small networks is cheap to train when every member is a slice of one
stacked parameter tensor: ``vmap`` over ``functional_call`` runs all of them in a
single batched forward, and Adam (elementwise) on the stacked tensors is exactly
per-member Adam, because the summed loss gives each member its own gradient.

Modes, and what happens to buffers (BatchNorm running statistics):

* **Evaluating** (`population_logits`, `population_accuracy`, the VAE's function-space loss):
  every member runs in eval mode, whatever mode the module is in (it is restored
  afterwards). BatchNorm normalises with the member's *own* running statistics,
  passed in stacked like its weights (or the module's, shared, when the stack lacks
  them), and nothing is written: shared buffers are never mutated, which is what
  lets ``vmap`` run at all (an in-place update of an expanded buffer is an error).
  LayerNorm and GroupNorm have no buffers and behave the same in both modes.
* **Training** (`train_population`, the zoo recipes and the fine-tuning baseline):
  BatchNorm layers run in training mode, i.e. on batch statistics, as the members
  themselves were trained; each member's running statistics (and
  ``num_batches_tracked``) live in its own slice of a stacked copy and are updated
  there with the layer's momentum, never in the module. Buffers are never optimised.
  Every other layer stays in eval mode (no dropout: the fine-tuning baseline and the
  built-in recipes always ran that way). Accuracies recorded during training use
  eval mode with the members' updated running statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap


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


def _eval_batch_norm(bn: nn.modules.batchnorm._BatchNorm, original, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm that is differentiable in the running statistics.

    The fused kernel refuses gradients with respect to ``running_mean``/``running_var``; the VAE's
    function-space loss needs them (the statistics are decoded like weights). `members_mode` swaps
    this in only when a stacked running statistic requires grad.
    """
    mean, var = bn.running_mean, bn.running_var
    if bn.training or mean is None:
        return original(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.weight is not None:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out


@contextmanager
def members_mode(module: nn.Module, batch_norm_train: bool = False, grad_stats: bool = False) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode (BatchNorm layers in train mode if ``batch_norm_train``); restores every
    submodule's own mode (and forward) afterwards. ``grad_stats``: eval-mode BatchNorm layers compute
    their affine formula in plain ops so that gradients reach the running statistics."""
    modes = [(m, m.training) for m in module.modules()]
    patched = []
    try:
        for m in module.modules():
            is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
            m.training = batch_norm_train and is_bn
            if is_bn and grad_stats and not batch_norm_train and "forward" not in m.__dict__:
                m.forward = functools.partial(_eval_batch_norm, m, m.forward)
                patched.append(m)
        yield module
    finally:
        for m in patched:
            del m.forward
        for m, training in modes:
            m.training = training


def forward_kwargs(module: nn.Module, x: torch.Tensor) -> dict:
    """Keyword arguments of ``module``'s forward that depend on the whole batch ``x``, computed here, outside
    ``vmap``, where they may read the data: a causal-LM slice's ``extent`` (`d2nwg.targets.causal_lm.modeling.CausalLMAdapter.
    response_extent`: the columns and LM-head positions the batch uses; the export's VAE check on 64 members of
    the default llm-lora zoo took 57 s without it, 48 s with it, with the same ratio). Empty for other modules."""
    extent = module.response_extent(x) if hasattr(module, "response_extent") else None
    return {"extent": extent} if extent is not None else {}


def population_logits(
    module: nn.Module, stacked: Mapping[str, torch.Tensor], x: torch.Tensor, *, batch_norm_train: bool = False
) -> torch.Tensor:
    """Logits of N parameter sets. ``x`` is shared ``[n, d]`` or per member ``[N, n, d]``; returns ``[N, n, C]``.

    Members run in eval mode (see the module docstring); tensors that ``stacked`` lacks come from ``module``.
    With ``batch_norm_train=True`` BatchNorm layers use batch statistics and update the running statistics
    in place, so ``stacked`` must then hold every BatchNorm buffer per member (`train_population` does).
    """
    params = full_params(module, stacked)
    kwargs = forward_kwargs(module, x)

    def one(p, inputs):
        return functional_call(module, p, (inputs,), kwargs)

    in_dims = (0, 0) if x.dim() == 3 else (0, None)
    grad_stats = torch.is_grad_enabled() and any(v.requires_grad for k, v in stacked.items() if k in dict(module.named_buffers()))
    with members_mode(module, batch_norm_train, grad_stats):
        # Batch statistics are per member; "different" only matters if a layer draws random numbers.
        return vmap(one, in_dims=in_dims, randomness="different" if batch_norm_train else "error")(params, x)


@torch.no_grad()
def population_accuracy(
    module: nn.Module, stacked: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Accuracy of each of N parameter sets, shape ``[N]``.

    A module that scores samples instead of classifying them (``scores_samples = True``: ``forward`` gives the
    mean log-likelihood ``[n]`` of each sample's reference response, `d2nwg.targets.causal_lm.modeling.CausalLMAdapter`) gets the
    mean per-token probability of the reference, ``exp(score)`` averaged over samples, in (0, 1]: like accuracy,
    higher is better and 1 is perfect, so the VAE's reconstruction ratio and the baselines read the same.
    """
    if getattr(module, "scores_samples", False):
        return population_logits(module, stacked, x).exp().mean(-1)
    return logits_accuracy(population_logits(module, stacked, x), y)


def logits_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of samples whose argmax is the label: logits ``[..., n, C]``, y ``[..., n]`` -> ``[...]``.

    The one definition of accuracy, for one model (``model(x)``) and for stacked members alike.
    """
    return (logits.argmax(-1) == y).float().mean(-1)


def train_population(
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

    Members train as described in the module docstring: BatchNorm on batch statistics, each member's
    running statistics updated in its own copy (from ``init`` when it holds them, else from ``module``),
    and only the module's parameters (not its buffers) optimised.

    Returns:
        The trained stacked tensors of ``init`` (buffers with their updated running statistics, and any
        BatchNorm buffer ``init`` lacked) and ``{step: accuracy [N]}`` for ``record_at``.
    """
    n = x.shape[0]
    if stacked_init:
        bad = [k for k, v in init.items() if v.dim() == 0 or v.shape[0] != n]
        if bad:
            raise ValueError(f"stacked_init needs {n} initial states per tensor (one per member); {bad[0]!r} does not have them")
        # clone(): the optimiser updates params in place and must not write into the caller's inits.
        stacked = {k: v.detach().clone() for k, v in init.items()}
    else:
        stacked = {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in init.items()}
    module_buffers = dict(module.named_buffers())
    params = {k: v.requires_grad_(True) for k, v in stacked.items() if k not in module_buffers}
    # Every BatchNorm buffer per member (cloned): training-mode BatchNorm writes its running statistics.
    buffers = {k: v for k, v in stacked.items() if k in module_buffers}
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            for key, value in sub.named_buffers(prefix=name, recurse=False):
                buffers.setdefault(key, value.detach().unsqueeze(0).repeat(n, *([1] * value.dim())))
    state = {**params, **buffers}
    if optimizer == "adamw":
        optimiser = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        optimiser = torch.optim.SGD(params.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adamw' or 'sgd'")
    curves: dict[int, torch.Tensor] = {}
    if 0 in record_at and eval_x is not None:
        curves[0] = population_accuracy(module, state, eval_x, eval_y)
    for step in range(1, steps + 1):
        logits = population_logits(module, state, x, batch_norm_train=True)  # [N, n, C]
        # Sum over members of each member's mean loss: member i's gradient is its own.
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(n, -1)
        optimiser.zero_grad(set_to_none=True)
        loss.mean(1).sum().backward()
        optimiser.step()
        if step in record_at and eval_x is not None:
            curves[step] = population_accuracy(module, state, eval_x, eval_y)
    return {k: v.detach() for k, v in state.items()}, curves


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


def eval_batch(module: nn.Module) -> int:
    """Weight sets per vmapped forward for ``module``: its own ``eval_batch`` if it sets one (targets whose
    forward holds large activations per weight set, e.g. an LM head's logits), else `EVAL_BATCH`."""
    return int(getattr(module, "eval_batch", EVAL_BATCH))


def _to_float(sd: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device) for k, v in sd.items()}


def shared_accuracy(
    module: nn.Module, state_dicts: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Accuracy ``[N]`` of N weight sets on one dataset ``x [n, D]``, ``y [n]`` (batched on ``x``'s device)."""
    device = x.device
    out = []
    batch = eval_batch(module)
    for i in range(0, len(state_dicts), batch):
        stacked = stack_state_dicts([_to_float(sd, device) for sd in state_dicts[i : i + batch]])
        out.append(population_accuracy(module, stacked, x, y).cpu())
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
    batch = eval_batch(module)
    for idx in groups.values():
        for s in range(0, len(idx), batch):
            chunk = idx[s : s + batch]
            device = data[chunk[0]][0].device
            stacked = stack_state_dicts([_to_float(state_dicts[i], device) for i in chunk])
            x = torch.stack([data[i][0] for i in chunk])
            y = torch.stack([data[i][1] for i in chunk])
            acc[chunk] = population_accuracy(module, stacked, x, y).cpu()
    return acc


def mean_state_dict(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Elementwise mean of floating tensors (float64 running sum); other tensors from the first."""
    first = state_dicts[0]
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in first.items() if v.is_floating_point()}
    for sd in state_dicts:
        for k in total:
            total[k] += sd[k].double()
    return {k: (total[k] / len(state_dicts)).to(v.dtype) if k in total else v for k, v in first.items()}
