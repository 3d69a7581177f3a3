"""`ConditionalMean`: the members' expected weight tokens given a dataset, by kernel ridge regression.

The diffusion model then only has to generate what a member adds to this mean (CorrDiff's split of a
regression mean and a diffusion residual, Mardani et al. 2023, "Residual corrective diffusion modeling").

Why: in a zoo with one member per task, each member's weights hold the task's signal plus the noise of its
own short training run. On the `llm-lora` zoo the top 8 principal directions of the members hold 19.5% of
their variance, and a diffusion model trained on 192 such members ignored its conditioning (generated
adapters wrote the wrong format even for training tasks). A linear map from the dataset embedding to the
weights, fitted in closed form, averages that noise away. On the 24 held-out tasks of that zoo, exact match of
the best of 10 generated adapters rose from 0.052 (diffusion alone) to 0.544 (regression alone: 0.539;
retrieval 0.372, multi-task LoRA with 4 in-context examples 0.534; docs/results/ablations.md).

The regression is in the dual (kernel) form, so its size grows with the number of training members M, not
with the embedding width: ``coef [M, T, chunk]`` beside the ``member_embeddings [M, D]`` that weigh them.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

RIDGE_GRID = tuple(10.0 ** (k / 4) for k in range(-12, 5))
"""Ridge strengths tried by `ConditionalMean.fit` (1e-3 .. 10), relative to the mean kernel eigenvalue (1 here:
keys have unit norm)."""


def padded_class_means(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A dataset's per-class mean features in label order: ``x [B, K, S, D]`` (``mask [B, K, S]``, True = real
    sample) -> ``[B, K * D]``. Keeping the classes apart keeps label order: a dataset and the same classes in
    another order get different embeddings (and heads)."""
    if mask is None:
        return x.mean(2).flatten(1)
    w = mask.to(x.dtype)[..., None]
    return ((x * w).sum(2) / w.sum(2).clamp_min(1)).flatten(1)


def class_means(per_class: list[torch.Tensor], features: int | None = None) -> torch.Tensor:
    """`padded_class_means` of one dataset given as per-class samples ``[n_c, D]`` (label order), using the leading
    ``features`` numbers of each sample (all when None) -> ``[K * D]``."""
    return torch.cat([samples[:, :features].float().mean(0) for samples in per_class])


