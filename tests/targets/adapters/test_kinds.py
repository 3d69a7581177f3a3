"""Adapter targets on a tiny Llama: LoRA and MiSS round-trips, PEFT folders, legacy Bone keys, SNR slices."""

from __future__ import annotations

import pytest
import torch

from d2nwg.targets.adapters.kinds import (
    adapter_state_dict,
    build_peft_model,
    inject_adapter,
    layer_snr,
    parse_layers,
    save_adapter_folder,
    weight_snr,
)
from d2nwg.targets.adapters.legacy_bone import convert_legacy_bone
from d2nwg.zoo.layout import WeightLayout

pytest.importorskip("peft")
pytest.importorskip("transformers")


def randomize(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Non-zero adapter weights (fresh LoRA B and MiSS blocks are zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in sd.items()}


TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))

# kind, options, expected shapes of one q_proj (in 32, out 32) and one v_proj (in 32, out 16), r = 4
KINDS = [
    ("lora", {}, {"q_proj.lora_A.weight": (4, 32), "q_proj.lora_B.weight": (32, 4), "v_proj.lora_B.weight": (16, 4)}),
    ("miss", {}, {"q_proj.miss_block": (4, 32), "v_proj.miss_block": (4, 16)}),
    ("miss-bat", {}, {"q_proj.miss_block": (8, 4, 4), "v_proj.miss_block": (4, 4, 4)}),
]


@pytest.mark.parametrize("kind,options,shapes", KINDS, ids=[k[0] for k in KINDS])
def test_round_trip_through_layout_and_peft_folder(tmp_path, kind, options, shapes, tiny_llama):
    model = build_peft_model(tiny_llama(), kind, ["q_proj", "v_proj"], layers="1,3", r=4, **options)
    sd = adapter_state_dict(model)
    assert {k.split(".")[4] for k in sd} == {"1", "3"}  # base_model.model.model.layers.<i>. ...
    for suffix, shape in shapes.items():
        hits = [v for k, v in sd.items() if k.endswith(suffix)]
        assert len(hits) == 2 and all(tuple(v.shape) == shape for v in hits), suffix

    # The layout tokenizes adapter state_dicts and gives them back bit-exactly.
    weights = randomize(sd, seed=2)
    layout = WeightLayout.from_state_dict(weights, chunk_size=16)
    restored = layout.detokenize(layout.tokenize(weights, dtype=torch.float64))[0]
    assert all(torch.equal(restored[k], weights[k]) for k in weights)

    # inject -> save -> PeftModel.from_pretrained on a fresh base gives the same logits.
    from peft import PeftModel

    inject_adapter(model, restored)
    with torch.no_grad():
        expected = model(TOKENS).logits
        plain = tiny_llama()(TOKENS).logits
    assert not torch.allclose(expected, plain)  # the adapter changes the model
    folder = save_adapter_folder(model, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(TOKENS).logits, expected, atol=1e-6)
    assert all(torch.equal(v, weights[k]) for k, v in adapter_state_dict(loaded).items())


