"""`D2NWGPipeline` built directly from tiny untrained networks: sampling, determinism, guidance, save/load, errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline, pad_class_sets

STEPS = 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def dataset(tiny_digits_zoo):
    """Per-class support samples of a held-out task, in the task's label order."""
    task = tiny_digits_zoo.members("heldout")[0].task
    return tiny_digits_zoo.class_samples(task, "support")


@pytest.fixture(scope="module")
def reference(tiny_pipeline, dataset):
    """Three weight sets from seed 0 (guidance off)."""
    return tiny_pipeline(dataset, num_samples=3, num_inference_steps=STEPS, generator=gen(0))


def assert_same_weights(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for wa, wb in zip(a, b):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


def differs(a: list[dict], b: list[dict]) -> bool:
    return any(not torch.equal(wa[k], wb[k]) for wa, wb in zip(a, b) for k in wa)


def test_outputs_follow_the_layout(tiny_pipeline, tiny_digits_zoo, dataset, reference):
    layout = tiny_digits_zoo.layout
    assert len(reference.weights) == 3
    assert reference.tokens.shape == (3, layout.num_tokens, layout.chunk_size)
    for weights in reference.weights:
        assert list(weights) == layout.names
        for spec in layout.tensors:
            assert tuple(weights[spec.name].shape) == spec.shape
            assert torch.isfinite(weights[spec.name]).all()
    # samples differ from each other
    assert not torch.equal(reference.tokens[0], reference.tokens[1])
    # the tuple form returns the same thing
    weights, tokens = tiny_pipeline(dataset, num_samples=3, num_inference_steps=STEPS, generator=gen(0), return_dict=False)
    assert torch.equal(tokens, reference.tokens)
    assert_same_weights(weights, reference.weights)


def test_same_seed_is_bit_identical(tiny_pipeline, dataset, reference):
    again = tiny_pipeline(dataset, num_samples=3, num_inference_steps=STEPS, generator=gen(0))
    assert torch.equal(again.tokens, reference.tokens)
    assert_same_weights(again.weights, reference.weights)


def test_different_seed_differs(tiny_pipeline, dataset, reference):
    other = tiny_pipeline(dataset, num_samples=3, num_inference_steps=STEPS, generator=gen(1))
    assert differs(other.weights, reference.weights)


def test_dataset_conditions_the_output(tiny_pipeline, tiny_digits_zoo, reference):
    task = tiny_digits_zoo.members("heldout")[1].task
    other = tiny_pipeline(tiny_digits_zoo.class_samples(task, "support"), num_samples=3, num_inference_steps=STEPS, generator=gen(0))
    assert not torch.equal(other.tokens, reference.tokens)


def test_guidance_runs_and_changes_output(tiny_pipeline, dataset, reference):
    guided = tiny_pipeline(dataset, num_samples=3, num_inference_steps=STEPS, guidance_scale=3.0, generator=gen(0))
    assert guided.tokens.shape == reference.tokens.shape
    assert torch.isfinite(guided.tokens).all()
    assert not torch.equal(guided.tokens, reference.tokens)
    # guidance is deterministic too
    again = tiny_pipeline(dataset, num_samples=3, num_inference_steps=STEPS, guidance_scale=3.0, generator=gen(0))
    assert torch.equal(again.tokens, guided.tokens)


def test_save_and_load_is_bit_identical(tiny_pipeline_dir, tiny_pipeline, dataset, reference):
    loaded = D2NWGPipeline.from_pretrained(tiny_pipeline_dir)
    assert isinstance(loaded, D2NWGPipeline)
    assert loaded.num_classes == tiny_pipeline.num_classes
    assert loaded.config.target == tiny_pipeline.config.target
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.scheduler.config.clip_sample is False
    out = loaded(dataset, num_samples=3, num_inference_steps=STEPS, generator=gen(0))
    assert torch.equal(out.tokens, reference.tokens)
    assert_same_weights(out.weights, reference.weights)


def test_wrong_class_count_raises(tiny_pipeline, dataset):
    with pytest.raises(ValueError, match="4 classes"):
        tiny_pipeline(dataset[:4], num_samples=1, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="6 classes"):
        tiny_pipeline([*dataset, dataset[0]], num_samples=1, num_inference_steps=STEPS)


def test_wrong_feature_dim_raises(tiny_pipeline, dataset):
    with pytest.raises(ValueError, match="features"):
        tiny_pipeline([x[:, :10] for x in dataset], num_samples=1, num_inference_steps=STEPS)


def test_empty_class_raises(tiny_pipeline, dataset):
    with pytest.raises(ValueError, match="class 2"):
        tiny_pipeline([*dataset[:2], dataset[2][:0], *dataset[3:]], num_samples=1, num_inference_steps=STEPS)


def test_uneven_class_sizes_are_padded_and_masked():
    x, mask = pad_class_sets([torch.ones(2, 3), torch.ones(4, 3)])
    assert x.shape == (1, 2, 4, 3)
    assert mask.tolist() == [[[True, True, False, False], [True, True, True, True]]]
    assert x[0, 0, 2:].abs().sum() == 0


def test_uneven_classes_only_use_real_samples(tiny_pipeline, dataset):
    """Dropping samples from one class changes its conditioning; the pipeline still samples."""
    fewer = [dataset[0][:3], *dataset[1:]]
    tokens_full, _ = tiny_pipeline.encode_dataset(dataset)
    tokens_fewer, _ = tiny_pipeline.encode_dataset(fewer)
    assert tokens_full.shape == tokens_fewer.shape
    assert not torch.equal(tokens_full, tokens_fewer)
    # the pipeline passes the padding mask: garbage in the padded slots changes nothing
    x, mask = pad_class_sets(fewer)
    x[~mask] = 1e3
    with torch.no_grad():
        direct, _ = tiny_pipeline.dataset_encoder(x, mask)
    torch.testing.assert_close(direct, tokens_fewer, atol=1e-5, rtol=1e-5)


def test_missing_component_is_named(tiny_pipeline_dir, tmp_path):
    broken = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, broken)
    shutil.rmtree(broken / "denoiser")
    with pytest.raises(ValueError, match="denoiser"):
        D2NWGPipeline.from_pretrained(broken)


