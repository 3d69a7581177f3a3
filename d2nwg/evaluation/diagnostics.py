"""Diagnostics of a pipeline on a zoo: the VAE's reconstruction ratio and the novelty of generated weights.

`vae_reconstruction` is the accuracy of decode(encode(w)) over that of w on zoo members (an export measures it,
`d2nwg.training.provenance.training_provenance`, and so does the protocol); `nearest_reference_distances` and the novelty
rows measure how far generated weight sets are from their nearest zoo member."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from d2nwg.evaluation.trust import flat_tokens, nearest_rows, zoo_spacing
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.targets.architectures import build_model
from d2nwg.targets.population import paired_accuracy
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import ModelZoo

MAX_NOVELTY_REFERENCE = 500  # zoo members whose nearest-neighbour distance is the novelty reference
MAX_VAE_MEMBERS = 200  # members whose reconstruction accuracy is measured


def zoo_module(zoo: ModelZoo, init: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A fresh module of the zoo's architecture, its non-layout tensors from the shared init when there is one."""
    module = build_model(zoo.architecture)
    if init is not None:
        module.load_state_dict(init, strict=False)
    return module


# ----------------------------------------------------------------------------- diagnostics
def nearest_reference_distances(queries: torch.Tensor, reference: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest reference row (``exclude[i]``: a row to skip)."""
    return nearest_rows(queries, reference, exclude)[0].float()


def novelty_figures(
    layout: WeightLayout, generated: Sequence[Mapping[str, torch.Tensor]], train: Sequence[Mapping[str, torch.Tensor]], seed: int
) -> dict:
    """Generated sets' nearest-train-member distances vs the zoo's own nearest-neighbour distances."""
    finite = [sd for sd in generated if all(torch.isfinite(sd[n]).all() for n in layout.names)]
    zoo_tokens = flat_tokens(layout, train)
    result = {
        "novelty_ratio": None,
        "generated_nn_distance": None,
        "zoo_nn_distance": None,
        "generated_nonfinite": len(generated) - len(finite),
    }
    if finite:
        result["generated_nn_distance"] = float(nearest_reference_distances(flat_tokens(layout, finite), zoo_tokens).median())
    result["zoo_nn_distance"] = zoo_spacing(zoo_tokens, seed, MAX_NOVELTY_REFERENCE)
    if result["generated_nn_distance"] is not None and result["zoo_nn_distance"]:
        result["novelty_ratio"] = result["generated_nn_distance"] / result["zoo_nn_distance"]
    return result


def vae_reconstruction(pipeline: D2NWGPipeline, zoo: ModelZoo, seed: int = 0, max_members: int = MAX_VAE_MEMBERS) -> dict:
    """The VAE figures of the report (``vae_recon_ratio``, ``vae_recon_acc``, ...) for ``pipeline`` on ``zoo``,
    measured as `evaluate` measures them, on up to ``max_members`` members (held-out ones first, then a seeded
    draw of training ones); an export records the ratio (`d2nwg.training.provenance`)."""
    return measure_vae_reconstruction(pipeline, zoo, zoo_module(zoo, zoo.init_state()).eval(), seed, max_members)


@torch.no_grad()
def measure_vae_reconstruction(pipeline: D2NWGPipeline, zoo: ModelZoo, module: nn.Module, seed: int, max_members: int = MAX_VAE_MEMBERS) -> dict:
    """Mean test accuracy of decode(encode(w)) (posterior mean) over that of w, on up to ``max_members`` members."""
    heldout, train = zoo.members("heldout"), zoo.members("train")
    members = heldout[:max_members]
    if len(members) < max_members and train:
        g = torch.Generator().manual_seed(seed)
        picks = torch.randperm(len(train), generator=g)[: max_members - len(members)].sort().values
        members += [train[int(i)] for i in picks]
    layout, vae = pipeline.layout, pipeline.vae
    originals = [zoo.load_member(m) for m in members]
    tokens = layout.tokenize(originals)  # (M, T, chunk), normalised as the VAE saw them in training
    # With a conditional mean the VAE encodes each member's residual from it (its task's training split).
    if pipeline.conditional_mean is not None:
        prior = torch.cat([pipeline.prior_tokens(zoo.class_samples(m.task, "train")) for m in members])
    else:
        prior = torch.zeros_like(tokens)
    recon = []
    for s in range(0, len(tokens), 64):
        mean, _ = vae.encode((tokens - prior)[s : s + 64].to(device=vae.device, dtype=vae.dtype))
        recon.append(vae.decode(mean).float().cpu())  # the posterior mean is unscaled: decode it directly
    recon_sds = [{**orig, **rec} for orig, rec in zip(originals, layout.detokenize(torch.cat(recon) + prior))]
    device = next(module.parameters()).device
    test = [tuple(t.to(device) for t in zoo.task_data(m.task, "test")) for m in members]
    orig = paired_accuracy(module, originals, test)
    recon = paired_accuracy(module, recon_sds, test)
    orig_acc, recon_acc = float(orig.mean()), float(recon.mean())
    # Members of unseen-class tasks hold head rows for classes the VAE never saw: report them apart.
    kinds = [zoo.task_kind(m.task) for m in members]
    by_kind = {}
    for kind in sorted(set(kinds)):
        idx = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
        o = float(orig[idx].mean())
        by_kind[kind] = float(recon[idx].mean()) / o if o > 0 else None
    return {
        "vae_recon_ratio": recon_acc / orig_acc if orig_acc > 0 else None,
        "vae_recon_ratio_by_kind": by_kind,
        "vae_recon_acc": recon_acc,
        "vae_original_acc": orig_acc,
        "vae_members": len(members),
    }
