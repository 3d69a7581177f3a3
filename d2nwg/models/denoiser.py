"""The latent denoiser: a DiT-style transformer over weight latents.

Every block has adaLN-Zero modulation from the timestep plus the pooled dataset
vector, self-attention over latent tokens, and cross-attention to the per-class
conditioning tokens, where a head row's token finds "its" class token. Classifier-
free guidance uses learned null conditioning, swapped in during training.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from d2nwg.models.layers import Attention, FeedForward


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, cross-attention to class tokens, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = FeedForward(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm_cross(x), context)
        return x + gate2.unsqueeze(1) * self.ff(modulate(self.norm2(x), shift2, scale2))


class Denoiser(ModelMixin, ConfigMixin):
    """Predicts the diffusion target for latents ``[B, L, C]`` given timestep and dataset conditioning.

    Args:
        latent_channels: C.
        num_tokens: L, the number of latent tokens.
        cond_dim: width of the dataset encoder's outputs.
        dim, depth, heads: transformer size.
        max_classes: number of null class tokens for classifier-free guidance.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        num_tokens: int = 71,
        cond_dim: int = 128,
        dim: int = 192,
        depth: int = 4,
        heads: int = 4,
        max_classes: int = 10,
    ):
        super().__init__()
        self.proj_in = nn.Linear(latent_channels, dim)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.time_proj = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(dim, dim)
        self.cond_pooled = nn.Linear(cond_dim, dim)
        self.cond_tokens = nn.Linear(cond_dim, dim)
        self.null_tokens = nn.Parameter(torch.zeros(1, max_classes, cond_dim))
        self.null_pooled = nn.Parameter(torch.zeros(1, cond_dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj_out = nn.Linear(dim, latent_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.null_tokens, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)
        for block in self.blocks:
            # adaLN-Zero: every residual branch starts as the identity.
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        # Zero output: the untrained model predicts 0, a stable starting point.
        nn.init.zeros_(self.ada_out[-1].weight)
        nn.init.zeros_(self.ada_out[-1].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def null_condition(self, batch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional (guidance-free) class tokens and pooled vector."""
        return self.null_tokens[:, :num_classes].expand(batch, -1, -1), self.null_pooled.expand(batch, -1)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, class_tokens: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """``latents [B, L, C]``, ``timestep [B]``, ``class_tokens [B, K, cond]``, ``pooled [B, cond]`` -> ``[B, L, C]``."""
        b = latents.shape[0]
        timestep = timestep.expand(b) if timestep.dim() == 1 else timestep.reshape(1).expand(b)
        # 1. Conditioning vector: timestep embedding plus the pooled dataset vector.
        t_emb = self.time_embed(self.time_proj(timestep).to(latents.dtype))  # (B, dim)
        cond = t_emb + self.cond_pooled(pooled)  # (B, dim)
        context = self.cond_tokens(class_tokens)  # (B, K, dim)
        # 2. Transformer over latent tokens.
        h = self.proj_in(latents) + self.pos  # (B, L, dim)
        for block in self.blocks:
            h = block(h, cond, context)
        # 3. Final adaLN and projection back to latent channels.
        shift, scale = self.ada_out(cond).chunk(2, dim=-1)
        return self.proj_out(modulate(self.norm_out(h), shift, scale))
