"""Training and scoring causal-LM adapters, many at once (``torch.func.vmap`` over stacked adapters).

`train_adapters` trains a group of equally shaped adapters on their own data; `finetune_adapters` groups any
number of them; `member_training` and `support_finetuning` are the settings a zoo's members trained with and
the ones fine-tuning from a generated adapter repeats; `adapter_scores` is the teacher-forced mean response
log-likelihood of each adapter on its records."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from d2nwg.targets.causal_lm.modeling import CausalLMAdapter


def _scorer(module: nn.Module, x: torch.Tensor, in_dims=0):
    """``vmap``-ped ``(params, xs) -> module(xs)`` with ``module``'s `CausalLMAdapter.response_extent` of ``x``
    computed here, outside ``vmap``, where it may read the data."""
    from torch.func import functional_call, vmap

    from d2nwg.targets.population import forward_kwargs

    kwargs = forward_kwargs(module, x)
    return vmap(lambda p, xs: functional_call(module, p, (xs,), kwargs), in_dims=(0, in_dims))


# ----------------------------------------------------------------------------- training many adapters at once
PRECISIONS = ("bf16-mixed", "32-true")
"""Compute precisions of caching and adapter training, named as Lightning's ``Trainer(precision=...)``."""


def precision_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device`` for ``"bf16-mixed"`` (weights and optimiser state stay float32,
    as in Lightning's mixed precision); a no-op for ``"32-true"``.

    bf16 halves the time of the frozen LM's matmuls on CPUs with AVX512-BF16 or AMX and on GPUs (measured on a
    2-core AVX512-BF16 CPU: 0.31 vs 0.59 s per member and step of the default LoRA slice).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if precision == "32-true":
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16; use precision 32-true")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_adapters(
    module: CausalLMAdapter,
    init: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    x: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Train N adapters at once: AdamW on each one's response negative log-likelihood.

    Args:
        module: the architecture (its own parameters are not touched).
        init: the initial adapter state_dict, shared by all N (unstacked), or a sequence of N of them (each
            adapter starts from its own, e.g. generated adapters fine-tuned on their task).
        x: per-adapter training samples ``[N, n, D]`` (`conversation_features`), on the device ``module`` is on.
        steps: optimiser steps; each uses a minibatch of ``batch_size`` samples per adapter (bounds the
            ``[N, batch, W, vocab]`` logits in memory); ``seed`` draws the minibatches.

    Returns:
        The trained adapters, stacked ``{name: [N, *shape]}``. Adam is elementwise and the loss is a sum of
        per-adapter means, so each adapter trains exactly as it would alone (``vmap`` over ``functional_call``).
    """
    n_adapters, n = x.shape[:2]
    if isinstance(init, Mapping):
        params = {k: v.detach().to(x.device).unsqueeze(0).repeat(n_adapters, *([1] * v.dim())) for k, v in init.items()}
    else:
        if len(init) != n_adapters:
            raise ValueError(f"train_adapters got {len(init)} initial adapters for {n_adapters} training sets")
        params = {k: torch.stack([s[k].detach() for s in init]).to(x.device) for k in init[0]}
    params = {k: v.float().clone().requires_grad_(True) for k, v in params.items()}
    optimiser = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(n, generator=generator)[: min(batch_size, n)]
        batch = x[:, idx]
        loss = -_scorer(module, batch)(params, batch).mean(1).sum()  # sum over adapters of each one's mean NLL
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return {k: v.detach() for k, v in params.items()}


def finetune_adapter(
    module: CausalLMAdapter, init: Mapping[str, torch.Tensor], x: torch.Tensor, settings: Mapping, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One adapter ``init`` after ``settings["steps"]`` AdamW steps on the samples ``x [n, D]`` (`train_adapters`
    with ``settings``' ``lr``, ``batch_size`` and ``precision``, e.g. from `support_finetuning`)."""
    return finetune_adapters(module, [init], [x], settings, seed)[0]


