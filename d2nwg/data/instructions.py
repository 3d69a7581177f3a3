"""Instruction data: JSONL conversations, chat-templated token ids, and response-only labels.

A dataset is a JSONL file with one conversation per line, in either form:

    {"prompt": "Write 3 in words.", "response": "three"}                      # optional "system": "..."
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}                    # ends with the assistant

`read_instructions` turns both into lists of ``{"role", "content"}`` messages. `encode_conversations` applies
the tokenizer's chat template and labels only what the model should learn to write: the tokens of each
assistant turn, including the token that closes the turn (``<|im_end|>`` for SmolLM2) so a trained model
stops, and excluding the role header the template opens the turn with (``<|im_start|>assistant\\n``).
Response spans are found by rendering each conversation prefix with the generation prompt and comparing token
ids, which works for any template whose rendered prefixes are token prefixes of the full conversation.

`encode_prompts` gives what greedy decoding starts from, `decode_response` what exact match compares, and
`with_examples` builds in-context prompts (the "base with k examples" baseline and the multi-task LoRA).

Example:
    >>> convs = read_instructions("task.jsonl")                    # doctest: +SKIP
    >>> batch = encode_conversations(tokenizer, convs)             # doctest: +SKIP
    >>> loss = model(**batch).loss                                 # doctest: +SKIP  (response tokens only)
    >>> prompt = encode_prompts(tokenizer, convs[:1])[0]           # doctest: +SKIP
    >>> out = model.generate(torch.tensor([prompt]), do_sample=False, eos_token_id=stop_token_ids(tokenizer))
    >>> decode_response(tokenizer, out[0, len(prompt):]) == convs[0][-1]["content"].strip()  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
"""Label of tokens the loss skips (PyTorch's ``cross_entropy`` default ``ignore_index``)."""
PROMPT_KEYS = {"prompt": True, "response": True, "system": False}
"""Keys of a prompt/response record -> whether they are required."""

Conversation = list[dict]
"""A list of ``{"role": "system" | "user" | "assistant", "content": str}`` messages."""


# ----------------------------------------------------------------------------- reading JSONL
def _check_messages(messages, last_assistant: bool = True) -> str | None:
    """What is wrong with a list of messages (None if nothing): roles, types, order."""
    if not isinstance(messages, list):
        return f"'messages' must be a list, got {type(messages).__name__}"
    if not messages:
        return "'messages' is empty"
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"message {j} must be an object, got {type(message).__name__}"
        for key in ("role", "content"):
            if key not in message:
                return f"message {j} has no '{key}'"
        if set(message) - {"role", "content"}:
            return f"message {j} has unknown keys {sorted(set(message) - {'role', 'content'})}; expected role, content"
        if message["role"] not in ROLES:
            return f"message {j} has unknown role {message['role']!r}; expected one of {list(ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {j} content must be a string, got {type(message['content']).__name__}"
        if message["role"] == "system" and j != 0:
            return f"message {j} is a system message; only the first message may be one"
    if not any(m["role"] == "user" for m in messages):
        return "no user message"
    if last_assistant and messages[-1]["role"] != "assistant":
        return f"the last message must be from the assistant, got {messages[-1]['role']!r}"
    return None


def _parse_record(record) -> tuple[Conversation | None, str | None]:
    """A record's conversation, or what is wrong with it."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        if set(record) != {"messages"}:
            return None, f"a 'messages' record has no other keys, got {sorted(set(record) - {'messages'})}"
        problem = _check_messages(record["messages"])
        return (None, problem) if problem else ([dict(m) for m in record["messages"]], None)
    unknown = set(record) - set(PROMPT_KEYS)
    if unknown:
        return None, f"unknown keys {sorted(unknown)}; expected prompt, response (and optional system) or messages"
    for key, required in PROMPT_KEYS.items():
        if required and key not in record:
            return None, f"missing key '{key}'"
        if key in record and not isinstance(record[key], str):
            return None, f"'{key}' must be a string, got {type(record[key]).__name__}"
    conversation = [{"role": "system", "content": record["system"]}] if "system" in record else []
    conversation.append({"role": "user", "content": record["prompt"]})
    conversation.append({"role": "assistant", "content": record["response"]})
    return conversation, None


def read_instructions(path: str | Path) -> list[Conversation]:
    """Read a JSONL instruction dataset: one conversation per non-blank line.

    Args:
        path: a UTF-8 JSONL file. Each line is ``{"prompt": str, "response": str}`` (optionally ``"system": str``)
            or ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, where only the first
            message may be a system message, one is from the user, and the last is from the assistant.

    Returns:
        One conversation per record, in file order: a list of ``{"role", "content"}`` dicts ending with the
        assistant's message (a prompt record becomes ``[system?, user, assistant]``).

    Raises:
        ValueError: one line naming the file and line number and what is wrong (bad JSON or UTF-8, missing or
            unknown key, wrong type, unknown role, system message not first, no user message, last message not
            from the assistant), or that the file is missing or has no records.

    Example:
        >>> read_instructions("task.jsonl")[0]  # doctest: +SKIP
        [{'role': 'user', 'content': 'Write 3 in words.'}, {'role': 'assistant', 'content': 'three'}]
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"instruction file not found: {path}")
    conversations = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: bad JSON (nested too deeply)") from None
            conversation, problem = _parse_record(record)
            if problem:
                raise ValueError(f"{where}: {problem}")
            conversations.append(conversation)
    if not conversations:
        raise ValueError(f"{path}: no records (the file is empty)")
    return conversations