def test_corrupt_component_raises_value_error(tiny_pipeline_dir, tmp_path):
    broken = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights = broken / "denoiser" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="denoiser"):
        D2NWGPipeline.from_pretrained(broken)


def test_generated_weights_inject_into_built_model(tiny_pipeline, tiny_digits_zoo, reference):
    weights = reference.weights[0]
    model = tiny_pipeline.build_model(weights)
    assert not model.training
    params = dict(model.named_parameters())
    for name, value in weights.items():
        assert torch.equal(params[name].detach(), value), name
    task = tiny_digits_zoo.members("heldout")[0].task
    x, _ = tiny_digits_zoo.task_data(task, "test")
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(x), tiny_pipeline.num_classes)
    # a fresh build without weights is a different (randomly initialised) model
    fresh = dict(tiny_pipeline.build_model().named_parameters())
    assert any(not torch.equal(fresh[n], params[n]) for n in params)


def test_inject_rejects_wrong_shapes(tiny_pipeline, reference):
    bad = {k: v.clone() for k, v in reference.weights[0].items()}
    name = next(iter(bad))
    bad[name] = bad[name][:-1]
    with pytest.raises(ValueError):
        tiny_pipeline.build_model(bad)


def test_condition_features_limit_what_the_encoder_sees(tiny_digits_zoo, make_tiny_pipeline, tmp_path):
    """A zoo may store extra per-sample numbers; only the first `condition_features` describe the dataset."""
    import json

    from d2nwg.training.datamodule import ZooDataModule

    zoo_dir = tmp_path / "zoo"
    shutil.copytree(tiny_digits_zoo.root, zoo_dir)
    manifest = json.loads((zoo_dir / "manifest.json").read_text())
    manifest["input"]["condition_features"] = 16
    (zoo_dir / "manifest.json").write_text(json.dumps(manifest))
    dm = ZooDataModule(zoo=str(zoo_dir), batch_size=2)
    assert dm.feature_dim == 16 and dm.condition_features == 16
    assert all(c.shape[-1] == 64 for c in dm.class_samples[0])  # whole inputs, for the function-space loss

    pipe = make_tiny_pipeline(tiny_digits_zoo)
    per_class = tiny_digits_zoo.class_samples(tiny_digits_zoo.members("heldout")[0].task, "support")
    wide = [torch.cat([x, torch.randn(len(x), 7)], dim=1) for x in per_class]  # 71 features
    with pytest.raises(ValueError, match="features"):
        pipe(wide, num_samples=1, num_inference_steps=2)
    pipe.config.target["input"]["condition_features"] = 64
    narrow = pipe(wide, num_samples=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    plain = pipe(per_class, num_samples=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(narrow.tokens, plain.tokens)
