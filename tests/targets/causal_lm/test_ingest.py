"""Bring your own LoRAs: PEFT adapter folders + JSONL tasks -> a generative zoo; mismatches refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.llm import write_chat_llama


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, tiny_llama):
    return write_chat_llama(tmp_path_factory.mktemp("chat_llama") / "model", tiny_llama, seed=7)


def write_adapter(folder, base: str, kind: str = "lora", r: int = 2, layers=(2, 3), seed: int = 0):
    """A PEFT folder on ``base`` with random adapter tensors; returns its tensors (PEFT keys)."""
    from d2nwg.targets.adapters.frozen_base import load_base_model
    from d2nwg.targets.adapters.kinds import adapter_state_dict, build_peft_model, inject_adapter

    model = build_peft_model(load_base_model(base), kind, ["q_proj", "v_proj"], list(layers), r)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapter_state_dict(model).items()}
    inject_adapter(model, state)
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(str(folder))
    return state


def write_task(path, task: str, count: int = 10):
    from model_zoo.date_formats import conversations

    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(task, count, seed=0)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, chat_llama):
    root = tmp_path_factory.mktemp("byo")
    tasks = ["ymd-dash__dmy-slash", "ymd-dash__mdy-dot", "dmy-dot__ymd-slash", "mdy-slash__dmy-dash"]
    states, rows = {}, ["checkpoint,dataset,split"]
    (root / "data").mkdir()
    for i, task in enumerate(tasks):
        states[task] = write_adapter(root / "adapters" / f"adapter{i}", chat_llama, seed=i)
        write_task(root / "data" / f"{task}.jsonl", task)
        rows.append(f"adapter{i},{task},{'heldout' if i == 3 else 'train'}")
    (root / "map.csv").write_text("\n".join(rows) + "\n")
    return root, states


def run(argv):
    from d2nwg.commands import main

    return main(argv)


def test_adapter_folders_become_a_generative_zoo(sources, tmp_path):
    from d2nwg.targets.adapters.kinds import to_peft_state_dict
    from d2nwg.zoo.model_zoo import ModelZoo

    root, states = sources
    code = run(["zoo", "ingest", "--checkpoints", str(root / "adapters"), "--datasets", str(root / "data"),
                "--mapping", str(root / "map.csv"), "--out", str(tmp_path / "zoo")])  # fmt: skip
    assert code == 0
    zoo = ModelZoo.open(tmp_path / "zoo")
    assert zoo.architecture["name"] == "causal-lm-adapter" and zoo.input_spec.kind == "generative-text"
    assert [t for t, v in zoo.tasks.items() if v["split"] == "heldout"] == ["mdy-slash__dmy-dash"]
    for member in zoo.members():
        loaded = to_peft_state_dict(zoo.load_member(member))
        assert loaded.keys() == states[member.task].keys()
        for k, v in states[member.task].items():
            assert torch.equal(loaded[k], v)  # the adapter is stored exactly
    assert (zoo.root / "conversations" / "mdy-slash__dmy-dash.test.jsonl").is_file()


@pytest.mark.parametrize(
    "change, message",
    [({"r": 4}, "rank 4, but 'adapter0' has 2"), ({"layers": (1, 3)}, "adapted layers 1,3, but 'adapter0' has 2,3"),
     ({"kind": "miss"}, "adapter type 'miss', but 'adapter0' has 'lora'")],
)  # fmt: skip
def test_mixed_adapters_are_refused_naming_the_adapter(sources, chat_llama, tmp_path, capsys, change, message):
    import shutil

    root, _ = sources
    adapters = tmp_path / "adapters"
    shutil.copytree(root / "adapters", adapters)
    shutil.rmtree(adapters / "adapter2")
    write_adapter(adapters / "adapter2", chat_llama, **change)
    code = run(["zoo", "ingest", "--checkpoints", str(adapters), "--datasets", str(root / "data"),
                "--mapping", str(root / "map.csv"), "--out", str(tmp_path / "zoo")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "adapter 'adapter2' has " + message in err and "Traceback" not in err
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").iterdir())


def test_legacy_bone_folders_are_read_as_miss(chat_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from d2nwg.targets.causal_lm.ingest import read_adapter

    state = write_adapter(tmp_path / "bone", chat_llama, kind="miss", r=4)
    config = json.loads((tmp_path / "bone" / "adapter_config.json").read_text())
    config["peft_type"] = "BONE"
    (tmp_path / "bone" / "adapter_config.json").write_text(json.dumps(config))
    legacy = {k.replace("miss_block", "bone_block"): v for k, v in load_file(tmp_path / "bone" / "adapter_model.safetensors").items()}
    save_file(legacy, tmp_path / "bone" / "adapter_model.safetensors")
    shape, weights = read_adapter(tmp_path / "bone")
    assert shape.kind == "miss" and shape.r == 4 and shape.layers == (2, 3)
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], v) for k, v in state.items())
