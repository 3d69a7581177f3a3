"""The ``causal-lm-adapter`` architecture: a LoRA/MiSS adapter on a slice of a causal LM, judged on what it generates.

A member is only the adapter tensors of a few layers (no head): the frozen LM plus the
adapter is a model that answers prompts. The zoo, the hyper-model and the evaluation feed
a module one feature vector per sample, so, as for `d2nwg.text_classifier`, the frozen
layers below the adapted slice run once per (prompt, response) pair and their output is
cached as the sample. One sample is the flat vector

    [ pooled (C) | hidden states entering layer `first` (T * H) | attention mask (T) | labels (T) ]

- ``pooled``: C numbers (`condition_width`: H, or 2H for ``"prompt-response-gradient"``), what the
  dataset encoder conditions on (a task is described by the embeddings of its (prompt, response)
  examples), by the architecture's ``pooling`` (`POOLINGS`):
  ``"prompt-response"`` (ingested zoos) is the unit-norm mean of the prompt's hidden states entering
  layer ``first`` plus that of the response's, so the answer's format counts as much as the
  question's, however long the chat template makes the prompt; ``"final-mean"`` (zoos built
  before it) is the mean over every real token of the last (final-norm) hidden states, which
  the prompt and template dominate; ``"prompt-response-gradient"`` (the recipes' zoos) is the
  prompt-response embedding followed by H numbers that describe the task by what it asks of the
  adapter: the gradient of the mean response negative log-likelihood of the task's records (one
  split of them) with respect to the adapter, taken at the zoo's warm start and folded into H numbers
  by a count sketch (`gradient_condition`). It is the same for every sample of that split: a dataset
  feature, as Task2Vec (Achille et al., ICCV 2019) embeds a task by gradient statistics of a probe
  network and LESS (Xia et al., ICML 2024) compares instruction data by projected LoRA gradients.
- ``hidden``, ``mask``: the conversation, **left-padded** to T tokens, as it enters layer
  ``first``. Left padding puts every response at the end of the row, so the tokens that carry
  a loss always sit in the last ``response_window`` positions and the LM head (a 49k-way
  matmul per position for SmolLM2) runs on those positions only, with static shapes that
  ``vmap`` accepts. Positions are ``cumsum(mask) - 1``, so padding does not shift rotary
  positions: the cached states equal those of the unpadded conversation.
- ``labels``: the token ids of the assistant's final turn (including the end-of-turn token,
  so a trained adapter stops), -100 elsewhere, stored as floats (exact below 2^24).

`CausalLMAdapter.forward` returns the mean log-likelihood of each sample's response tokens
(the teacher-forced score members are trained and compared with). Generation runs the whole
LM through transformers + peft: `AdapterGenerator` injects a member (or none: the base) and
decodes greedily, and `save_causal_lm_adapter` writes a PEFT folder whose
``adapter_config.json`` names the base, so ``AutoPeftModelForCausalLM.from_pretrained(folder)``
loads base and adapter in one call.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from d2nwg.architectures import Architecture
from d2nwg.instructions import IGNORE_INDEX, decode_response, encode_conversations, encode_prompts, stop_token_ids
from d2nwg.text_classifier import (
    canonical_base,
    frozen_as_constants,
    is_causal_lm,
    load_encoder,
    load_tokenizer,
    mean_pool,
    to_peft_state_dict,
)

ARCHITECTURE_NAME = "causal-lm-adapter"
DEFAULT_BASE = "smollm2-135m-instruct"
GRADIENT_POOLING = "prompt-response-gradient"
POOLINGS = ("final-mean", "prompt-response", GRADIENT_POOLING)
"""How a conversation's ``pooled`` embedding is made (module docstring); architectures without one: ``"final-mean"``."""
NEW_ZOO_POOLING = "prompt-response"
"""The pooling of zoos without a warm start (`zoo ingest`); the recipes, which train one, use `GRADIENT_POOLING`."""
SKETCH_SEED = 0
"""Seed of the count sketch that folds a task gradient into H numbers (`gradient_condition`)."""


def condition_width(pooling: str, hidden: int) -> int:
    """Numbers of ``pooled`` per sample: ``hidden`` (H), or 2H for `GRADIENT_POOLING` (prompt-response | gradient)."""
    return 2 * hidden if pooling == GRADIENT_POOLING else hidden


