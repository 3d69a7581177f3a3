"""The three networks of the hyper-model: shapes, masking, symmetry, CFG null condition, save/load, VAE training."""

from __future__ import annotations

import math

import pytest
import torch

from d2nwg.models import DatasetEncoder, Denoiser, WeightVAE
from d2nwg.models.vae import gaussian_kl

B, K, S, D = 2, 5, 6, 12


def tiny_vae(num_tokens: int = 7, chunk: int = 8, merge: int = 1, **kw) -> WeightVAE:
    torch.manual_seed(0)
    return WeightVAE(chunk_size=chunk, num_tokens=num_tokens, latent_channels=4, hidden_dim=16, depth=1, heads=2, merge=merge, **kw)


def tiny_encoder(**kw) -> DatasetEncoder:
    torch.manual_seed(0)
    settings = {"feature_dim": D, "dim": 16, "heads": 2, "num_inducing": 4, "max_classes": K, "depth": 1, **kw}
    return DatasetEncoder(**settings).eval()


def tiny_denoiser(num_tokens: int = 3, randomize_zero_layers: bool = True) -> Denoiser:
    torch.manual_seed(0)
    net = Denoiser(latent_channels=4, num_tokens=num_tokens, cond_dim=16, dim=16, depth=1, heads=2, max_classes=K)
    if randomize_zero_layers:
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.1)
    return net.eval()


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("num_tokens,merge", [(7, 1), (7, 3), (8, 4), (5, 8)])
def test_vae_shapes_and_merge(num_tokens, merge):
    vae = tiny_vae(num_tokens=num_tokens, merge=merge).eval()
    latent_len = math.ceil(num_tokens / merge)
    assert vae.num_latent_tokens == latent_len
    tokens = torch.randn(B, num_tokens, 8)
    mean, logvar = vae.encode(tokens)
    assert mean.shape == logvar.shape == (B, latent_len, 4)
    assert vae.decode(mean).shape == (B, num_tokens, 8)
    recon, mean2, _ = vae(tokens, sample=False)
    assert recon.shape == tokens.shape
    assert torch.equal(mean, mean2)


def test_vae_merge_pads_and_trims():
    """T not divisible by merge: the encoder pads to L*merge, the decoder trims back to exactly T tokens."""
    vae = tiny_vae(num_tokens=5, merge=2).eval()
    assert vae.num_latent_tokens == 3
    assert vae.decode(torch.randn(1, 3, 4)).shape == (1, 5, 8)
    with pytest.raises(RuntimeError):
        vae.encode(torch.randn(1, 6, 8))  # positional embeddings fix T


def test_dataset_encoder_shapes():
    enc = tiny_encoder()
    tokens, pooled = enc(torch.randn(B, K, S, D))
    assert tokens.shape == (B, K, 16)
    assert pooled.shape == (B, 16)
    # fewer classes than slots is fine
    tokens3, _ = enc(torch.randn(B, 3, S, D))
    assert tokens3.shape == (B, 3, 16)


def test_dataset_encoder_rejects_too_many_classes():
    with pytest.raises(ValueError, match="at most"):
        tiny_encoder()(torch.randn(1, K + 1, S, D))


def test_denoiser_shapes_and_null_condition():
    den = tiny_denoiser(num_tokens=3)
    latents = torch.randn(B, 3, 4)
    null_tokens, null_pooled = den.null_condition(B, 4)
    assert null_tokens.shape == (B, 4, 16)
    assert null_pooled.shape == (B, 16)
    # the same learned null for every batch element
    assert torch.equal(null_tokens[0], null_tokens[1])
    out = den(latents, torch.tensor([10]), null_tokens, null_pooled)
    assert out.shape == latents.shape
    # per-sample timesteps and a scalar timestep both work
    assert den(latents, torch.tensor([10, 500]), null_tokens, null_pooled).shape == latents.shape
    assert den(latents, torch.tensor(10), null_tokens, null_pooled).shape == latents.shape
    # the condition matters: real tokens differ from the null ones
    cond_out = den(latents, torch.tensor([10]), torch.randn(B, 4, 16), torch.randn(B, 16))
    assert not torch.allclose(out, cond_out)


def test_untrained_denoiser_predicts_zero():
    """adaLN-Zero init: the fresh denoiser's output is exactly zero."""
    den = tiny_denoiser(randomize_zero_layers=False)
    tokens, pooled = den.null_condition(B, K)
    assert not den(torch.randn(B, 3, 4), torch.tensor([3]), tokens, pooled).any()


# ----------------------------------------------------------------------------- dataset encoder symmetry
def test_mask_padding_equals_unpadded():
    enc = tiny_encoder()
    torch.manual_seed(1)
    x = torch.randn(1, K, S, D)
    ref_tokens, ref_pooled = enc(x)
    extra = 3
    padded = torch.cat([x, 100 * torch.randn(1, K, extra, D)], dim=2)  # garbage in the padding
    mask = torch.zeros(1, K, S + extra, dtype=torch.bool)
    mask[:, :, :S] = True
    tokens, pooled = enc(padded, mask)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    # without the mask the garbage changes the result (the mask is what hides it)
    assert not torch.allclose(enc(padded)[0], ref_tokens, atol=1e-4)