def test_inject_names_missing_and_unexpected_keys(tiny_llama):
    model = build_peft_model(tiny_llama(), "lora", ["q_proj"], layers="0", r=2)
    sd = adapter_state_dict(model)
    dropped = sorted(sd)[0]
    with pytest.raises(ValueError, match="missing .*" + dropped.replace(".", r"\.")):
        inject_adapter(model, {k: v for k, v in sd.items() if k != dropped})
    with pytest.raises(ValueError, match="unexpected .*extra.lora_A.weight"):
        inject_adapter(model, {**sd, "extra.lora_A.weight": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="has shape"):
        inject_adapter(model, {**sd, dropped: torch.zeros(3, 3)})


def test_legacy_bone_keys_load_as_miss(tmp_path, tiny_llama):
    model = build_peft_model(tiny_llama(), "miss", ["q_proj", "v_proj"], layers="2", r=4)
    weights = randomize(adapter_state_dict(model), seed=3)
    legacy = {k.replace("miss_block", "bone_block"): v for k, v in weights.items()}
    converted = convert_legacy_bone(legacy)
    assert converted.keys() == weights.keys()
    inject_adapter(model, converted)
    assert all(torch.equal(v, weights[k]) for k, v in adapter_state_dict(model).items())
    with pytest.raises(ValueError, match="already holds"):
        convert_legacy_bone({**legacy, **weights})


def test_layer_specs(tiny_llama):
    base = tiny_llama()
    assert parse_layers(base, "all", ["q_proj"]) == [0, 1, 2, 3]
    assert parse_layers(base, [3, 1], ["q_proj"]) == [1, 3]
    for bad in ("7", "1,1", "auto:top0x", ""):
        with pytest.raises(ValueError):
            parse_layers(base, bad, ["q_proj"])
    with pytest.raises(ValueError, match="no nn.Linear named"):
        parse_layers(base, "all", ["nope"])


def test_auto_layers_count_and_determinism(tiny_llama):
    base = tiny_llama(layers=4)
    for spec, count in [("auto:top25%", 1), ("auto:top50%", 2), ("auto:3", 3)]:
        picked = parse_layers(base, spec, ["q_proj", "v_proj"])
        assert len(picked) == count and picked == parse_layers(base, spec, ["q_proj", "v_proj"])
    # The SNR-ranked slice is the set of the highest-scoring layers.
    scores = layer_snr(base, ["q_proj", "v_proj"])
    top2 = parse_layers(base, "auto:2", ["q_proj", "v_proj"])
    assert min(scores[i] for i in top2) >= max(scores[i] for i in set(scores) - set(top2))


def test_snr_ranks_low_rank_plus_noise_above_noise(tiny_llama):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(128, 64, generator=g)
    low_rank = torch.randn(128, 4, generator=g) @ torch.randn(4, 64, generator=g)
    assert weight_snr(noise) < 0.05
    assert weight_snr(low_rank + noise) > weight_snr(0.3 * low_rank + noise) > weight_snr(noise)
    # Scale-free: the noise level is estimated from the spectrum itself.
    assert weight_snr(10 * (low_rank + noise)) == pytest.approx(weight_snr(low_rank + noise))

    base = tiny_llama(layers=4)
    with torch.no_grad():  # give layer 2 learned-looking (low-rank) structure
        for name in ("q_proj", "v_proj"):
            w = getattr(base.model.layers[2].self_attn, name).weight
            w += 0.2 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    assert parse_layers(base, "auto:1", ["q_proj", "v_proj"]) == [2]


# ----------------------------------------------------------------------------- d2nwg adapters convert-bone
def _legacy_bone_folder(miss_folder, out):
    """What peft < 0.19 wrote for the same adapter: peft_type BONE, ``bone_block`` keys, no MiSS-only config keys."""
    import json

    from d2nwg.utils.io import load_safetensors, save_safetensors

    out.mkdir()
    config = json.loads((miss_folder / "adapter_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("miss_dropout", "mini_r")} | {"peft_type": "BONE", "peft_version": "0.17.1"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    weights = load_safetensors(miss_folder / "adapter_model.safetensors")
    save_safetensors(out / "adapter_model.safetensors", {k.replace("miss_block", "bone_block"): v for k, v in weights.items()})
    (out / "README.md").write_text("a legacy Bone adapter\n")
    return out


@pytest.mark.parametrize("kind", ["miss", "miss-bat"])
def test_convert_bone_folder_gives_the_miss_folders_logits(kind, tmp_path, tiny_llama, capsys):
    import json

    from peft import PeftModel

    from d2nwg.commands import main

    model = build_peft_model(tiny_llama(), kind, ["q_proj", "v_proj"], layers="1,3", r=4)
    miss = save_adapter_folder(model, tmp_path / "miss", randomize(adapter_state_dict(model), seed=4))
    bone = _legacy_bone_folder(miss, tmp_path / "bone")
    out = tmp_path / "converted"
    assert main(["adapters", "convert-bone", str(bone), str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and str(out) in captured.out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and (out / "README.md").is_file()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), miss).eval()(TOKENS).logits
        converted = PeftModel.from_pretrained(tiny_llama(), out).eval()(TOKENS).logits
        plain = tiny_llama()(TOKENS).logits
    assert torch.equal(converted, expected)
    assert not torch.allclose(converted, plain)  # the adapter was loaded, not dropped


def _lora_folder(tmp_path, tiny_llama):
    model = build_peft_model(tiny_llama(), "lora", ["q_proj"], layers="0", r=2)
    return save_adapter_folder(model, tmp_path / "lora")


BAD_CONVERSIONS = {
    "missing-folder": (lambda tmp, llama: (tmp / "nope", tmp / "out"), "adapter folder not found"),
    "lora-folder": (lambda tmp, llama: (_lora_folder(tmp, llama), tmp / "out"), "holds a LORA adapter, not a legacy Bone one"),
    "no-config": (lambda tmp, llama: ((tmp / "empty").mkdir() or tmp / "empty", tmp / "out"), "has no adapter_config.json"),
}


@pytest.mark.parametrize("case", list(BAD_CONVERSIONS))
def test_convert_bone_bad_input_is_one_error_line(case, tmp_path, tiny_llama, capsys):
    from d2nwg.commands import main

    make, expected = BAD_CONVERSIONS[case]
    src, out = make(tmp_path, tiny_llama)
    capsys.readouterr()
    assert main(["adapters", "convert-bone", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expected in err and "\n" not in err, err
    assert not out.exists()


def test_convert_bone_refuses_a_non_empty_output(tmp_path, tiny_llama, capsys):
    from d2nwg.commands import main

    model = build_peft_model(tiny_llama(), "miss", ["q_proj"], layers="0", r=4)
    bone = _legacy_bone_folder(save_adapter_folder(model, tmp_path / "miss"), tmp_path / "bone")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["adapters", "convert-bone", str(bone), str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