def condition_blocks(pooling: str) -> int:
    """Blocks of ``pooled`` that the conditioning kernel centres and normalises apart (`d2nwg.models.ConditionalMean`)."""
    return 2 if pooling == GRADIENT_POOLING else 1


# ----------------------------------------------------------------------------- features
def left_pad(batch: Mapping[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` ``[n, T]`` -> the same rows left-padded."""
    lengths = batch["attention_mask"].sum(1)
    width = batch["input_ids"].shape[1]
    out = {
        "input_ids": torch.full_like(batch["input_ids"], pad_id),
        "attention_mask": torch.zeros_like(batch["attention_mask"]),
        "labels": torch.full_like(batch["labels"], IGNORE_INDEX),
    }
    for r, n in enumerate(lengths.tolist()):
        for key in out:
            out[key][r, width - n :] = batch[key][r, :n]
    return out


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions ``[n, T]`` of left-padded rows: real tokens at 0..len-1 (padding at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def conversation_features(
    conversations: Sequence[Sequence[Mapping]],
    first_layer: int,
    max_length: int,
    response_window: int,
    base: str = DEFAULT_BASE,
    batch_size: int = 32,
    encoder: nn.Module | None = None,
    tokenizer=None,
    pooling: str = "final-mean",
) -> torch.Tensor:
    """Per-conversation feature vectors ``[n, C + T*H + 2T]`` (T = ``max_length``, C = `condition_width`; see the
    module docstring). For `GRADIENT_POOLING` the gradient block is left zero: `gradient_condition` fills it.

    Args:
        conversations: chat conversations ending with the assistant's response (`d2nwg.instructions`).
        first_layer: the lowest adapted layer; its input hidden states are cached.
        max_length: tokens per conversation (T) after the chat template.
        response_window: the last positions that may hold response tokens (the LM head runs there only).
        base: the causal LM (a base name, local folder or Hub id).
        pooling: how ``pooled`` is made (`POOLINGS`, module docstring).

    Raises:
        ValueError: (one line) a conversation longer than ``max_length``, or whose response (with the tokens the
            template adds after it) is longer than ``response_window``; an unknown ``pooling``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
    encoder = encoder if encoder is not None else load_encoder(base)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
    batch = encode_conversations(tokenizer, list(conversations), max_length=max_length, last_turn_only=True)
    batch = left_pad(batch, int(tokenizer.pad_token_id))
    labelled = (batch["labels"] != IGNORE_INDEX).float()
    first = torch.where(labelled.any(1), labelled.argmax(1), torch.full_like(labelled[:, 0], max_length, dtype=torch.long))
    too_long = (max_length - first > response_window).nonzero().flatten()
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(
            f"the response of conversation {i} ends {max_length - int(first[i])} tokens before the end of the row, "
            f"more than response_window={response_window}"
        )
    backbone = encoder.base_model
    device = next(backbone.parameters()).device  # runs where the encoder is; features come back on the CPU
    out = []
    for i in range(0, len(conversations), batch_size):
        full_mask = batch["attention_mask"][i : i + batch_size]
        # Columns that are padding in every row of the batch change no real token's state: skip them (zeros in the
        # cache; nothing reads a padded position), about 9% of a date-format batch.
        start = int(full_mask.any(0).long().argmax())
        ids, mask = batch["input_ids"][i : i + batch_size, start:].to(device), full_mask[:, start:].to(device)
        hidden, final = _hidden_entering(backbone, first_layer, ids, mask, need_final=pooling == "final-mean")
        hidden = nn.functional.pad(hidden, (0, 0, start, 0))  # (n, T, H): the input of layer `first_layer`
        mask = full_mask.to(device)
        labels = batch["labels"][i : i + batch_size].to(device).float()
        if pooling == "final-mean":
            pooled = mean_pool(final, mask[:, start:].float())  # (n, H): after the final norm
        else:
            response = (labels != IGNORE_INDEX).float()
            pooled = sum(
                nn.functional.normalize(mean_pool(hidden.float(), part), dim=-1) for part in (mask.float() - response, response)
            ).to(hidden.dtype)
            if pooling == GRADIENT_POOLING:
                pooled = torch.cat([pooled, torch.zeros_like(pooled)], dim=1)
        out.append(torch.cat([pooled, hidden.flatten(1), mask.float(), labels], dim=1).cpu())
    return torch.cat(out)


class _StopForward(Exception):
    """Raised by `_hidden_entering`'s hook once the states it needs exist."""


def _hidden_entering(
    backbone: nn.Module, layer: int, ids: torch.Tensor, mask: torch.Tensor, need_final: bool, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden states entering decoder layer `layer` [n, T, H], final-norm states [n, T, H] or None)`` of the
    left-padded rows ``ids``/``mask`` [n, T]; ``kwargs`` go to the backbone (e.g. a cache to fill).

    Without ``need_final`` the forward stops at layer ``layer`` (a pre-hook takes its input and ends the pass),
    so the layers above the adapted slice, a fifth of SmolLM2's 30 for the default slice, never run.
    """
    from d2nwg.adapters import block_list

    captured = {}

    def take(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        if not need_final:
            raise _StopForward

    handle = backbone.get_submodule(block_list(backbone)[0])[layer].register_forward_pre_hook(take, with_kwargs=True)
    try:
        result = backbone(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=need_final, **kwargs)
    except _StopForward:
        return captured["hidden"], None
    finally:
        handle.remove()
    return captured["hidden"], result.hidden_states[-1]


def left_causal_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``[n, 1, T, T]``: a query sees real keys at or before it (itself always, so that
    padding rows never softmax over nothing)."""
    t = mask.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    allowed = (causal & mask.bool()[..., None, :]) | torch.eye(t, dtype=torch.bool, device=mask.device)  # (n, T, T)
    return (~allowed)[..., None, :, :].to(dtype) * torch.finfo(dtype).min


# ----------------------------------------------------------------------------- the architecture
class CausalLMAdapter(nn.Module):
    """A frozen causal LM with a LoRA/MiSS adapter on ``layers``; ``forward`` scores responses.

    Args:
        base: a Llama-architecture causal LM: ``"smollm2-135m-instruct"`` (packaged, see `d2nwg.bases`),
            a local Hugging Face folder or a Hub id.
        kind: adapter kind of `d2nwg.adapters.ADAPTER_KINDS` (``"lora"``, ``"miss"``, ``"miss-bat"``).
        target_modules: linear layers adapted inside each block, e.g. ``["q_proj", "v_proj"]``.
        layers: adapted layer indices (the cached input is that of the lowest one).
        r: adapter rank (MiSS: block size). max_length: tokens per conversation (T).
        response_window: last positions that may carry response tokens.
        options: extra adapter config fields (e.g. ``{"lora_alpha": 16}``).
        system: the system message the zoo's conversations carry (``None``: whatever each record has).
        pooling: how a conversation's conditioning embedding is made (`POOLINGS`; `conversation_features`).

    ``forward(x [n, C + T*H + 2T]) -> [n]``: the mean log-likelihood (nats per token) of each sample's
    response tokens under the adapted LM, teacher-forced.

    Raises:
        ValueError: a base that is not a Llama-style causal LM.
    """

    scores_samples = True
    """``forward`` scores samples (a log-likelihood each) instead of classifying them (`d2nwg.ensemble`)."""
    eval_batch = 16
    """Adapters per vmapped forward in `d2nwg.ensemble` (not its default 256): each holds ``[n, W, vocab]`` logits
    and their log-softmax, 2 x 16 x 15 x 49,152 floats = 94 MB for a SmolLM2 task's 16 test samples; 200 adapters
    at once took over 20 GB (an export was killed for memory)."""

    def __init__(
        self,
        base: str = DEFAULT_BASE,
        kind: str = "lora",
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        layers: Sequence[int] = (24, 25, 26, 27, 28, 29),
        r: int = 8,
        max_length: int = 48,
        response_window: int = 24,
        options: Mapping | None = None,
        system: str | None = None,
        pooling: str = "final-mean",
    ):
        super().__init__()
        self.system = system  # recorded for generation (`d2nwg.generate_adapter`); the score does not use it
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
        self.pooling = pooling  # how samples are made (`conversation_features`); the score does not use it
        from d2nwg.adapters import block_list, build_peft_model

        lm = load_encoder(base)
        if not is_causal_lm(lm.config):
            raise ValueError(f"base {base!r} is not a causal LM (its architectures: {getattr(lm.config, 'architectures', None)})")
        self.hidden = lm.config.hidden_size
        self.max_length = int(max_length)
        self.response_window = int(response_window)
        self.layers = sorted(int(i) for i in layers)
        self.first = self.layers[0]
        self._stack = block_list(lm)[0]  # "model.layers"
        self._backbone = self._stack.rpartition(".")[0]  # "model": holds rotary_emb and norm
        backbone = lm.get_submodule(self._backbone)
        if not (hasattr(backbone, "rotary_emb") and hasattr(backbone, "norm")):
            raise ValueError(f"unsupported causal LM {type(lm).__name__}: expected a Llama-style decoder (rotary_emb, norm)")
        self.peft = build_peft_model(lm, kind, list(target_modules), self.layers, r, **dict(options or {}))
        self._frozen = frozen_as_constants(self.peft)  # the state_dict holds exactly the adapter

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for module, name in self._frozen:
            setattr(module, name, fn(getattr(module, name)))
        return self

    @property
    def blocks(self) -> nn.ModuleList:
        return self.peft.base_model.model.get_submodule(self._stack)

    @property
    def condition_width(self) -> int:
        """C, the numbers of ``pooled`` in a sample (`condition_width`)."""
        return condition_width(self.pooling, self.hidden)

    def split_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [n, D]`` -> ``pooled [n, C]``, ``hidden [n, T, H]``, ``mask [n, T]``, ``labels [n, T]`` (long)."""
        h, t, c = self.hidden, self.max_length, self.condition_width
        if x.shape[-1] != c + t * h + 2 * t:
            raise ValueError(f"causal-lm-adapter features have {x.shape[-1]} numbers, expected {c + t * h + 2 * t} (C={c}, H={h}, T={t})")
        hidden = x[..., c : c + t * h].unflatten(-1, (t, h))
        return x[..., :c], hidden, x[..., c + t * h : c + t * h + t], x[..., c + t * h + t :].round().long()

    def response_extent(self, x: torch.Tensor) -> tuple[int, int]:
        """``(start, window)`` of samples ``x [..., D]``: columns ``[start, T)`` hold every real token of every row
        and the last ``window`` (at most ``response_window``) every response token.

        Call it outside ``vmap`` and pass it to ``forward``: the slice then skips the columns that are padding in
        every row, and the LM head the window positions that score no row's token. The date-format family's
        responses fill 11 to 12 of the 15 window positions of a member's batch and its rows 37 of 40 columns,
        so this cuts the head's work by a fifth and the slice's by 6%; the result is the same up to rounding.
        """
        t = self.max_length
        _, _, mask, labels = self.split_features(x)
        real, response = mask.reshape(-1, t).ne(0).any(0), labels.reshape(-1, t).ne(IGNORE_INDEX).any(0)
        start = int(real.long().argmax()) if bool(real.any()) else 0
        window = t - int(response.long().argmax()) if bool(response.any()) else 1
        window = max(1, min(window, self.response_window, t - 1))
        # Keep the column before the window too (it scores the window's first label, even from a padding column, as
        # the full rows do): shrinking the window instead would drop a label that starts a row.
        return min(start, t - window - 1), window

    def token_logprobs(self, x: torch.Tensor, extent: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(label) [n, W], is_response [n, W])`` over the last ``W`` positions: ``response_window``, or the
        window of ``extent = (start, W)`` (`response_extent`), which also drops the columns before ``start``."""
        _, h, mask, labels = self.split_features(x)
        start, w = extent if extent is not None else (0, self.response_window)
        h, mask, labels = h[..., start:, :], mask[..., start:], labels[..., start:]
        lm = self.peft.base_model.model
        backbone = lm.get_submodule(self._backbone)
        rope = backbone.rotary_emb(h, positions(mask))  # (cos, sin), each (n, T, head_dim)
        bias = left_causal_bias(mask, h.dtype)
        for block in [self.blocks[i] for i in range(self.first, len(self.blocks))]:
            h = block(h, attention_mask=bias, position_embeddings=rope)
        # Position t predicts token t+1: the hidden states at [T-W-1, T-1) score the labels at [T-W, T).
        logits = lm.lm_head(backbone.norm(h[..., -w - 1 : -1, :]))  # (n, W, V)
        target = labels[..., -w:]  # (n, W)
        is_response = target != IGNORE_INDEX
        logp = logits.log_softmax(-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return logp * is_response, is_response

    def forward(self, x: torch.Tensor, extent: tuple[int, int] | None = None) -> torch.Tensor:
        logp, is_response = self.token_logprobs(x, extent)
        return logp.sum(-1) / is_response.sum(-1).clamp_min(1)  # (n,)


def _scorer(module: nn.Module, x: torch.Tensor, in_dims=0):
    """``vmap``-ped ``(params, xs) -> module(xs)`` with ``module``'s `CausalLMAdapter.response_extent` of ``x``
    computed here, outside ``vmap``, where it may read the data."""
    from torch.func import functional_call, vmap

    from d2nwg.ensemble import forward_kwargs

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
`model_zoo.llm_miss`'s defaults, ``member_lr`` where set, kept equal to them by ``tests/test_llm_zoo.py``):
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


# ----------------------------------------------------------------------------- generation
SHARED_PREFIX_MIN = 32
"""Shortest token prefix common to a batch's prompts that `AdapterGenerator` encodes once (shorter ones, such as
the chat template's opening, save less than the extra forward costs)."""


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens all ``rows`` start with, leaving each row at least one of its own; 0 when under `SHARED_PREFIX_MIN`
    or for a single row."""
    if len(rows) < 2:
        return 0
    n = 0
    for column in zip(*rows):
        if any(t != column[0] for t in column[1:]):
            break
        n += 1
    n = min(n, min(len(r) for r in rows) - 1)
    return n if n >= SHARED_PREFIX_MIN else 0


class AdapterGenerator:
    """Greedy answers of the base LM with a swappable adapter, through transformers + peft.

    One PEFT model is built per generator; `set_adapter` loads a member's tensors (d2nwg state-dict keys
    as in the zoo, or standard PEFT keys) and ``None`` answers with the base alone (the adapter disabled).

    Args:
        architecture: the zoo's ``{"name": "causal-lm-adapter", "config": {...}}``.
    """

    def __init__(self, architecture: Mapping):
        from d2nwg.adapters import build_peft_model

        cfg = dict(architecture["config"])
        self.config = cfg
        self.tokenizer = load_tokenizer(cfg["base"])
        self.stops = stop_token_ids(self.tokenizer)
        self.model = build_peft_model(
            load_encoder(cfg["base"]), cfg.get("kind", "lora"), list(cfg["target_modules"]), list(cfg["layers"]),
            int(cfg["r"]), **dict(cfg.get("options") or {}),
        ).eval()
        # Generation does not re-run layers with an explicit mask as the slice does (`load_encoder`'s eager
        # attention): PyTorch's fused attention, as `AutoPeftModelForCausalLM` loads by default. Same greedy
        # answers on a held-out task's 16 prompts under 16 adapters, 10% faster.
        with contextlib.suppress(AttributeError, ValueError, ImportError):  # transformers without the switch
            self.model.get_base_model().set_attn_implementation("sdpa")
        self.adapter_on = True

    def set_adapter(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Use ``state`` (a member, in zoo or PEFT keys) from now on; ``None``: the base model alone."""
        from d2nwg.adapters import inject_adapter

        self.adapter_on = state is not None
        if state is not None:
            inject_adapter(self.model, peft_keys(state))

    def _active(self) -> contextlib.AbstractContextManager:
        """The adapter as `set_adapter` left it: on, or disabled (the base alone)."""
        return contextlib.nullcontext() if self.adapter_on else self.model.disable_adapter()

    def _prefix_cache(self, prefix: Sequence[int], rows: int):
        """A ``transformers.DynamicCache`` of ``prefix``'s keys and values under the active adapter, repeated for
        ``rows`` rows: the prompt reuse of transformers' "KV cache strategies" guide, so a prefix every row shares
        (in-context examples) runs once per batch instead of once per row."""
        cache = self._new_cache()
        self.model(input_ids=torch.tensor([list(prefix)]), use_cache=True, **{self._cache_key: cache})
        cache.batch_repeat_interleave(rows)
        return cache

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _shared_base_cache(self, ids: torch.Tensor, mask: torch.Tensor, adapter_names: Sequence[str]):
        """A ``DynamicCache`` of each left-padded prompt ``ids``/``mask`` [p, width] but its last token, for
        ``p * n`` rows (row ``j * n + a``: prompt j under ``adapter_names[j * n + a]``, n adapters).

        The layers below the adapted slice do not depend on the adapter: they run once per prompt, and their keys,
        values and output are repeated for the n adapters; only the slice runs per row (through peft's mixed
        adapter batches, on the repeated output, as ``inputs_embeds`` of the stack cut to the slice). For the
        default `llm-lora` slice (6 of 30 layers) and 16 adapters this is a quarter of the prefill's work.
        """
        from d2nwg.adapters import block_list

        n = len(adapter_names) // len(ids)
        prefix, prefix_mask = ids[:, :-1], mask[:, :-1]
        first = min(int(i) for i in self.config["layers"])
        lm = self.model.get_base_model()
        stack_name = block_list(lm)[0]  # "model.layers"
        backbone_name, _, attr = stack_name.rpartition(".")
        backbone, stack = lm.get_submodule(backbone_name), lm.get_submodule(stack_name)
        below = self._new_cache()
        hidden, _ = _hidden_entering(backbone, first, prefix, prefix_mask, need_final=False, use_cache=True, **{self._cache_key: below})
        cache = self._new_cache()
        setattr(backbone, attr, nn.ModuleList(list(stack)[first:]))  # each attention keeps its layer_idx in the cache
        try:
            self.model(
                inputs_embeds=hidden.repeat_interleave(n, 0), attention_mask=prefix_mask.repeat_interleave(n, 0),
                position_ids=positions(prefix_mask).repeat_interleave(n, 0), use_cache=True, logits_to_keep=1,
                adapter_names=list(adapter_names), **{self._cache_key: cache},
            )  # fmt: skip
        finally:
            setattr(backbone, attr, stack)
        for layer in range(first):
            keys, values = _layer_kv(below, layer)
            cache.update(keys.repeat_interleave(n, 0), values.repeat_interleave(n, 0), layer)
        return cache

    @functools.cached_property
    def _cache_key(self) -> str:
        """The keyword a cache is passed under: transformers >= 5.2x names it ``cache`` (``past_key_values``, which
        earlier versions take, is deprecated there)."""
        import inspect

        forward = type(self.model.get_base_model()).forward
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    @torch.no_grad()
    def answer(self, conversations: Sequence[Sequence[Mapping]], max_new_tokens: int | None = None, batch_size: int = 16) -> list[str]:
        """Greedy responses (decoded, stripped) to each conversation's prompt (its final assistant turn dropped).

        ``max_new_tokens``: ``None`` is the architecture's ``response_window``, which holds every training response
        with its end-of-turn tokens, so a right answer is never cut and a rambling one stops early. A token prefix
        all prompts of a batch share (at least `SHARED_PREFIX_MIN` tokens: the same in-context examples) is encoded
        once (`_prefix_cache`); the answers are those of encoding it per row, up to float rounding.
        """
        max_new_tokens = max_new_tokens or int(self.config["response_window"])
        prompts = encode_prompts(self.tokenizer, list(conversations))
        answers: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            shared = shared_prefix_length(chunk)
            # [shared prefix][left padding][own tokens]: positions come from the mask, so every row's prefix sits
            # at positions 0.. as in the cache, and its own tokens follow it whatever the padding.
            ids, mask = self._left_padded([p[shared:] for p in chunk])
            if shared:
                ids = torch.cat([torch.tensor(chunk[0][:shared]).expand(len(chunk), -1), ids], dim=1)
                mask = torch.cat([torch.ones(len(chunk), shared, dtype=mask.dtype), mask], dim=1)
            with self._active():
                cache = self._prefix_cache(chunk[0][:shared], len(chunk)) if shared else None
                out = self._generate(ids, mask, max_new_tokens, cache)
            answers += [decode_response(self.tokenizer, row, self.stops) for row in out]  # stops: found once
        return answers

    @torch.no_grad()
    def response_loglik(self, conversations: Sequence[Sequence[Mapping]], batch_size: int = 16) -> list[float]:
        """Mean log-likelihood (nats per token) of each conversation's final response under the active adapter (or
        the base), through the whole LM: for prompts longer than the cached features hold (in-context examples).
        A shared prefix is encoded once, as in `answer`."""
        scores: list[float] = []
        for i in range(0, len(conversations), batch_size):
            batch = encode_conversations(self.tokenizer, list(conversations[i : i + batch_size]), last_turn_only=True)
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            rows = [r[: int(m.sum())].tolist() for r, m in zip(ids, mask)]  # right-padded: own tokens first
            scored = labels != IGNORE_INDEX
            scored[:, 0] = False  # nothing predicts a row's first token
            first_label = int(scored.float().argmax(1)[scored.any(1)].min()) if scored.any() else labels.shape[1]
            # The position before the first scored token predicts it, so the prefix ends before that position.
            shared = min(shared_prefix_length(rows), first_label - 1)
            shared = shared if shared >= SHARED_PREFIX_MIN else 0
            with self._active():
                if shared:
                    cache = self._prefix_cache(rows[0][:shared], len(rows))
                    hidden = self.model.get_base_model().model(input_ids=ids[:, shared:], attention_mask=mask, **{self._cache_key: cache})
                else:
                    hidden = self.model.get_base_model().model(input_ids=ids, attention_mask=mask)
                # Hidden state j is position shared + j and predicts token shared + j + 1; the LM head runs only from
                # the position before the first scored token (its [batch, positions, vocab] logits bound the memory).
                start = first_label - 1 - shared
                logits = self.model.get_base_model().lm_head(hidden.last_hidden_state[:, start:-1])
            target = labels[:, first_label:]
            keep = target != IGNORE_INDEX
            logp = logits.float().log_softmax(-1).gather(-1, target.clamp_min(0)[..., None]).squeeze(-1) * keep
            scores += (logp.sum(1) / keep.sum(1).clamp_min(1)).tolist()
        return scores

    @torch.no_grad()
    def answer_many(
        self,
        states: Sequence[Mapping[str, torch.Tensor] | None],
        conversations: Sequence[Sequence[Mapping]],
        max_new_tokens: int | None = None,
        batch_size: int = 16,
    ) -> list[list[str]]:
        """`answer` for each of ``states`` (members or generated adapters; ``None``: the base alone, as
        `set_adapter`): ``answers[i][j]`` is adapter i's greedy response to conversation j.

        LoRA adapters answer together, ``len(states) * batch_size`` rows per greedy batch (`_generate`), through
        peft's mixed adapter batches (each row routed to its own adapter, the base's rows to peft's ``"__base__"``):
        the frozen base runs one large batch instead of one small batch per adapter, which is what costs on a CPU;
        the prompts' layers below the adapted slice run once per prompt, not once per adapter and prompt
        (`_shared_base_cache`). Other kinds answer one adapter at a time. The answers are `answer`'s, up to the
        rounding of a different batch size.
        """
        if not states:
            return []
        if self.config.get("kind", "lora") != "lora" or len(states) == 1:
            out = []
            for state in states:
                self.set_adapter(state)
                out.append(self.answer(conversations, max_new_tokens, batch_size))
            return out
        from d2nwg.adapters import inject_adapter

        names = [f"d2nwg_{i}" if state is not None else "__base__" for i, state in enumerate(states)]
        for name, state in zip(names, states):
            if state is None:
                continue
            if name not in self.model.peft_config:
                self.model.add_adapter(name, self.model.peft_config["default"])
            inject_adapter(self.model, peft_keys(state), adapter_name=name)
        self.model.eval()
        max_new_tokens = max_new_tokens or int(self.config["response_window"])
        prompts = encode_prompts(self.tokenizer, list(conversations))
        answers: list[list[str]] = [[] for _ in states]
        n = len(states)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            ids, mask = self._left_padded(chunk)
            rows = [name for _ in chunk for name in names]  # row j * n + a: prompt j, adapter a
            cache = self._shared_base_cache(ids, mask, rows) if ids.shape[1] > 1 else None
            out = self._generate(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), max_new_tokens, cache, adapter_names=rows)
            for a in range(n):
                answers[a] += [decode_response(self.tokenizer, row, self.stops) for row in out[a::n]]
        return answers

    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[n, width]``, left-padded: every row's next token is at the same
        column, and `_generate` derives positions from the mask (`positions`)."""
        pad, width = int(self.tokenizer.pad_token_id), max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, cache=None, adapter_names=None) -> list[list[int]]:
        """Greedy new tokens of each left-padded row ``ids``/``mask`` [n, width] (its stop token included, if it
        made one), continuing ``cache`` (the rows' first ``cache.get_seq_length()`` tokens, when given).

        What ``generate(do_sample=False)`` returns, but a row leaves the batch once it has made a stop token:
        ``generate`` runs every row until the last one stops, and in an evaluation batch a few rambling rows (the
        base zero-shot, a bad sample) run to ``max_new_tokens`` while most answers end at two thirds of it.
        """
        model = self.model
        cache = cache if cache is not None else self._new_cache()
        live = torch.arange(len(ids))  # batch row -> original row
        names = list(adapter_names) if adapter_names is not None else None
        stops = torch.tensor(self.stops)
        out: list[list[int]] = [[] for _ in range(len(ids))]
        step = ids[:, cache.get_seq_length() :]
        for _ in range(max_new_tokens):
            position = positions(mask)[:, -step.shape[1] :]
            routing = {"adapter_names": names} if names is not None else {}
            logits = model(
                input_ids=step, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1,
                **{self._cache_key: cache}, **routing,
            ).logits[:, -1]  # fmt: skip
            token = logits.argmax(-1)
            for row, t in zip(live.tolist(), token.tolist()):
                out[row].append(t)
            going = ~torch.isin(token, stops)
            if not going.any():
                break
            if not going.all():  # finished rows leave the batch, and the cache
                keep = going.nonzero().flatten()
                cache.batch_select_indices(keep)
                live, token, mask = live[keep], token[keep], mask[keep]
                names = [names[i] for i in keep.tolist()] if names is not None else None
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            step = token[:, None]
        return out


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` of one layer of a transformers ``DynamicCache``."""
    return cache.layers[layer].keys, cache.layers[layer].values


def peft_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A member's tensors under standard PEFT keys (zoo keys start with ``peft.``; PEFT keys pass through)."""
    return to_peft_state_dict(state) if any(k.startswith("peft.") for k in state) else dict(state)


def exact_match(answers: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of answers equal to their reference after stripping surrounding whitespace, in [0, 1]."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / max(len(references), 1)


def references(conversations: Sequence[Sequence[Mapping]]) -> list[str]:
    """The reference responses: the content of each conversation's final assistant message."""
    return [str(c[-1]["content"]) for c in conversations]


# ----------------------------------------------------------------------------- PEFT export
@functools.lru_cache(maxsize=1)
def _resolved(base: str) -> str:
    from d2nwg.bases import resolve_base

    return str(resolve_base(base))


def save_causal_lm_adapter(member: Mapping[str, torch.Tensor], architecture: Mapping, out: str | Path) -> Path:
    """Write a standard PEFT folder for ``member``; ``AutoPeftModelForCausalLM.from_pretrained(out)`` loads it.

    ``adapter_config.json``'s ``base_model_name_or_path`` is the base's local folder (a packaged base's cache
    folder, see `d2nwg.bases`) or its Hub id, so the folder loads base and adapter in one call;
    ``d2nwg.json`` records the architecture and how prompts were formatted.
    """
    from d2nwg.adapters import build_peft_model, save_adapter_folder

    cfg = dict(architecture["config"])
    model = build_peft_model(
        load_encoder(cfg["base"]), cfg.get("kind", "lora"), list(cfg["target_modules"]), list(cfg["layers"]),
        int(cfg["r"]), **dict(cfg.get("options") or {}),
    )
    model.peft_config["default"].base_model_name_or_path = _resolved(cfg["base"])
    out = save_adapter_folder(model, out, to_peft_state_dict(member))
    usage = {"base": cfg["base"], "prompt": "the base tokenizer's chat template, add_generation_prompt=True", "decoding": "greedy"}
    (out / "d2nwg.json").write_text(json.dumps({**usage, "architecture": dict(architecture)}, indent=2))
    return out


def architecture_spec(
    base: str, kind: str, target_modules: Sequence[str], layers: Sequence[int], r: int, max_length: int,
    response_window: int, options: Mapping | None = None, system: str | None = None, pooling: str = "final-mean",
) -> dict:
    """The JSON spec zoos and pipelines store for this architecture (``system``: the system message the zoo's tasks
    were written with, given to user records without one; ``None``: records are used as they are; ``pooling``: how
    conversations are embedded for conditioning, `POOLINGS`, written only when not ``"final-mean"``).

    Raises:
        ValueError: ``response_window`` not in ``[1, max_length)``; an unknown ``pooling``.
    """
    if not 1 <= int(response_window) < int(max_length):
        raise ValueError(f"response_window must be at least 1 and below max_length={max_length}, got {response_window}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
    config = {
        "base": canonical_base(base), "kind": kind, "target_modules": list(target_modules), "layers": [int(i) for i in layers],
        "r": int(r), "max_length": int(max_length), "response_window": int(response_window),
    }
    if options:
        config["options"] = dict(options)
    if system is not None:
        config["system"] = system
    if pooling != "final-mean":
        config["pooling"] = pooling
    return {"name": ARCHITECTURE_NAME, "config": config}


ARCHITECTURE = Architecture(ARCHITECTURE_NAME, CausalLMAdapter, export_folder=save_causal_lm_adapter)
"""The ``causal-lm-adapter`` entry; `d2nwg generate` exports a PEFT folder naming its base."""