# ----------------------------------------------------------------------------- chat template
def _render(tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the chat template (the template writes any BOS itself)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # noqa: BLE001  (jinja and templates raise many types, e.g. "roles must alternate")
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"the chat template refused a conversation: {first}") from None
    # No special tokens added: the template already wrote BOS and the like; a second BOS would shift everything.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def _turn_end(span: Sequence[int], special: set[int]) -> int:
    """Length of a rendered assistant turn up to and including the special token that closes it.

    A template closes a turn with a special token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), sometimes followed
    by plain text such as a newline that only separates turns; that text is not something to learn to emit. A
    template without a closing special token keeps its whole span.
    """
    for k in range(len(span) - 1, -1, -1):
        if span[k] in special:
            return k + 1
    return len(span)


def _is_prefix(prefix: Sequence[int], ids: Sequence[int]) -> bool:
    return len(prefix) <= len(ids) and list(ids[: len(prefix)]) == list(prefix)


def _assistant_spans(tokenizer, conversation: Conversation, index: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the ``[start, end)`` spans of its assistant turns."""
    ids = _render(tokenizer, conversation, add_generation_prompt=False)
    special = _special_ids(tokenizer)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, conversation[:i], add_generation_prompt=True)
        last = i == len(conversation) - 1
        turn = ids if last else _render(tokenizer, conversation[: i + 1], add_generation_prompt=False)
        if not (_is_prefix(prompt, turn) and _is_prefix(turn, ids) and len(turn) > len(prompt)):
            raise ValueError(
                f"conversation {index}: the chat template does not render message {i}'s prefix as a token prefix of "
                "the conversation (it rewrites earlier turns or merges tokens across turns), so its response tokens "
                "cannot be found; use single-turn records or a template whose prefixes are stable"
            )
        start = len(prompt)
        spans.append((start, start + _turn_end(turn[start:], special)))
    return ids, spans


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return int(pad)


def _check_conversations(conversations: Sequence[Conversation], last_assistant: bool) -> None:
    if isinstance(conversations, Mapping) or not isinstance(conversations, Sequence) or not conversations:
        raise ValueError("expected a non-empty list of conversations (lists of {'role', 'content'} messages)")
    for index, conversation in enumerate(conversations):
        problem = _check_messages(conversation if isinstance(conversation, list) else list(conversation),
                                  last_assistant=last_assistant)  # fmt: skip
        if problem:
            raise ValueError(f"conversation {index}: {problem}")


def encode_conversations(
    tokenizer, conversations: Sequence[Conversation], max_length: int | None = None, last_turn_only: bool = False
) -> dict[str, torch.Tensor]:
    """Chat-templated token ids of whole conversations, with labels on the assistant's tokens only.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        conversations: n conversations, each a list of ``{"role", "content"}`` messages ending with the assistant
            (e.g. from `read_instructions` or `with_examples`).
        max_length: pad every row to this many tokens; default: to the longest conversation.
        last_turn_only: label only the final assistant turn (e.g. for the log-likelihood of the reference
            response when earlier assistant turns are in-context examples); default: every assistant turn.

    Returns:
        ``{"input_ids": [n, T] long, "attention_mask": [n, T] long, "labels": [n, T] long}``, right-padded with
        the pad token (eos if there is none). ``labels`` equals ``input_ids`` on the tokens of assistant turns,
        including the token that closes each turn (e.g. ``<|im_end|>``) but not the role header before it, and
        is -100 elsewhere (prompt, template text, padding). T is ``max_length`` or the longest conversation.
        Pass the dict to a causal LM (``model(**batch).loss``), which shifts the labels itself.

    Raises:
        ValueError: (one line) an empty list, a malformed conversation (its index and what is wrong), a tokenizer
            without a chat template or a pad/eos token, a conversation longer than ``max_length`` (its index and
            length), or a template whose rendered prefixes are not token prefixes of the conversation.
    """
    _check_conversations(conversations, last_assistant=True)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    rows = []
    for index, conversation in enumerate(conversations):
        ids, spans = _assistant_spans(tokenizer, list(conversation), index)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"conversation {index} has {len(ids)} tokens, more than max_length={max_length}")
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans[-1:] if last_turn_only else spans:
            labels[start:end] = ids[start:end]
        rows.append((ids, labels))
    width = max_length if max_length is not None else max(len(ids) for ids, _ in rows)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (n, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (n, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (n, T)
    for r, (ids, row_labels) in enumerate(rows):
        # Right padding: real tokens keep positions 0..len-1, and causal attention never sees padding before them.
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, : len(ids)] = 1
        labels[r, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_prompts(tokenizer, conversations: Sequence[Conversation]) -> list[list[int]]:
    """What greedy decoding starts from: each conversation without its final assistant message, plus the
    template's generation prompt (e.g. ``<|im_start|>assistant\\n``).

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        conversations: conversations from `read_instructions` / `with_examples`; one that does not end with an
            assistant message (a prompt without a reference) is encoded whole.

    Returns:
        One list of token ids per conversation (unpadded; lengths differ).

    Raises:
        ValueError: (one line) a malformed conversation (its index and what is wrong), or no chat template.
    """
    _check_conversations(conversations, last_assistant=False)
    prompts = []
    for conversation in conversations:
        messages = list(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        prompts.append(_render(tokenizer, messages, add_generation_prompt=True))
    return prompts


def with_examples(conversation: Conversation, examples: Sequence[Conversation], k: int) -> Conversation:
    """``conversation`` with the first ``k`` of ``examples`` prepended as earlier user/assistant turns.

    The examples go after the conversation's system message (if any) and before its own turns; the examples'
    own system messages are dropped. The caller chooses the examples (e.g. other records of the same task's
    support set, never the conversation itself).

    Args:
        conversation: a list of ``{"role", "content"}`` messages.
        examples: conversations to take in-context turns from, in order.
        k: how many examples to use (0 returns a copy of ``conversation``).

    Returns:
        A new list of new message dicts: ``[system?, ex1 user, ex1 assistant, ..., exk ..., *conversation turns]``.

    Raises:
        ValueError: ``k`` is negative or larger than ``len(examples)``, or a message is malformed.

    Example:
        >>> ex = [[{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"}]]
        >>> [m["content"] for m in with_examples([{"role": "user", "content": "2"}], ex, k=1)]
        ['1', 'one', '2']
    """
    if not 0 <= k <= len(examples):
        raise ValueError(f"k must be between 0 and the {len(examples)} examples given, got {k}")
    named = [("the conversation", conversation)] + [(f"example {i}", e) for i, e in enumerate(examples[:k])]
    for name, messages in named:
        problem = _check_messages(list(messages), last_assistant=False)
        if problem:
            raise ValueError(f"{name}: {problem}")
    head = [dict(conversation[0])] if conversation[0]["role"] == "system" else []
    shots = [dict(m) for example in examples[:k] for m in example if m["role"] != "system"]
    return head + shots + [dict(m) for m in conversation[len(head) :]]


# ----------------------------------------------------------------------------- decoding
def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a generated response: eos, and the special token that closes an assistant turn.

    For SmolLM2 both are ``<|im_end|>``; for Llama-3-Instruct they are ``<|end_of_text|>`` and ``<|eot_id|>``.
    Pass them to ``model.generate(..., eos_token_id=stop_token_ids(tokenizer))``.
    """
    stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if getattr(tokenizer, "chat_template", None) is not None:
        probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
        try:
            ids, [(start, end)] = _assistant_spans(tokenizer, probe, 0)
        except ValueError:  # a template that refuses the probe: eos alone
            ids, start, end = [], 0, 0
        if end > start and ids[end - 1] in _special_ids(tokenizer) and int(ids[end - 1]) not in stops:
            stops.append(int(ids[end - 1]))
    return stops


def decode_response(tokenizer, ids: Sequence[int] | torch.Tensor, stops: Sequence[int] | None = None) -> str:
    """The text of a generated response: the new tokens up to the first eos / end-of-turn token, stripped.

    Args:
        tokenizer: the tokenizer the ids come from.
        ids: the generated tokens only (without the prompt), a list or a 1-D tensor.
        stops: `stop_token_ids` of ``tokenizer``, when the caller has them (default: found again, ~1 ms).

    Returns:
        The decoded text without special tokens, stripped of surrounding whitespace: what exact match compares
        with the stripped reference response.
    """
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    stops = set(stop_token_ids(tokenizer) if stops is None else stops)
    end = next((k for k, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