def test_mask_handles_uneven_class_sizes():
    """Class 0 with 2 real samples + padding == class 0 given alone with its 2 samples (other classes unchanged)."""
    enc = tiny_encoder()
    torch.manual_seed(2)
    x = torch.randn(1, K, S, D)
    mask = torch.ones(1, K, S, dtype=torch.bool)
    mask[0, 0, 2:] = False
    tokens, _ = enc(x, mask)
    # same class-0 content, different padding values: no effect
    x2 = x.clone()
    x2[0, 0, 2:] = torch.randn(S - 2, D)
    torch.testing.assert_close(enc(x2, mask)[0], tokens, atol=1e-5, rtol=1e-5)


def test_sample_order_within_class_does_not_matter():
    enc = tiny_encoder()
    torch.manual_seed(3)
    x = torch.randn(B, K, S, D)
    tokens, pooled = enc(x)
    shuffled = torch.stack([torch.stack([x[b, k, torch.randperm(S)] for k in range(K)]) for b in range(B)])
    assert not torch.equal(shuffled, x)
    t2, p2 = enc(shuffled)
    torch.testing.assert_close(t2, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p2, pooled, atol=1e-5, rtol=1e-5)


def test_class_order_matters_through_slots():
    enc = tiny_encoder()
    torch.manual_seed(4)
    x = torch.randn(1, K, S, D)
    perm = torch.tensor([1, 0, 2, 3, 4])
    tokens, _ = enc(x)
    swapped, _ = enc(x[:, perm])
    # with slot embeddings, swapping two classes is not just a swap of their tokens
    assert not torch.allclose(swapped, tokens[:, perm], atol=1e-6)
    assert not torch.allclose(swapped, tokens, atol=1e-6)
    # without them the encoder is permutation-equivariant across classes: the slots are the only order signal
    with torch.no_grad():
        enc.class_slots.zero_()
    tokens0, pooled0 = enc(x)
    swapped0, pooled_swapped0 = enc(x[:, perm])
    torch.testing.assert_close(swapped0, tokens0[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_swapped0, pooled0, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- save / load
def test_save_pretrained_round_trip(tmp_path):
    vae = tiny_vae(num_tokens=7, merge=3).eval()
    with torch.no_grad():
        vae.mean_tokens.normal_()  # a non-default parameter must survive too
    enc, den = tiny_encoder(), tiny_denoiser(num_tokens=3)
    for name, net in (("vae", vae), ("enc", enc), ("den", den)):
        net.save_pretrained(tmp_path / name)
    vae2 = WeightVAE.from_pretrained(tmp_path / "vae").eval()
    enc2 = DatasetEncoder.from_pretrained(tmp_path / "enc").eval()
    den2 = Denoiser.from_pretrained(tmp_path / "den").eval()
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(vae2.config) == public(vae.config)
    assert public(den2.config) == public(den.config)
    assert vae2.config.merge == 3 and enc2.config.max_classes == K

    tokens = torch.randn(B, 7, 8)
    z = vae.encode(tokens)[0]
    assert torch.equal(vae2.encode(tokens)[0], z)
    assert torch.equal(vae2.decode(z), vae.decode(z))
    x = torch.randn(B, K, S, D)
    t1, p1 = enc(x)
    t2, p2 = enc2(x)
    assert torch.equal(t1, t2) and torch.equal(p1, p2)
    lat, ts = torch.randn(B, 3, 4), torch.tensor([7])
    assert torch.equal(den(lat, ts, t1, p1), den2(lat, ts, t1, p1))


def test_scaling_factor_is_saved(tmp_path):
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=2.5)
    vae.save_pretrained(tmp_path)
    assert WeightVAE.from_pretrained(tmp_path).config.scaling_factor == 2.5


# ----------------------------------------------------------------------------- VAE loss
def test_gaussian_kl_zero_for_standard_normal():
    zeros = torch.zeros(3, 4)
    assert gaussian_kl(zeros, zeros).item() == 0.0
    assert gaussian_kl(torch.ones(3, 4), zeros).item() > 0


def test_vae_loss_finite_and_decreasing():
    vae = tiny_vae(num_tokens=6, chunk=8, merge=2)
    torch.manual_seed(5)
    tokens = torch.randn(8, 6, 8)
    mask = torch.ones(6, 8)
    mask[-1, 5:] = 0  # padding at the end of the last token

    def eval_loss() -> float:
        vae.eval()
        torch.manual_seed(123)  # same posterior sample every time
        with torch.no_grad():
            return vae.loss(tokens, mask)["loss"].item()

    start = eval_loss()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    vae.train()
    for _ in range(30):
        losses = vae.loss(tokens, mask)
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        vae.train()
    end = eval_loss()
    assert math.isfinite(start) and math.isfinite(end)
    assert end < 0.8 * start, (start, end)


def test_vae_loss_mask_averages_over_real_entries():
    vae = tiny_vae(num_tokens=4, chunk=8).eval()
    tokens = torch.randn(2, 4, 8)
    mask = torch.ones(4, 8)
    mask[-1, 4:] = 0
    mean = logvar = torch.zeros(2, 4, 4)
    recon = tokens + 1.0  # error 1 on every entry
    recon[:, -1, 4:] += 99.0  # huge error, but only on padding
    vae.forward = lambda t: (recon, mean, logvar)  # fix the reconstruction, test only the loss
    losses = vae.loss(tokens, mask)
    assert losses["mse"].item() == pytest.approx(1.0)
    assert losses["kl"].item() == 0.0
    assert vae.loss(tokens)["mse"].item() > 10  # without the mask the padding error counts