def kernel_keys(embeddings: torch.Tensor, center: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Unit-norm keys ``[B, D]`` of embeddings ``[B, D]``: each of ``blocks`` equal-width blocks centred on ``center``
    and normalised apart, then scaled by ``blocks ** -0.5``, so the kernel ``keys @ keys.T`` is the mean of the
    blocks' centred cosine similarities (each kind of feature weighs the same, whatever its scale)."""
    parts = (embeddings.to(center.dtype) - center).chunk(blocks, dim=-1)
    return torch.cat([nn.functional.normalize(p, dim=-1) for p in parts], dim=-1) / blocks**0.5


def _kernel(embeddings: torch.Tensor, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(center [D], keys [M, D], eigenvalues [M], eigenvectors [M, M])`` of the centered cosine kernel, float64."""
    e = embeddings.double()
    center = e.mean(0)
    keys = kernel_keys(e, center, blocks)
    s, u = torch.linalg.eigh(keys @ keys.T)
    return center, keys, s.clamp_min(0), u


def leave_one_out(embeddings: torch.Tensor, tokens: torch.Tensor, ridge: float, blocks: int = 1) -> torch.Tensor:
    """Each member's tokens ``[M, T, chunk]`` as predicted by the regression fitted on the other M-1: what the
    regression would give a dataset no member was trained on.

    Closed form (the hat-matrix identity, Hastie et al., "Elements of Statistical Learning", eq. 7.52) with the
    kernel's centering and the token mean taken from all M members, as `ConditionalMean.fit`'s choice of ridge does.
    """
    _, _, s, u = _kernel(embeddings, blocks)
    y = tokens.double().flatten(1)
    yc = y - y.mean(0)
    hat = (u * (s / (s + ridge))) @ u.T
    leverage = hat.diagonal()[:, None]
    return (y - (yc - hat @ yc) / (1 - leverage).clamp_min(1e-9)).float().view_as(tokens)



def leave_one_out_at(
    embeddings: torch.Tensor, tokens: torch.Tensor, queries: torch.Tensor, ridges, blocks: int = 1, rows=None
) -> torch.Tensor:
    """Member i's tokens ``[T, chunk]`` as predicted by the regression fitted on the other M-1 members
    (``embeddings [M, D]``, ``tokens [M, T, chunk]``), queried at ``queries[i]`` (``[M, D]``: e.g. its task's
    support records, what generation conditions on, where `leave_one_out` queries at its training embedding);
    for each of ``ridges`` and the members ``rows`` (default: all) -> ``[len(ridges), len(rows), T, chunk]``.

    Equal to `ConditionalMean.fit` on the others then ``forward`` at the query, without forming the fit's
    ``[M, T * chunk]`` coefficients: the prediction is ``bias + ((K + ridge I)^-1 k)^T (Y - bias)`` (K symmetric),
    so each member costs one ``[M-1, M-1]`` eigendecomposition and a weighted sum of the others' tokens per ridge.
    """
    e, q = embeddings.double(), queries.double()
    y = tokens.double().flatten(1)
    out = []
    for i in range(len(e)) if rows is None else rows:
        keep = torch.arange(len(e)) != i
        center, keys, s, u = _kernel(e[keep], blocks)
        k = u.T @ (keys @ kernel_keys(q[i : i + 1], center, blocks)[0])
        bias = y[keep].mean(0)
        weights = torch.stack([u @ (k / (s + ridge)) for ridge in ridges])  # (R, M-1)
        out.append(bias + weights @ (y[keep] - bias))
    return torch.stack(out, 1).float().view(len(ridges), len(out), *tokens.shape[1:])

class ConditionalMean(ModelMixin, ConfigMixin):
    """Kernel ridge regression of weight tokens ``[T, chunk]`` on a dataset's per-class mean features ``[K * D]``
    (`padded_class_means`; for one-class datasets such as a task's conversations, its mean feature).

    The kernel is the cosine similarity of embeddings after subtracting the training members' mean
    embedding (``center``): raw embeddings of related datasets share one large common component (mean
    cosine 0.98 between the tasks of the `llm-lora` zoo), which hides what tells them apart.

    Args:
        num_members: M, the training members the regression was fitted on.
        feature_dim: K * D, the embedding's width (D: the conditioning features the dataset encoder sees per sample).
        num_tokens, chunk_size: the weight layout's token grid ``[T, chunk]``.
        ridge: the ridge strength the fit chose (recorded; the coefficients already include it).
        blocks: equal-width blocks of the embedding that are centred and normalised apart (`kernel_keys`), e.g. 2
            for the causal-LM ``"prompt-response-gradient"`` pooling (an embedding block and a gradient block).

    Buffers (all float32): ``center [D]``, ``member_embeddings [M, D]`` (centered, unit norm), ``coef [M, T, chunk]``, ``bias [T, chunk]``.
    """

    @register_to_config
    def __init__(
        self, num_members: int = 1, feature_dim: int = 1, num_tokens: int = 1, chunk_size: int = 1, ridge: float = 0.1, blocks: int = 1
    ):
        super().__init__()
        self.register_buffer("center", torch.zeros(feature_dim))
        self.register_buffer("member_embeddings", torch.zeros(num_members, feature_dim))
        self.register_buffer("coef", torch.zeros(num_members, num_tokens, chunk_size))
        self.register_buffer("bias", torch.zeros(num_tokens, chunk_size))

    def similarity(self, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` mean features -> ``[B, M]`` cosine similarity to each training member's, after centering."""
        return kernel_keys(embedding.to(self.member_embeddings.dtype), self.center, self.config.blocks) @ self.member_embeddings.T

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Expected tokens ``[B, T, chunk]`` for datasets ``x [B, K, S, D]`` (``mask [B, K, S]``), K * D = ``feature_dim``."""
        k = self.similarity(padded_class_means(x, mask))
        return self.bias + torch.einsum("bm,mtc->btc", k, self.coef)

    @classmethod
    @torch.no_grad()
    def fit(
        cls, embeddings: torch.Tensor, tokens: torch.Tensor, ridge: float | None = None, blocks: int = 1
    ) -> tuple[ConditionalMean, torch.Tensor]:
        """Fit on ``embeddings [M, K * D]`` (each member's dataset, `class_means`) and ``tokens [M, T, chunk]``.

        Args:
            ridge: the ridge strength; ``None`` picks the one of `RIDGE_GRID` with the lowest leave-one-out
                squared error of the tokens (`leave_one_out`). Weight error is a proxy: on the `llm-lora` zoo it
                picks 1.78 where the leave-one-out log-likelihood of the training tasks' answers picks 0.316
                (`benchmarks/bench_ridge.py`, task-gradient conditioning), so that recipe's config sets the ridge.
            blocks: see the class docstring; the embedding width must divide by it.

        Returns:
            ``(module, fitted)``: the regression and its in-sample predictions ``[M, T, chunk]`` (float32), whose
            residuals ``tokens - fitted`` are what the VAE and the diffusion model learn.

        Raises:
            ValueError: fewer than 2 members, mismatched counts, non-finite inputs or fit, a ridge that is not > 0, or
                an embedding width that ``blocks`` does not divide.
        """
        m = len(tokens)
        if ridge is not None and not ridge > 0:
            raise ValueError(f"the conditional mean's ridge must be > 0, got {ridge}")
        if m < 2 or len(embeddings) != m:
            raise ValueError(f"the conditional mean needs >= 2 members with one embedding each, got {len(embeddings)} embeddings for {m} members")
        if not (torch.isfinite(embeddings).all() and torch.isfinite(tokens).all()):
            raise ValueError("the conditional mean got non-finite embeddings or weight tokens")
        if blocks < 1 or embeddings.shape[-1] % blocks:
            raise ValueError(f"the conditional mean cannot split {embeddings.shape[-1]} embedding numbers into {blocks} equal blocks")
        center, keys, s, u = _kernel(embeddings, blocks)
        y = tokens.double().flatten(1)
        bias = y.mean(0)
        yc = y - bias
        if ridge is None:
            gram = u.T @ (yc @ yc.T) @ u  # Y Y^T in the eigenbasis: every LOO error below is M x M work

            def loo_error(lam: float) -> float:
                shrink = lam / (s + lam)  # I - H in the eigenbasis, H = K (K + lam I)^-1
                residual = (u * shrink) @ gram @ (u * shrink).T  # (I-H) Y Y^T (I-H)
                leverage = (u**2 * (s / (s + lam))).sum(1)
                return float((residual.diagonal() / (1 - leverage).clamp_min(1e-9) ** 2).sum())

            ridge = min(RIDGE_GRID, key=loo_error)
        alpha = (u / (s + ridge)) @ (u.T @ yc)  # (K + ridge I)^-1 Yc
        fitted = bias + (keys @ keys.T) @ alpha
        if not torch.isfinite(alpha).all():
            raise ValueError(f"the conditional mean's fit is not finite (ridge {ridge}); use a larger ridge")
        module = cls(
            num_members=m, feature_dim=keys.shape[1], num_tokens=tokens.shape[1], chunk_size=tokens.shape[2], ridge=float(ridge),
            blocks=int(blocks),
        )
        module.center.copy_(center)
        module.member_embeddings.copy_(keys)
        module.coef.copy_(alpha.view_as(tokens))
        module.bias.copy_(bias.view(tokens.shape[1:]))
        return module, fitted.view_as(tokens).float()
