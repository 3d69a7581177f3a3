"""Malformed files: oversized or broken JSON, safetensors headers that lie, unknown PEFT types, JSONL records
with control characters. Each gives one clear error line (or is read safely), never a traceback."""

from __future__ import annotations

import json
import struct

import pytest

from tests.security.hostile import assert_one_error, copy_tree, run_cli

pytestmark = pytest.mark.timeout(120)

DEEP = "[" * 200_000 + "]" * 200_000  # deeper than the parser's recursion limit


@pytest.mark.parametrize("content", ["{not json", DEEP, "\xff\xfe"], ids=["broken", "deep", "not-utf8"])
@pytest.mark.parametrize("file", ["manifest.json", "layout.json"])
def test_broken_zoo_json_is_one_error_line(file, content, tmp_path, tiny_digits_zoo, capsys):
    zoo = copy_tree(tiny_digits_zoo.root, tmp_path / "zoo")
    (zoo / file).write_bytes(content.encode("latin-1") if content == "\xff\xfe" else content.encode())
    code, _, err = run_cli(["zoo", "info", zoo], capsys)
    assert_one_error(code, err, "manifest" if file == "manifest.json" else "layout")


@pytest.mark.parametrize("content", ["{not json", DEEP, "[1, 2]"], ids=["broken", "deep", "not-an-object"])
def test_broken_model_index_is_one_error_line(content, tmp_path, tiny_pipeline_dir, heldout_images, capsys):
    pipe = copy_tree(tiny_pipeline_dir, tmp_path / "pipe")
    (pipe / "model_index.json").write_text(content)
    code, _, err = run_cli(["generate", "--pipeline", pipe, "--dataset", heldout_images, "--out", tmp_path / "g"], capsys)
    assert_one_error(code, err, "model_index.json" if content == "[1, 2]" else "pipeline index")
    assert not (tmp_path / "g").exists()


def test_oversized_json_is_refused_before_it_is_read(tmp_path, tiny_digits_zoo, monkeypatch, capsys):
    import d2nwg.utils.io

    zoo = copy_tree(tiny_digits_zoo.root, tmp_path / "zoo")
    limit = (zoo / "manifest.json").stat().st_size - 1
    monkeypatch.setattr(d2nwg.utils.io, "MAX_JSON_BYTES", limit)
    code, _, err = run_cli(["zoo", "info", zoo], capsys)
    assert_one_error(code, err, f"over the {limit:,}-byte limit")


def test_default_json_limit_refuses_a_huge_sparse_file(tmp_path):
    """The real limit, on a sparse file (no disk used): refused from its size, never parsed."""
    from d2nwg.utils.io import MAX_JSON_BYTES, read_json

    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(ValueError, match="byte limit"):
        read_json(path, "zoo manifest")


def lying_safetensors(path, shape, offsets, data=b"\0" * 16, header_len=None):
    header = json.dumps({"fc0.weight": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header) if header_len is None else header_len) + header + data)


@pytest.mark.parametrize(
    "shape, offsets, header_len",
    [([1000, 1000], [0, 4_000_000], None), ([2, 2], [0, 16], 10**12), ([2, 2], [8, 4], None), ([-1, 2], [0, 16], None)],
    ids=["shape-beyond-file", "header-length", "offsets-reversed", "negative-shape"],
)
def test_lying_safetensors_member_is_one_error_line(shape, offsets, header_len, tmp_path, tiny_digits_zoo, capsys):
    zoo = copy_tree(tiny_digits_zoo.root, tmp_path / "zoo")
    first = json.loads((zoo / "manifest.json").read_text())["members"][0]["id"]
    lying_safetensors(zoo / "members" / f"{first}.safetensors", shape, offsets, header_len=header_len)
    out = tmp_path / "aligned"
    code, _, err = run_cli(["zoo", "align", zoo, "--out", out], capsys)
    assert_one_error(code, err, first)
    assert not out.exists()


def test_lying_safetensors_in_a_pipeline_is_one_error_line(tmp_path, tiny_pipeline_dir, heldout_images, capsys):
    pipe = copy_tree(tiny_pipeline_dir, tmp_path / "pipe")
    lying_safetensors(pipe / "vae" / "diffusion_pytorch_model.safetensors", [1000, 1000], [0, 4_000_000])
    code, _, err = run_cli(["generate", "--pipeline", pipe, "--dataset", heldout_images, "--out", tmp_path / "g"], capsys)
    assert_one_error(code, err, "cannot load pipeline")


@pytest.mark.parametrize("peft_type", ["EVIL", "PROMPT_TUNING", 7])
def test_adapter_config_naming_an_unknown_peft_type_is_one_error_line(peft_type, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    adapters, data = tmp_path / "adapters", tmp_path / "data"
    for i in range(2):
        folder = adapters / f"a{i}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "base_model_name_or_path": "x"}))
        save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    data.mkdir()
    for i in range(2):
        (data / f"t{i}.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (tmp_path / "map.csv").write_text("checkpoint,dataset\na0,t0\na1,t1\n")
    out = tmp_path / "zoo"
    argv = ["zoo", "ingest", "--checkpoints", adapters, "--datasets", data, "--mapping", tmp_path / "map.csv", "--out", out]
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, "adapter 'a0'")
    assert not out.exists()


def test_jsonl_records_with_control_characters(tmp_path):
    """Escaped control characters are data and read as such; raw ones are bad JSON, reported escaped."""
    from d2nwg.data.instructions import read_instructions
    from d2nwg.errors import one_line

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "red \x1b[31m text\x00", "response": "ok\r"}) + "\n")
    conversation = read_instructions(good)[0]
    assert conversation[0]["content"] == "red \x1b[31m text\x00" and conversation[-1]["content"] == "ok\r"
    for name, line in (("raw", '{"prompt": "a\x1b[2Jb", "response": "c"}'), ("deep", DEEP)):
        bad = tmp_path / f"{name}.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match="line 1: bad JSON") as err:
            read_instructions(bad)
        assert "\x1b" not in one_line(err.value)


def test_error_lines_escape_control_characters_from_file_names(tmp_path, capsys):
    folder = tmp_path / "zoo\x1b[2J"
    folder.mkdir()
    code, _, err = run_cli(["zoo", "info", folder], capsys)
    assert code == 2 and "\x1b" not in err and "\\x1b[2J" in err, err
