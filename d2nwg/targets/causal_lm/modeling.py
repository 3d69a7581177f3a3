"""The ``causal-lm-adapter`` architecture: a LoRA/MiSS adapter on a slice of a causal LM, judged on what it generates.

A member is only the adapter tensors of a few layers (no head): the frozen LM plus the
adapter is a model that answers prompts. The zoo, the hyper-model and the evaluation feed
a module one feature vector per sample, so, as for `d2nwg.targets.text_classifier.modeling`, the frozen
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

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from d2nwg.data.instructions import IGNORE_INDEX
from d2nwg.targets.adapters.frozen_base import canonical_base, frozen_as_constants, is_causal_lm, load_base_model
from d2nwg.targets.architectures import Architecture
from d2nwg.targets.causal_lm.features import DEFAULT_BASE, POOLINGS, condition_width, positions
from d2nwg.targets.causal_lm.peft_export import save_causal_lm_adapter

ARCHITECTURE_NAME = "causal-lm-adapter"


def left_padded_causal_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
        base: a Llama-architecture causal LM: ``"smollm2-135m-instruct"`` (packaged, see `d2nwg.targets.adapters.packaged_bases`),
            a local Hugging Face folder or a Hub id.
        kind: adapter kind of `d2nwg.targets.adapters.kinds.ADAPTER_KINDS` (``"lora"``, ``"miss"``, ``"miss-bat"``).
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
    """``forward`` scores samples (a log-likelihood each) instead of classifying them (`d2nwg.targets.population`)."""
    eval_batch = 16
    """Adapters per vmapped forward in `d2nwg.targets.population` (not its default 256): each holds ``[n, W, vocab]`` logits
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
        self.system = system  # recorded for generation (`d2nwg.targets.causal_lm.generate`); the score does not use it
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
        self.pooling = pooling  # how samples are made (`conversation_features`); the score does not use it
        from d2nwg.targets.adapters.kinds import block_list, build_peft_model

        lm = load_base_model(base)
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
        bias = left_padded_causal_bias(mask, h.dtype)
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
