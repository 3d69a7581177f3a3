"""`ConditionalMean`: kernel ridge regression of weight tokens on the dataset embedding, and its place in training
(residual targets) and sampling (added back to every decoded sample)."""

from __future__ import annotations

import pytest
import torch

from d2nwg.commands import main
from d2nwg.models import ConditionalMean
from d2nwg.models.conditional_mean import RIDGE_GRID, class_means, padded_class_means
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline


def linear_zoo(m: int, d: int = 6, t: int = 3, c: int = 4, noise: float = 0.0, seed: int = 0):
    """Embeddings ``[m, d]`` around a shared offset, and tokens that depend linearly on their direction."""
    g = torch.Generator().manual_seed(seed)
    offset = 10 * torch.randn(d, generator=g)  # what every dataset shares: must not drive the kernel
    directions = torch.randn(m + 8, d, generator=g)
    mix = torch.randn(d, t * c, generator=g)
    signal = torch.nn.functional.normalize(directions, dim=-1) @ mix
    tokens = (signal + noise * torch.randn(signal.shape, generator=g)).view(-1, t, c) + 3.0
    embeddings = offset + directions
    return embeddings[:m], tokens[:m], embeddings[m:], tokens[m:]


def test_recovers_a_linear_dependence_on_new_datasets_better_than_the_mean():
    e, y, e_new, y_new = linear_zoo(m=64)
    module, fitted = ConditionalMean.fit(e, y)
    assert module.config.ridge in RIDGE_GRID
    predicted = module(e_new[:, None, None, :])  # each new dataset as one class of one sample
    mean_error = (y_new - y.mean(0)).pow(2).mean()
    assert (predicted - y_new).pow(2).mean() < 0.05 * mean_error
    # The in-sample fit it returns is the module's own prediction for the training datasets.
    assert torch.allclose(module(e[:, None, None, :]), fitted, atol=1e-5)


def test_leave_one_out_shrinks_to_the_mean_when_the_weights_do_not_depend_on_the_data():
    g = torch.Generator().manual_seed(1)
    e, y = torch.randn(40, 6, generator=g), torch.randn(40, 3, 4, generator=g)
    module, _ = ConditionalMean.fit(e, y)
    assert module.config.ridge == max(RIDGE_GRID)
    informative, _ = ConditionalMean.fit(*linear_zoo(m=40)[:2])
    assert informative.config.ridge < max(RIDGE_GRID)
    # A fixed ridge is used as given.
    assert ConditionalMean.fit(e, y, ridge=0.5)[0].config.ridge == 0.5


def test_bad_fits_are_refused():
    e, y = linear_zoo(m=8)[:2]
    with pytest.raises(ValueError, match=">= 2 members"):
        ConditionalMean.fit(e[:1], y[:1])
    with pytest.raises(ValueError, match="one embedding each"):
        ConditionalMean.fit(e[:5], y)
    with pytest.raises(ValueError, match="non-finite"):
        ConditionalMean.fit(e, y.clone().fill_(float("nan")))
    for ridge in (0.0, -1.0):
        with pytest.raises(ValueError, match="must be > 0"):
            ConditionalMean.fit(e, y, ridge=ridge)


def test_embedding_keeps_label_order_and_ignores_padding():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [100.0, 100.0]]]])  # 2 classes, the last sample padding
    mask = torch.tensor([[[True, True], [True, False]]])
    assert torch.equal(padded_class_means(x, mask), torch.tensor([[2.0, 3.0, 5.0, 6.0]]))
    per_class = [x[0, 0], x[0, 1, :1]]
    assert torch.equal(class_means(per_class), padded_class_means(x, mask)[0])
    assert not torch.equal(class_means(per_class[::-1]), class_means(per_class))  # another label order
    assert torch.equal(class_means(per_class, features=1), torch.tensor([2.0, 5.0]))


