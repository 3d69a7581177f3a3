"""What a causal-LM zoo stores per sample: the conversation as it enters the adapted slice.

One sample is ``[ pooled (C) | hidden states entering layer `first` (T * H) | attention mask (T) | labels (T) ]``
(the layout, the poolings and why conversations are left-padded: `d2nwg.targets.causal_lm.modeling`).
`conversation_features` computes it by running the frozen layers below the slice once per conversation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from d2nwg.data.instructions import IGNORE_INDEX, encode_conversations
from d2nwg.targets.adapters.frozen_base import load_base_model, load_tokenizer, mean_pool

DEFAULT_BASE = "smollm2-135m-instruct"
GRADIENT_POOLING = "prompt-response-gradient"
POOLINGS = ("final-mean", "prompt-response", GRADIENT_POOLING)
"""How a conversation's ``pooled`` embedding is made (module docstring); architectures without one: ``"final-mean"``."""
NEW_ZOO_POOLING = "prompt-response"
"""The pooling of zoos without a warm start (`zoo ingest`); the recipes, which train one, use `GRADIENT_POOLING`."""


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
        conversations: chat conversations ending with the assistant's response (`d2nwg.data.instructions`).
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
    encoder = encoder if encoder is not None else load_base_model(base)
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
    from d2nwg.targets.adapters.kinds import block_list

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
