"""Instruction data: JSONL parsing and its one-line errors, chat templating, response-only labels, decoding."""

from __future__ import annotations

import json

import pytest
import torch
from tests.fixtures.llm import (
    LLAMA3_LIKE_TEMPLATE,
    PLAIN_TEXT_TEMPLATE,
    SMOLLM2_CHAT_TEMPLATE,
    UNSTABLE_TEMPLATE,
    smollm2_gguf_tokenizer,
    tiny_chat_tokenizer,
)

from d2nwg.data.instructions import (
    IGNORE_INDEX,
    decode_response,
    encode_conversations,
    encode_prompts,
    read_instructions,
    stop_token_ids,
    with_examples,
)

USER, BOT, SYSTEM = "user", "assistant", "system"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- reading
def test_read_both_record_forms_and_skip_blank_lines(tmp_path):
    path = write_lines(tmp_path / "task.jsonl", [
        json.dumps({"prompt": "Write 3 in words.", "response": "three"}),
        "",
        "   ",
        json.dumps({"prompt": "p", "response": "r", "system": "Be brief."}),
        json.dumps({"messages": [msg(USER, "hi"), msg(BOT, "hello"), msg(USER, "bye"), msg(BOT, "ciao")]}),
    ])  # fmt: skip
    assert read_instructions(path) == [
        [msg(USER, "Write 3 in words."), msg(BOT, "three")],
        [msg(SYSTEM, "Be brief."), msg(USER, "p"), msg(BOT, "r")],
        [msg(USER, "hi"), msg(BOT, "hello"), msg(USER, "bye"), msg(BOT, "ciao")],
    ]


GOOD = json.dumps({"prompt": "p", "response": "r"})
BAD_RECORDS = [
    ("{not json", "bad JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"prompt": "p"}), "missing key 'response'"),
    (json.dumps({"response": "r"}), "missing key 'prompt'"),
    (json.dumps({"prompt": "p", "response": 3}), "'response' must be a string, got int"),
    (json.dumps({"prompt": "p", "response": "r", "system": None}), "'system' must be a string"),
    (json.dumps({"prompt": "p", "respone": "r"}), "unknown keys ['respone']"),
    (json.dumps({"messages": "hi"}), "'messages' must be a list"),
    (json.dumps({"messages": []}), "'messages' is empty"),
    (json.dumps({"messages": [msg(USER, "q"), msg(BOT, "a")], "prompt": "p"}), "no other keys"),
    (json.dumps({"messages": [msg("bot", "q"), msg(BOT, "a")]}), "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": USER}, msg(BOT, "a")]}), "message 0 has no 'content'"),
    (json.dumps({"messages": [msg(USER, ["q"]), msg(BOT, "a")]}), "content must be a string, got list"),
    (json.dumps({"messages": [msg(USER, "q"), msg(BOT, "a"), msg(USER, "q2")]}), "last message must be from the assistant"),
    (json.dumps({"messages": [msg(USER, "q"), msg(SYSTEM, "s"), msg(BOT, "a")]}), "only the first message"),
    (json.dumps({"messages": [msg(SYSTEM, "s"), msg(BOT, "a")]}), "no user message"),
    (json.dumps({"messages": [{"role": USER, "content": "q", "name": "x"}, msg(BOT, "a")]}), "unknown keys ['name']"),
]  # fmt: skip


