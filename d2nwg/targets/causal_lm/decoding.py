"""Greedy decoding through the whole causal LM with a member (or no adapter: the base) injected.

`AdapterGenerator` answers conversations with transformers + peft, encoding an in-context prefix shared by every
prompt once (`shared_prefix_length`); `exact_match` compares answers with the references."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from d2nwg.data.instructions import IGNORE_INDEX, decode_response, encode_conversations, encode_prompts, stop_token_ids
from d2nwg.targets.adapters.frozen_base import load_base_model, load_tokenizer
from d2nwg.targets.adapters.kinds import to_peft_state_dict
from d2nwg.targets.causal_lm.features import _hidden_entering, positions


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
        from d2nwg.targets.adapters.kinds import build_peft_model

        cfg = dict(architecture["config"])
        self.config = cfg
        self.tokenizer = load_tokenizer(cfg["base"])
        self.stops = stop_token_ids(self.tokenizer)
        self.model = build_peft_model(
            load_base_model(cfg["base"]), cfg.get("kind", "lora"), list(cfg["target_modules"]), list(cfg["layers"]),
            int(cfg["r"]), **dict(cfg.get("options") or {}),
        ).eval()
        # Generation does not re-run layers with an explicit mask as the slice does (`load_base_model`'s eager
        # attention): PyTorch's fused attention, as `AutoPeftModelForCausalLM` loads by default. Same greedy
        # answers on a held-out task's 16 prompts under 16 adapters, 10% faster.
        with contextlib.suppress(AttributeError, ValueError, ImportError):  # transformers without the switch
            self.model.get_base_model().set_attn_implementation("sdpa")
        self.adapter_on = True

    def set_adapter(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Use ``state`` (a member, in zoo or PEFT keys) from now on; ``None``: the base model alone."""
        from d2nwg.targets.adapters.kinds import inject_adapter

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
        from d2nwg.targets.adapters.kinds import block_list

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
        from d2nwg.targets.adapters.kinds import inject_adapter

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