def finetune_adapters(
    module: CausalLMAdapter,
    inits: Sequence[Mapping[str, torch.Tensor]],
    xs: Sequence[torch.Tensor],
    settings: Mapping,
    seed: int = 0,
    group_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """`finetune_adapter` for each pair of ``inits[i]`` and its own samples ``xs[i] [n_i, D]``, vmapped in groups of
    up to ``group_size`` adapters whose sample sets have the same shape (`train_adapters`: each trains as it would
    alone, up to float rounding).

    Why: one adapter at a time leaves a CPU's matrix units idle; on SmolLM2's 6-layer slice a step of 8 samples
    costs 0.21 s for one adapter and 0.15 s per adapter for 4 to 8 at once (2 cores, bf16 autocast).

    Raises:
        ValueError: ``inits`` and ``xs`` of different lengths.
    """
    if len(inits) != len(xs):
        raise ValueError(f"finetune_adapters got {len(inits)} initial adapters for {len(xs)} training sets")
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    out: list[dict[str, torch.Tensor] | None] = [None] * len(xs)
    for indices in by_shape.values():
        for start in range(0, len(indices), group_size):
            group = indices[start : start + group_size]
            x = torch.stack([xs[i] for i in group])
            with precision_context(settings["precision"], x.device):
                trained = train_adapters(
                    module, [inits[i] for i in group], x, steps=int(settings["steps"]), lr=float(settings["lr"]),
                    batch_size=int(settings["batch_size"]), seed=seed,
                )  # fmt: skip
            for j, i in enumerate(group):
                out[i] = {k: v[j].contiguous() for k, v in trained.items()}
    return out  # type: ignore[return-value]


_LORA_MEMBERS = {"steps": 32, "lr": 5e-3, "batch_size": 8, "precision": "bf16-mixed"}
_MISS_MEMBERS = {**_LORA_MEMBERS, "lr": 1.6e-2, "precision": "32-true"}
MEMBER_TRAINING = {"lora": _LORA_MEMBERS, "miss": _MISS_MEMBERS, "miss-bat": _MISS_MEMBERS}
"""Per adapter kind, how the recipes train members (AdamW from the warm start; `model_zoo.llm_lora`'s and
`model_zoo.llm_miss`'s defaults, ``member_lr`` where set, kept equal to them by ``tests/model_zoo/test_llm_lora.py``):
`member_training`'s fallback for zoos without a recipe (ingested adapters) and for pipelines exported before their
provenance recorded it."""


def member_training(recipe: Mapping | None, kind: str = "lora") -> dict:
    """``{"steps", "lr", "batch_size", "precision"}`` of a zoo's members, from its recipe (``manifest.json``; its
    ``member_lr`` when set, else its ``lr``) where it has them, else `MEMBER_TRAINING` for the adapter ``kind``;
    `support_finetuning` scales them for the ``finetune`` baseline and ``d2nwg generate --finetune-steps``."""
    recipe = dict(recipe or {})
    if recipe.get("member_lr"):  # the recipe's lr is then the warm start's (`model_zoo.llm_lora`)
        recipe["lr"] = recipe["member_lr"]
    return {k: type(v)(recipe.get(k, v)) for k, v in MEMBER_TRAINING.get(kind, _LORA_MEMBERS).items()}


SUPPORT_FINETUNING = {"warm_start": (1.0, 0.2), "generated": (0.5, 0.2)}
"""``{start: (fraction of the members' steps, fraction of their learning rate)}`` for fine-tuning on a support
set (`support_finetuning`). A support set is small (8 records in `llm-lora`), and the members' own 32 steps at lr
5e-3 over-fit it. Chosen on *training* tasks by ``benchmarks/bench_finetune.py`` (24 tasks of the default
`llm-lora` zoo, test log-likelihood after training on 8 of each task's records): from the warm start, 32 steps at
lr 1e-3 -0.124 nats/token (32 at 5e-3: -0.206; no training: -0.406); from the conditional mean fitted without the
task, a stand-in for a generated adapter, 16 steps at 1e-3 -0.072 (32 at 5e-3: -0.131; no training: -0.108)."""


def support_finetuning(member: Mapping, start: str = "warm_start", steps: int | None = None, lr: float | None = None) -> dict:
    """``{"steps", "lr", "batch_size", "precision"}`` for a few fine-tuning steps on a support set from ``start``
    (``"warm_start"``: the zoo's shared initialisation, the ``finetune`` baseline; ``"generated"``: a generated
    adapter), scaled from the members' own training ``member`` (`member_training`) by `SUPPORT_FINETUNING`;
    ``steps`` / ``lr`` replace the scaled values.

    Raises:
        ValueError: ``steps`` < 1 or ``lr`` not a positive number.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"fine-tuning steps must be >= 1, got {steps}")
    if lr is not None and not lr > 0:
        raise ValueError(f"fine-tuning learning rate must be > 0, got {lr}")
    steps_fraction, lr_fraction = SUPPORT_FINETUNING[start]
    return {
        **member,
        "steps": int(steps) if steps is not None else max(1, round(member["steps"] * steps_fraction)),
        "lr": float(lr) if lr is not None else member["lr"] * lr_fraction,
    }


@torch.no_grad()
def adapter_scores(module: CausalLMAdapter, stacked: Mapping[str, torch.Tensor], x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Mean response log-likelihood ``[N]`` of N stacked adapters, each on its own samples ``x [N, n, D]``
    (or all on shared samples ``x [n, D]``). Runs ``module.eval_batch`` adapters by ``batch_size`` samples at a
    time: their ``[adapters, batch, W, vocab]`` logits bound the memory (94 MB per adapter for SmolLM2's head)."""
    shared = x.dim() == 2
    n_adapters, n = next(iter(stacked.values())).shape[0], x.shape[0 if shared else 1]
    group = getattr(module, "eval_batch", None) or n_adapters
    out = []
    for a in range(0, n_adapters, group):
        part = {k: v[a : a + group] for k, v in stacked.items()}
        xs = x if shared else x[a : a + group]
        chunks = []
        for i in range(0, n, batch_size):
            batch = xs[i : i + batch_size] if shared else xs[:, i : i + batch_size]
            chunks.append(_scorer(module, batch, None if shared else 0)(part, batch))
        out.append(torch.cat(chunks, dim=-1).mean(-1))
    return torch.cat(out)
