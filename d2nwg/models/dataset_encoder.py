"""The dataset encoder: a Set Transformer over per-class samples.

Input is a dataset as ``x [B, K, S, D]``: K classes in label order, S samples per
class, D features each (features come from a pluggable extractor; identity for
digits). Within a class, ISAB + PMA pool the samples into a prototype, which is
invariant to sample order. Across classes, attention mixes the prototypes after a
*class-slot* embedding is added, so the output keeps label order: token i
describes class i, and the denoiser learns to write row i of a head from it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from d2nwg.models.layers import Attention, FeedForward, TransformerBlock


class MAB(nn.Module):
    """Multihead attention block of the Set Transformer (Lee et al. 2019), pre-norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = q + self.attn(self.norm_q(q), self.norm_kv(kv), mask)
        return h + self.ff(self.norm_ff(h))


class ISAB(nn.Module):
    """Induced set attention: samples attend through ``num_inducing`` learned points (linear in S)."""

    def __init__(self, dim: int, heads: int, num_inducing: int):
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(1, num_inducing, dim) * 0.02)
        self.mab_in = MAB(dim, heads)
        self.mab_out = MAB(dim, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.mab_in(self.inducing.expand(x.shape[0], -1, -1), x, mask)
        return self.mab_out(x, h)


class PMA(nn.Module):
    """Pooling by multihead attention onto ``num_seeds`` learned seeds."""

    def __init__(self, dim: int, heads: int, num_seeds: int = 1):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(1, num_seeds, dim) * 0.02)
        self.mab = MAB(dim, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(self.seeds.expand(x.shape[0], -1, -1), x, mask)


class DatasetEncoder(ModelMixin, ConfigMixin):
    """Embeds a labelled dataset into per-class conditioning tokens and a pooled vector.

    Args:
        feature_dim: features per sample (D).
        dim: width of the encoder and of its outputs.
        heads: attention heads.
        num_inducing: inducing points of the intra-class ISAB.
        max_classes: number of class-slot embeddings (the largest K supported).
        depth: transformer blocks across classes.
    """

    @register_to_config
    def __init__(
        self,
        feature_dim: int = 64,
        dim: int = 128,
        heads: int = 4,
        num_inducing: int = 8,
        max_classes: int = 10,
        depth: int = 2,
    ):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(feature_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.intra = ISAB(dim, heads, num_inducing)
        self.pool_class = PMA(dim, heads)
        self.class_slots = nn.Parameter(torch.randn(max_classes, dim) * 0.02)
        self.inter = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.pool_dataset = PMA(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, K, S, D]`` -> ``(class_tokens [B, K, dim], pooled [B, dim])``.

        ``mask [B, K, S]`` (bool, True = real sample) lets classes have different sample counts.
        """
        b, k, s, _ = x.shape
        if k > self.config.max_classes:
            raise ValueError(f"dataset has {k} classes, the encoder supports at most {self.config.max_classes}")
        flat_mask = None if mask is None else mask.flatten(0, 1)  # (B*K, S)
        # 1. Embed samples and pool each class into a prototype (order of samples is irrelevant).
        h = self.embed(x.flatten(0, 1))  # (B*K, S, dim)
        proto = self.pool_class(self.intra(h, flat_mask), flat_mask).view(b, k, -1)  # (B, K, dim)
        # 2. Add class slots so that label order survives the permutation-equivariant attention.
        h = proto + self.class_slots[:k]
        for block in self.inter:
            h = block(h)
        tokens = self.norm(h)  # (B, K, dim)
        # 3. A pooled dataset vector for global conditioning.
        pooled = self.pool_dataset(tokens).squeeze(1)  # (B, dim)
        return tokens, pooled