@pytest.mark.parametrize("line, problem", BAD_RECORDS, ids=[p for _, p in BAD_RECORDS])
def test_bad_record_names_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "task.jsonl", [GOOD, "", line, GOOD])  # the bad record is on line 3
    with pytest.raises(ValueError) as info:
        read_instructions(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"{path} line 3:" in message and problem in message


def test_non_utf8_line_names_the_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(ValueError, match=r"line 2: not UTF-8"):
        read_instructions(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "task.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"task.jsonl: no records"):
        read_instructions(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="instruction file not found"):
        read_instructions(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- labels
def labelled_text(tokenizer, batch, row: int) -> list[str]:
    """The decoded runs of consecutive labelled tokens in one row."""
    labels, runs, current = batch["labels"][row].tolist(), [], []
    for token in labels + [IGNORE_INDEX]:
        if token == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return runs


TEMPLATES = {
    # template -> how an assistant turn "x" is labelled (its text plus the closing token, no header)
    "smollm2": (SMOLLM2_CHAT_TEMPLATE, "<|im_end|>", "{}<|im_end|>"),
    "llama3-like": (LLAMA3_LIKE_TEMPLATE, "<|eot_id|>", "{}<|eot_id|>"),
    "plain-text": (PLAIN_TEXT_TEMPLATE, "<|im_end|>", "{}\n\n"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_labels_cover_assistant_turns_and_their_end_token(name):
    template, eos, labelled = TEMPLATES[name]
    tok = tiny_chat_tokenizer(template, eos_token=eos)
    convs = [
        [msg(USER, "Write 3 in words."), msg(BOT, "three")],
        [msg(SYSTEM, "Be brief."), msg(USER, "hi"), msg(BOT, " hello there "), msg(USER, "bye"), msg(BOT, "ciao")],
    ]
    batch = encode_conversations(tok, convs)
    n, t = batch["input_ids"].shape
    assert n == 2 and batch["labels"].shape == batch["attention_mask"].shape == (n, t)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert labelled_text(tok, batch, 0) == [labelled.format("three")]
    assert labelled_text(tok, batch, 1) == [labelled.format(" hello there "), labelled.format("ciao")]
    # Labels equal the inputs wherever they are set; the full text is the template's rendering.
    mask = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    length = int(batch["attention_mask"][1].sum())
    assert tok.decode(batch["input_ids"][1, :length].tolist()) == tok.apply_chat_template(convs[1], tokenize=False)


def test_last_turn_only():
    tok = tiny_chat_tokenizer()
    conv = [msg(USER, "1"), msg(BOT, "one"), msg(USER, "2"), msg(BOT, "two")]
    batch = encode_conversations(tok, [conv], last_turn_only=True)
    assert labelled_text(tok, batch, 0) == ["two<|im_end|>"]


def test_right_padding_with_eos_then_pad_token():
    convs = [[msg(USER, "a"), msg(BOT, "b")], [msg(USER, "a longer question"), msg(BOT, "and a longer answer")]]
    cases = [(tiny_chat_tokenizer(), "<|im_end|>"), (tiny_chat_tokenizer(pad_token="<|eot_id|>"), "<|eot_id|>")]
    for tok, pad_token in cases:
        batch = encode_conversations(tok, convs)
        short = int(batch["attention_mask"][0].sum())
        assert short < batch["input_ids"].shape[1] == int(batch["attention_mask"][1].sum())
        assert batch["attention_mask"][0, :short].all() and not batch["attention_mask"][0, short:].any()
        assert (batch["input_ids"][0, short:] == tok.convert_tokens_to_ids(pad_token)).all()
        assert (batch["labels"][0, short:] == IGNORE_INDEX).all()


def test_max_length_pads_and_refuses_longer():
    tok = tiny_chat_tokenizer()
    convs = [[msg(USER, "a"), msg(BOT, "b")], [msg(USER, "x" * 50), msg(BOT, "y")]]
    longest = int(encode_conversations(tok, convs)["attention_mask"].sum(1).max())
    assert encode_conversations(tok, convs, max_length=longest + 5)["input_ids"].shape == (2, longest + 5)
    with pytest.raises(ValueError, match=rf"^conversation 1 has {longest} tokens, more than max_length={longest - 1}$"):
        encode_conversations(tok, convs, max_length=longest - 1)


def test_template_without_prefix_property_is_refused():
    tok = tiny_chat_tokenizer(UNSTABLE_TEMPLATE)
    with pytest.raises(ValueError, match="conversation 0: the chat template does not render"):
        encode_conversations(tok, [[msg(USER, "q"), msg(BOT, "a")]])


@pytest.mark.parametrize("convs, problem", [
    ([], "non-empty list"),
    ([[msg(USER, "q")]], "conversation 0: the last message must be from the assistant"),
    ([[msg(USER, "q"), msg(BOT, "a")], [msg("robot", "q"), msg(BOT, "a")]], "conversation 1: message 0 has unknown"),
])  # fmt: skip
def test_malformed_conversations(convs, problem):
    with pytest.raises(ValueError, match=problem):
        encode_conversations(tiny_chat_tokenizer(), convs)


def test_no_chat_template():
    tok = tiny_chat_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        encode_prompts(tok, [[msg(USER, "q")]])


# ----------------------------------------------------------------------------- prompts, examples, decoding
def test_prompts_end_with_generation_prompt_and_prefix_the_conversation():
    tok = tiny_chat_tokenizer()
    conv = [msg(USER, "q"), msg(BOT, "a")]
    [prompt], [open_prompt] = encode_prompts(tok, [conv]), encode_prompts(tok, [conv[:1]])
    assert prompt == open_prompt  # a conversation without a reference is encoded whole
    assert tok.decode(prompt).endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    batch = encode_conversations(tok, [conv])
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    assert (batch["labels"][0, : len(prompt)] == IGNORE_INDEX).all() and batch["labels"][0, len(prompt)] != IGNORE_INDEX


def test_with_examples_goes_after_the_system_message():
    examples = [[msg(SYSTEM, "dropped"), msg(USER, f"{i}"), msg(BOT, f"ans {i}")] for i in range(5)]
    conv = [msg(SYSTEM, "sys"), msg(USER, "q"), msg(BOT, "a")]
    out = with_examples(conv, examples, k=2)
    assert out == [msg(SYSTEM, "sys"), msg(USER, "0"), msg(BOT, "ans 0"), msg(USER, "1"), msg(BOT, "ans 1"),
                   msg(USER, "q"), msg(BOT, "a")]  # fmt: skip
    out[0]["content"] = "changed"
    assert conv[0]["content"] == "sys"  # new dicts
    assert with_examples(conv[1:], examples, k=1)[:2] == [msg(USER, "0"), msg(BOT, "ans 0")]
    assert with_examples(conv, examples, k=0) == conv
    with pytest.raises(ValueError, match="k must be between 0 and the 5 examples"):
        with_examples(conv, examples, k=6)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_decode_response_stops_at_end_of_turn(name):
    template, eos, _ = TEMPLATES[name]
    tok = tiny_chat_tokenizer(template, eos_token=eos)
    ids = tok("  Paris. ", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids(eos if name != "smollm2" else "<|im_end|>")
    tail = tok("\nmore text", add_special_tokens=False)["input_ids"]
    assert decode_response(tok, ids + [end] + tail) == "Paris."
    assert decode_response(tok, torch.tensor(ids)) == "Paris."  # no stop token: everything


def test_stop_tokens_include_the_turn_closer():
    tok = tiny_chat_tokenizer(LLAMA3_LIKE_TEMPLATE, eos_token="<|im_end|>")
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|eot_id|>")]
    tok = tiny_chat_tokenizer()
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_smollm2_tokenizer_labels_and_prompts():
    """The real template and BPE (merges across text) on the packaged SmolLM2 tokenizer."""
    tok = smollm2_gguf_tokenizer()
    convs = [
        [msg(USER, "What is the capital of France?"), msg(BOT, "The capital of France is Paris.")],
        with_examples([msg(USER, "2024-03-01 as DD/MM/YYYY"), msg(BOT, "01/03/2024")],
                      [[msg(USER, "1999-12-31 as DD/MM/YYYY"), msg(BOT, "31/12/1999")]], k=1),
    ]  # fmt: skip
    batch = encode_conversations(tok, convs)
    assert labelled_text(tok, batch, 0) == ["The capital of France is Paris.<|im_end|>"]
    assert labelled_text(tok, batch, 1) == ["31/12/1999<|im_end|>", "01/03/2024<|im_end|>"]
    prompt = encode_prompts(tok, convs[:1])[0]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert len(prompt) < int(batch["attention_mask"][0].sum())
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    reply = tok("The capital of France is Paris.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert decode_response(tok, reply) == "The capital of France is Paris."