def test_pipeline_adds_the_conditional_mean_to_each_decoded_sample(tiny_digits_zoo, make_tiny_pipeline, tmp_path):
    with_mean = make_tiny_pipeline(tiny_digits_zoo, conditional_mean=True)
    without = make_tiny_pipeline(tiny_digits_zoo)  # the same seed: the same networks
    dataset = tiny_digits_zoo.class_samples(tiny_digits_zoo.members("heldout")[0].task, "support")
    a = with_mean(dataset, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    b = without(dataset, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    prior = with_mean.prior_tokens(dataset)
    assert without.prior_tokens(dataset) is None
    assert torch.allclose(a.tokens, b.tokens + prior, atol=1e-6)
    # Saved and loaded, it samples the same weights bit for bit; a pipeline saved without it loads without it.
    with_mean.save_pretrained(tmp_path / "with")
    without.save_pretrained(tmp_path / "without")
    loaded = D2NWGPipeline.from_pretrained(tmp_path / "with")
    again = loaded(dataset, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for w, v in zip(a.weights, again.weights) for x, y in zip(w.values(), v.values()))
    assert D2NWGPipeline.from_pretrained(tmp_path / "without").conditional_mean is None


@pytest.mark.slow
def test_training_learns_residuals_and_exports_the_fitted_mean(tiny_digits_zoo, tmp_path):
    from d2nwg.training.datamodule import ZooDataModule
    from d2nwg.training.lightning_cli import make_cli

    tiny = {"model.vae.hidden_dim": "16", "model.vae.latent_channels": "8", "model.encoder.dim": "16",
            "model.denoiser.dim": "16", "model.denoiser.depth": "1", "data.batch_size": "4",
            "trainer.enable_progress_bar": "false", "model.vae_steps": "3", "model.diffusion_steps": "3",
            "model.conditional_mean": "true"}  # fmt: skip
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "--zoo", str(tiny_digits_zoo.root), "--out", str(tmp_path / "run"), *sets]) == 0
    pipe = D2NWGPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert isinstance(pipe.conditional_mean, ConditionalMean)
    dm = ZooDataModule(zoo=str(tiny_digits_zoo.root))
    # The exported regression is the closed-form fit on the zoo's training members.
    embeddings = torch.stack([class_means(c) for c in dm.class_samples])
    expected, fitted = ConditionalMean.fit(embeddings, dm.tokens)
    assert torch.equal(pipe.conditional_mean.coef, expected.coef)
    # The VAE's mean offset is that of the residuals, not of the weights.
    cli = make_cli(args=["--data.zoo", str(tiny_digits_zoo.root), *[f"--{k}={v}" for k, v in tiny.items()]], run=False, out=str(tmp_path / "x"))
    cli.model.setup_networks(cli.datamodule)
    assert torch.allclose(cli.model.vae.mean_tokens[0], (dm.tokens - fitted).mean(0), atol=1e-5)


def test_conditional_mean_refuses_a_zoo_streamed_from_disk(tiny_digits_zoo, tmp_path, capsys):
    sets = ["--set", "model.conditional_mean=true", "--set", "data.memory_limit_mb=0", "--set", "model.vae_steps=1",
            "--set", "model.diffusion_steps=1", "--set", "trainer.enable_progress_bar=false"]  # fmt: skip
    code = main(["train", "--zoo", str(tiny_digits_zoo.root), "--out", str(tmp_path / "run"), *sets])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "conditional_mean needs the zoo's tokens in memory" in err


def test_generation_summary_leaves_out_a_method_the_pipeline_does_not_have():
    from d2nwg.targets.causal_lm.evaluate import METHODS, generation_table, summarize_generation

    rows = [{f"{m}_{k}": 0.5 for m in METHODS for k in ("em", "loglik")} for _ in range(2)]
    rows[0]["generated_best_em"] = 1.0
    for row in rows:
        row["conditional_mean_em"] = row["conditional_mean_loglik"] = None
    summary = summarize_generation(rows)
    assert summary["generated_best_em"] == 0.75 and summary["conditional_mean_em"] is None
    assert ("conditional_mean", "n/a", "n/a") in generation_table(summary)


def test_leave_one_out_is_the_fit_without_that_member():
    from d2nwg.models.conditional_mean import _kernel, leave_one_out

    e, y = linear_zoo(m=12, noise=0.3)[:2]
    loo = leave_one_out(e, y, ridge=0.2)
    _, keys, _, _ = _kernel(e)  # the same centering for every fold, as the closed form keeps it
    k, yc = keys @ keys.T, (y - y.mean(0)).double().flatten(1)
    for i in (0, 5, 11):
        rest = [j for j in range(12) if j != i]
        alpha = torch.linalg.solve(k[rest][:, rest] + 0.2 * torch.eye(11, dtype=k.dtype), yc[rest])
        explicit = y.mean(0).double().flatten() + k[i, rest] @ alpha
        assert torch.allclose(loo[i].double().flatten(), explicit, atol=1e-5)
    # Held out, a member is predicted worse than when it is in the fit.
    _, fitted = ConditionalMean.fit(e, y, ridge=0.2)
    assert (loo - y).pow(2).mean() > (fitted - y).pow(2).mean()


def test_a_pipeline_folder_missing_its_conditional_mean_is_refused(tiny_digits_zoo, make_tiny_pipeline, tmp_path):
    import shutil

    make_tiny_pipeline(tiny_digits_zoo, conditional_mean=True).save_pretrained(tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "conditional_mean")
    with pytest.raises(ValueError, match="missing component.*conditional_mean"):
        D2NWGPipeline.from_pretrained(tmp_path / "p")


