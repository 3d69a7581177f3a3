"""The weight VAE: weight tokens ``[B, T, chunk]`` <-> latents ``[B, L, C]``.

Every ``merge`` neighbouring tokens fold into one latent token (L = ceil(T / merge)),
so the latent grid keeps the layout's order and cost stays linear in the number
of weights apart from attention. As in p-diff, the input weights and the latents are perturbed with
small Gaussian noise during training, which makes the decoder robust to the
imperfect latents that diffusion produces.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from d2nwg.models.layers import TransformerBlock


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over every element (works for 1-D latents)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class Encoder(nn.Module):
    """Tokens -> transformer -> groups of ``merge`` neighbouring tokens -> one latent token each."""

    def __init__(self, chunk_size: int, latent_dim: int, num_tokens: int, dim: int, depth: int, heads: int, merge: int):
        super().__init__()
        self.merge = merge
        self.proj_in = nn.Linear(chunk_size, dim)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(merge * dim, latent_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(tokens) + self.pos  # (B, T, dim)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        pad = -h.shape[1] % self.merge
        h = nn.functional.pad(h, (0, 0, 0, pad))  # (B, L*merge, dim)
        return self.proj_out(h.reshape(h.shape[0], -1, self.merge * h.shape[-1]))  # (B, L, latent_dim)


class Decoder(nn.Module):
    """Latent tokens -> ``merge`` tokens each -> transformer -> weight tokens."""

    def __init__(self, chunk_size: int, latent_dim: int, num_tokens: int, dim: int, depth: int, heads: int, merge: int):
        super().__init__()
        self.merge, self.num_tokens = merge, num_tokens
        self.proj_in = nn.Linear(latent_dim, merge * dim)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, chunk_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, l, _ = latents.shape
        h = self.proj_in(latents).reshape(b, l * self.merge, -1)[:, : self.num_tokens] + self.pos  # (B, T, dim)
        for block in self.blocks:
            h = block(h)
        return self.proj_out(self.norm(h))  # (B, T, chunk)


class WeightVAE(ModelMixin, ConfigMixin):
    """Variational autoencoder over weight tokens.

    Args:
        chunk_size: numbers per weight token (the layout's ``chunk_size``).
        num_tokens: tokens per weight set (the layout's ``num_tokens``).
        latent_channels: latent numbers per token.
        hidden_dim, depth, heads: width, blocks and heads of encoder and decoder.
        input_noise: std of the noise added to normalised input weights in training.
        latent_noise: std of the noise added to latents before decoding in training.
        kl_weight: weight of the KL term (kept small: we want accurate weights, not a prior match).
        merge: neighbouring weight tokens folded into one latent token (shortens the diffusion sequence).
        scaling_factor: multiplies latents for diffusion so they have unit std (fitted after training).
    """

    @register_to_config
    def __init__(
        self,
        chunk_size: int = 32,
        num_tokens: int = 71,
        latent_channels: int = 16,
        hidden_dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        input_noise: float = 1e-3,
        latent_noise: float = 0.1,
        kl_weight: float = 1e-6,
        merge: int = 1,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        self.encoder = Encoder(chunk_size, 2 * latent_channels, num_tokens, hidden_dim, depth, heads, merge)
        self.decoder = Decoder(chunk_size, latent_channels, num_tokens, hidden_dim, depth, heads, merge)
        # The zoo's mean weight tokens: members share most of their weights (one initialisation),
        # so encoding only the offset from the mean spends the latent on what differs between tasks.
        self.mean_tokens = nn.Parameter(torch.zeros(1, num_tokens, chunk_size))

    @property
    def num_latent_tokens(self) -> int:
        """L = ceil(T / merge)."""
        return -(-self.config.num_tokens // self.config.merge)

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)``, each ``[B, L, C]``."""
        mean, logvar = self.encoder(tokens - self.mean_tokens).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Weight tokens ``[B, T, chunk]`` from latents ``[B, L, C]`` (unscaled)."""
        return self.decoder(latents) + self.mean_tokens

    def forward(self, tokens: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``tokens``; returns ``(reconstruction, mean, logvar)``."""
        if self.training and self.config.input_noise > 0:
            tokens = tokens + self.config.input_noise * torch.randn_like(tokens)
        mean, logvar = self.encode(tokens)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        if self.training and self.config.latent_noise > 0:
            z = z + self.config.latent_noise * torch.randn_like(z)
        return self.decode(z), mean, logvar

    def loss(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        output: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Reconstruction MSE in normalised weight space (padding masked out) plus a small KL.

        ``output`` is ``self(tokens)`` when the caller already ran it (to add losses on the reconstruction).
        """
        recon, mean, logvar = self(tokens) if output is None else output
        err = (recon - tokens).pow(2)
        mse = (err * mask).sum() / (mask.sum() * tokens.shape[0]) if mask is not None else err.mean()
        kl = gaussian_kl(mean, logvar)
        return {"loss": mse + self.config.kl_weight * kl, "mse": mse, "kl": kl}
