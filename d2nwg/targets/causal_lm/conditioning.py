"""The gradient condition: a task described by what it asks of the adapter.

`gradient_condition` takes the gradient of the mean response negative log-likelihood of a task's records with
respect to the adapter at the zoo's warm start (`task_gradient`) and folds it into H numbers with a count
sketch, in the manner of Task2Vec (Achille et al., ICCV 2019) and LESS (Xia et al., ICML 2024)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from d2nwg.targets.causal_lm.features import GRADIENT_POOLING
from d2nwg.targets.causal_lm.modeling import CausalLMAdapter

SKETCH_SEED = 0
"""Seed of the count sketch that folds a task gradient into H numbers (`gradient_condition`)."""


@functools.lru_cache(maxsize=4)
def _count_sketch(numel: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bucket [numel], sign [numel])`` of a count sketch from ``numel`` to ``width`` numbers (Charikar et al.,
    2002; feature hashing, Weinberger et al., 2009): a fixed linear map that keeps inner products in expectation,
    with O(numel) memory where a dense Gaussian projection of a SmolLM2 slice would hold 53M numbers."""
    generator = torch.Generator().manual_seed(seed)
    bucket = torch.randint(width, (numel,), generator=generator)
    return bucket, torch.randint(2, (numel,), generator=generator).float() * 2 - 1


def task_gradient(module: CausalLMAdapter, anchor: Mapping[str, torch.Tensor], x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Gradient ``[P]`` of the mean response negative log-likelihood of samples ``x [n, D]`` (`conversation_features`)
    with respect to the adapter, at the adapter ``anchor``; flattened in ``module.state_dict()`` order, float32.

    Runs ``batch_size`` samples at a time (their ``[batch, W, vocab]`` logits bound the memory); wrap it in
    `precision_context` to compute in bfloat16.

    Raises:
        ValueError: ``anchor`` lacks one of the module's adapter tensors, or ``x`` is empty.
    """
    from torch.func import functional_call

    keys = list(module.state_dict())
    missing = [k for k in keys if k not in anchor]
    if missing:
        raise ValueError(f"the gradient's anchor adapter has no tensor {missing[0]!r}")
    if not len(x):
        raise ValueError("a task gradient needs at least one sample")
    params = {k: anchor[k].detach().to(x.device, torch.float32).clone().requires_grad_(True) for k in keys}
    total = [torch.zeros_like(p) for p in params.values()]
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size]
        loglik = functional_call(module, params, (batch,), {"extent": module.response_extent(batch)})
        for acc, g in zip(total, torch.autograd.grad(-loglik.sum() / len(x), list(params.values()))):
            acc += g.float()
    return torch.cat([g.flatten() for g in total])


def gradient_condition(module: CausalLMAdapter, anchor: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x [n, D]`` (one split of one task, pooling `GRADIENT_POOLING`) with its gradient block filled: the unit-norm
    count sketch (`SKETCH_SEED`) of `task_gradient` at ``anchor`` (the zoo's warm start), in H numbers, the same in
    every row. A new tensor; ``x`` is not changed.

    Why: on the default `llm-lora` zoo conditioned on conversations alone, the regression of members on the
    prompt-response embedding predicted left-out training tasks' adapters at -0.127 nats/token of test
    log-likelihood (48 tasks, the query from 8 records as at generation); with this block, -0.077 at ridge 0.1.
    On the gradient-conditioned zoo (48 tasks, ``benchmarks/bench_ridge.py``): -0.090 at 0.1, and -0.081 at the
    configs' ridge 0.3. Measured in docs/results/llm-lora.md.

    Raises:
        ValueError: an architecture whose pooling is not `GRADIENT_POOLING`; see `task_gradient`.
    """
    if module.pooling != GRADIENT_POOLING:
        raise ValueError(f"gradient conditioning needs pooling {GRADIENT_POOLING!r}, the architecture has {module.pooling!r}")
    h = module.hidden
    g = task_gradient(module, anchor, x).cpu()
    bucket, sign = _count_sketch(len(g), h, SKETCH_SEED)
    sketch = nn.functional.normalize(torch.zeros(h).index_add_(0, bucket, g * sign), dim=0)
    out = x.clone()
    out[:, h : 2 * h] = sketch.to(x.dtype)
    return out