@pytest.mark.slow
def test_resume_refuses_another_conditional_mean_in_one_line(tiny_digits_zoo, tmp_path, capsys):
    tiny = {"model.vae.hidden_dim": 16, "model.vae.latent_channels": 8, "model.encoder.dim": 16, "model.denoiser.dim": 16,
            "model.denoiser.depth": 1, "data.batch_size": 4, "trainer.enable_progress_bar": "false",
            "model.vae_steps": 2, "model.diffusion_steps": 2, "model.conditional_mean": "true",
            "model.conditional_mean_ridge": 0.1}  # fmt: skip

    def train(*extra, **changes):
        sets = [a for k, v in {**tiny, **changes}.items() for a in ("--set", f"{k}={v}")]
        return main(["train", "--zoo", str(tiny_digits_zoo.root), "--out", str(tmp_path / "run"), *sets, *extra])

    assert train() == 0
    capsys.readouterr()
    for changes, said in (({"model.conditional_mean_ridge": 1.0}, "this run fits a conditional mean with ridge 1 ("),
                          ({"model.conditional_mean": "false"}, "this run fits no conditional mean")):
        assert train("--resume", **{"model.diffusion_steps": 3, **changes}) != 0
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert "Traceback" not in err and len(errors) == 1 and said in errors[0], err
    assert train("--resume", **{"model.diffusion_steps": 3}) == 0  # the same settings resume


def test_a_ridge_that_is_not_positive_is_refused_before_training(tiny_digits_zoo, tmp_path, capsys):
    code = main(["train", "--zoo", str(tiny_digits_zoo.root), "--out", str(tmp_path / "run"),
                 "--set", "model.conditional_mean=true", "--set", "model.conditional_mean_ridge=0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "conditional_mean_ridge must be > 0" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_blocks_weigh_each_kind_of_feature_the_same_whatever_its_scale():
    from d2nwg.models import ConditionalMean
    from d2nwg.models.conditional_mean import kernel_keys, leave_one_out

    g = torch.Generator().manual_seed(0)
    e = torch.randn(12, 8, generator=g)
    tokens = torch.randn(12, 3, 4, generator=g)
    scaled = torch.cat([e[:, :4], 1000 * e[:, 4:]], dim=1)
    two, fit2 = ConditionalMean.fit(e, tokens, 0.1, blocks=2)
    _, fit2_scaled = ConditionalMean.fit(scaled, tokens, 0.1, blocks=2)
    torch.testing.assert_close(fit2, fit2_scaled, atol=1e-4, rtol=1e-4)  # a block's scale does not matter
    _, fit1_scaled = ConditionalMean.fit(scaled, tokens, 0.1)
    _, fit_second = ConditionalMean.fit(e[:, 4:], tokens, 0.1)
    torch.testing.assert_close(fit1_scaled, fit_second, atol=1e-3, rtol=1e-3)  # one block: the large half rules
    # The kernel is the mean of the blocks' centred cosine similarities.
    c = e.mean(0)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
    expected = (cos(e[:2, None, :4] - c[:4], e[None, :, :4] - c[:4]) + cos(e[:2, None, 4:] - c[4:], e[None, :, 4:] - c[4:])) / 2
    torch.testing.assert_close(two.similarity(e[:2]), expected, atol=1e-5, rtol=1e-5)
    # Leave-one-out with blocks is the ridge regression on the block kernel without that member (kernel centring and
    # token mean from all members, as the closed form keeps them), queried with its embedding.
    loo = leave_one_out(e, tokens, 0.1, blocks=2)
    keys = kernel_keys(e.double(), e.double().mean(0), 2)
    y = tokens.double().flatten(1)
    rest = torch.arange(1, 12)
    alpha = torch.linalg.solve(keys[rest] @ keys[rest].T + 0.1 * torch.eye(11, dtype=torch.float64), y[rest] - y.mean(0))
    torch.testing.assert_close(loo[0].double().flatten(), y.mean(0) + keys[0] @ keys[rest].T @ alpha, atol=1e-5, rtol=1e-5)
    assert float((loo - tokens).pow(2).mean()) > float((fit2 - tokens).pow(2).mean())
    with pytest.raises(ValueError, match="cannot split 8 embedding numbers into 3 equal blocks"):
        ConditionalMean.fit(e, tokens, 0.1, blocks=3)


def test_leave_one_out_at_a_query_is_the_fit_without_that_member_asked_there():
    from d2nwg.models.conditional_mean import leave_one_out_at

    e, y = linear_zoo(m=12, noise=0.3)[:2]
    queries = e + 0.5 * torch.randn(e.shape, generator=torch.Generator().manual_seed(1))  # e.g. a task's support records
    e2 = torch.cat([e, e.flip(1)], 1)  # two blocks of different content
    for emb, q, blocks in ((e, queries, 1), (e2, torch.cat([queries, queries.flip(1)], 1), 2)):
        got = leave_one_out_at(emb, y, q, (0.2, 3.0), blocks=blocks, rows=[0, 7])
        for r, ridge in enumerate((0.2, 3.0)):
            for n, i in enumerate((0, 7)):
                rest = [j for j in range(12) if j != i]
                module, _ = ConditionalMean.fit(emb[rest], y[rest], ridge=ridge, blocks=blocks)
                torch.testing.assert_close(got[r, n], module(q[i][None, None, None])[0], atol=1e-5, rtol=1e-5)
