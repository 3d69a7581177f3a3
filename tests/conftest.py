"""Shared fixtures: one tiny digits zoo built once per test session, tiny pipelines, a tiny Llama."""

from __future__ import annotations

import pytest

TINY_DIGITS = {"num_train_tasks": 10, "num_heldout_tasks": 2, "num_unseen_class_tasks": 1, "steps": 15, "group_size": 4}
"""Settings of the session zoo: 13 members in 4 groups (the last one partial); held out: 2 tasks of
unseen order and 1 with an unseen class."""


@pytest.fixture(scope="session")
def tiny_digits_settings() -> dict:
    return dict(TINY_DIGITS)


@pytest.fixture(scope="session")
def tiny_digits_zoo(tmp_path_factory, tiny_digits_settings):
    """A fully built tiny digits zoo (read-only for tests: copy it before corrupting anything)."""
    from model_zoo.digits import build

    return build(tmp_path_factory.mktemp("digits_zoo") / "zoo", **tiny_digits_settings)


# ----------------------------------------------------------------------------- tiny pipeline
TINY_NETS = {"latent_channels": 4, "merge": 4, "dim": 16, "heads": 2}
"""Sizes of the untrained session pipeline's networks (widths 16, one block each)."""


def _make_tiny_pipeline(zoo, seed: int = 0, head_solver: str = "generated", conditional_mean: bool = False):
    """An untrained `D2NWGPipeline` for ``zoo`` built directly from tiny networks (no Lightning); with
    ``conditional_mean`` it also holds a `d2nwg.models.ConditionalMean` fitted on the zoo's training members.

    The denoiser's adaLN-Zero / zero-output layers are re-drawn at random: with them at
    zero an untrained denoiser predicts 0 for every condition, which would hide guidance
    and conditioning from tests.
    """
    import torch
    from diffusers import DDIMScheduler

    from d2nwg.models import ConditionAnchor, ConditionalMean, DatasetEncoder, Denoiser, WeightVAE
    from d2nwg.models.conditional_mean import class_means
    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
    from d2nwg.zoo.specs import TargetSpec

    torch.manual_seed(seed)
    n, layout = TINY_NETS, zoo.layout
    # Generative zoos (causal-LM adapters) have no head: a task is one "class", its own conversations.
    num_classes = zoo.architecture["config"].get("num_classes", 1)
    # Text zoos condition on their leading `condition_features` numbers (the pooled sentence embedding).
    feature_dim = zoo.input_spec.condition_features or zoo.class_samples(zoo.members("train")[0].task, "train")[0].shape[1]
    vae = WeightVAE(
        chunk_size=layout.chunk_size, num_tokens=layout.num_tokens, latent_channels=n["latent_channels"],
        hidden_dim=n["dim"], depth=1, heads=n["heads"], merge=n["merge"],
    )
    with torch.no_grad():
        vae.mean_tokens.copy_(zoo.tokens("train").mean(0, keepdim=True))
    encoder = DatasetEncoder(
        feature_dim=feature_dim, dim=n["dim"], heads=n["heads"], num_inducing=4, max_classes=num_classes, depth=1
    )
    denoiser = Denoiser(
        latent_channels=n["latent_channels"], num_tokens=vae.num_latent_tokens, cond_dim=n["dim"], dim=n["dim"],
        depth=1, heads=n["heads"], max_classes=num_classes,
    )
    with torch.no_grad():
        for p in denoiser.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    target = TargetSpec(
        architecture=zoo.architecture, layout=zoo.layout.to_dict(), num_classes=num_classes, input=zoo.input_spec
    )
    prior = None
    if conditional_mean:
        members = zoo.members("train")
        features = zoo.input_spec.condition_features
        embeddings = torch.stack([class_means(zoo.class_samples(m.task, "train"), features) for m in members])
        prior, _ = ConditionalMean.fit(embeddings, zoo.tokens("train"), blocks=zoo.input_spec.condition_blocks)
    pipe = D2NWGPipeline(
        vae=vae.eval(), dataset_encoder=encoder.eval(), denoiser=denoiser.eval(),
        scheduler=DDIMScheduler(clip_sample=False), target=target, head_solver=head_solver, conditional_mean=prior,
        condition_anchor=ConditionAnchor.for_zoo(zoo),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def make_tiny_pipeline():
    """``make_tiny_pipeline(zoo, seed=0, head_solver="generated")`` -> a fresh untrained tiny pipeline."""
    return _make_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_digits_zoo):
    """One untrained tiny pipeline for the session zoo (do not mutate it)."""
    return _make_tiny_pipeline(tiny_digits_zoo)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, tiny_pipeline):
    """`tiny_pipeline` saved with ``save_pretrained`` (read-only: copy it before corrupting anything)."""
    path = tmp_path_factory.mktemp("tiny_pipeline") / "pipeline"
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def heldout_images(tmp_path_factory, tiny_digits_zoo):
    """8 support PNGs per class of the session zoo's first held-out task (read-only)."""
    from d2nwg.demo import write_task_images

    task = tiny_digits_zoo.members("heldout")[0].task
    out = tmp_path_factory.mktemp("images") / task
    return write_task_images(tiny_digits_zoo, task, out, splits=("support",), per_class=8)


# ----------------------------------------------------------------------------- tiny Llama
def _tiny_llama(seed: int = 0, layers: int = 4, vocab_size: int = 64):
    """A random ``LlamaForCausalLM``: hidden 32, 4 heads (2 kv heads: v_proj is 32 -> 16)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """``tiny_llama(seed=0, layers=4, vocab_size=64)`` -> a fresh random tiny LlamaForCausalLM."""
    return _tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama):
    """A tiny LlamaForCausalLM folder (``save_pretrained``) with MiniLM's tokenizer: a real vocabulary, offline."""
    from transformers import AutoTokenizer

    from d2nwg.targets.adapters.frozen_base import DEFAULT_BASE
    from d2nwg.targets.adapters.packaged_bases import resolve_base

    folder = tmp_path_factory.mktemp("tiny_llama") / "model"
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(DEFAULT_BASE))
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
