"""`D2NWGPipeline`: dataset in, weights out.

The pipeline holds the trained parts (weight VAE, dataset encoder, denoiser,
sampling scheduler) and a *target* description (architecture spec, weight
layout, input spec) so that generated weights can be injected into a freshly
built model. It saves and loads like any diffusers pipeline.

The diffusion model generates whole weight sets. With ``head_solver="lda"`` (the
default of newly trained pipelines) the classifier head of every generated set is
then rewritten from the dataset itself: a shrinkage-LDA head (`d2nwg.targets.heads.lda_cv_head`,
shrinkage chosen by cross-validation on the same samples) on their features in that
generated body's feature space. Row i of the head is thus computed from class i's
samples, not recalled for a class the zoo memorised, which is what lets a pipeline
serve datasets with classes no zoo member saw (measured on digits: 0.76 -> 0.96 on
unseen-class tasks, unchanged on new orders of seen classes; docs/results/ablations.md,
"Digits: who writes the head").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput
from torch import nn

from d2nwg.data.labelled import to_xy
from d2nwg.models import ConditionAnchor, ConditionalMean, DatasetEncoder, Denoiser, WeightVAE
from d2nwg.targets.architectures import build_model
from d2nwg.targets.heads import HEAD_SOLVERS, check_head_solver, head_inputs, head_module_name, with_head
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.specs import TargetSpec

PIPELINE_COMPONENTS = ("vae", "dataset_encoder", "denoiser", "scheduler")
"""The components every pipeline folder holds; ``conditional_mean`` and ``condition_anchor`` are optional."""

COMPONENT_CLASSES = {
    "vae": WeightVAE, "dataset_encoder": DatasetEncoder, "denoiser": Denoiser, "conditional_mean": ConditionalMean,
    "condition_anchor": ConditionAnchor,
}
"""The only class each network component of ``model_index.json`` may name (diffusers imports what it names)."""


def check_pipeline_folder(
    path: Path, optional: Sequence[str], trust_remote_code: bool | None = None, hub_cache: bool = False
) -> dict:
    """Check a pipeline folder before diffusers reads it; returns its parsed ``model_index.json``.

    diffusers imports the ``[library, class]`` each component of ``model_index.json`` names, so a
    hostile index could make it import any module. Here every component must name its d2nwg class
    (`COMPONENT_CLASSES`) or, for ``scheduler``, a diffusers scheduler; no other key may name a component;
    no entry of the folder may link outside it (a Hub cache snapshot's links into its ``blobs/`` are
    expected); and the target architecture passes `d2nwg.security.check_architecture_spec`.

    Args:
        path: the pipeline folder.
        optional: the components that may be ``[null, null]`` or absent.
        trust_remote_code: consent to a ``"module:callable"`` target architecture (``None``: the ambient one).
        hub_cache: ``path`` is a snapshot in the Hub cache.

    Raises:
        d2nwg.security.RemoteCodeError, d2nwg.security.UnsafePathError, ValueError: one line each.
    """
    import diffusers

    from d2nwg.pipelines.hub import cache_blobs
    from d2nwg.security import check_architecture_spec, check_folder_links, printable
    from d2nwg.utils.io import read_json

    missing = [c for c in (*PIPELINE_COMPONENTS, "model_index.json") if not (path / c).exists()]
    if missing:
        raise ValueError(f"pipeline folder {path} is missing component(s): {', '.join(missing)}")
    check_folder_links(path, "pipeline folder", cache_blobs(path) if hub_cache else None)
    index = read_json(path / "model_index.json", "pipeline index")
    if not isinstance(index, dict) or index.get("_class_name") != "D2NWGPipeline":
        found = index.get("_class_name") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path / 'model_index.json'} is not a d2nwg pipeline index (class {printable(found)})")
    for key, value in index.items():
        names_component = isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)
        if key.startswith("_") or not names_component:
            continue
        library, name = value
        if key in optional and library is None and name is None:
            continue
        if key == "scheduler":
            plain = isinstance(name, str) and name.isidentifier() and not name.startswith("_")
            found = getattr(diffusers, name, None) if library == "diffusers" and plain else None
            ok = isinstance(found, type) and issubclass(found, SchedulerMixin)
        else:
            cls = COMPONENT_CLASSES.get(key)
            ok = cls is not None and name == cls.__name__ and library in ("d2nwg.models", cls.__module__)
        if not ok:
            raise ValueError(
                f"{path / 'model_index.json'} names {printable(f'{library}.{name}')} for component {printable(key)}; "
                "a d2nwg pipeline loads only its own networks and diffusers schedulers"
            )
    missing = [c for c in optional if (index.get(c) or [None])[0] and not (path / c).exists()]
    if missing:
        raise ValueError(f"pipeline folder {path} is missing component(s): {', '.join(missing)}")
    target = index.get("target")
    if target:
        if not isinstance(target, dict):
            raise ValueError(f"{path / 'model_index.json'} has a malformed target")
        check_architecture_spec(target.get("architecture"), f"pipeline {path}", trust_remote_code)
    return index


@dataclass
class D2NWGOutput(BaseOutput):
    """Generated weights: one state_dict per sample, and the raw weight tokens ``[N, T, chunk]``."""

    weights: list[dict[str, torch.Tensor]]
    tokens: torch.Tensor


def pad_class_sets(per_class: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class samples ``[n_c, D]`` -> padded ``x [1, K, S, D]`` and ``mask [1, K, S]`` (True = real)."""
    if not per_class:
        raise ValueError("the dataset has no classes")
    for i, x in enumerate(per_class):
        if x.dim() != 2 or len(x) == 0:
            raise ValueError(f"class {i} must be a non-empty [n, D] tensor, got shape {list(x.shape)}")
    s = max(len(x) for x in per_class)
    x = torch.zeros(1, len(per_class), s, per_class[0].shape[1])
    mask = torch.zeros(1, len(per_class), s, dtype=torch.bool)
    for i, samples in enumerate(per_class):
        x[0, i, : len(samples)] = samples.float()
        mask[0, i, : len(samples)] = True
    return x, mask


class D2NWGPipeline(DiffusionPipeline):
    """Generates weights of the target architecture for a labelled dataset.

    Args:
        vae: decodes latents into weight tokens.
        dataset_encoder: embeds per-class samples into conditioning tokens.
        denoiser: predicts the clean latents x0 from noisy ones (``prediction_type="sample"``, the
            default of `d2nwg.training.lightning_module.DiffusionSettings`; the scheduler's config says which).
        scheduler: any diffusers scheduler (DDIM by default; clip_sample must be off).
        target: what is generated, a `d2nwg.zoo.specs.TargetSpec` or its ``to_dict()`` (architecture spec,
            layout dict, num_classes, input spec). Stored as that plain dict in ``model_index.json``;
            read it typed with `target_spec`.
        head_solver: ``"generated"`` keeps the decoded head; ``"lda"`` or ``"class_mean"`` rewrites it
            from the dataset in each generated body's feature space (`d2nwg.targets.heads.HEAD_SOLVERS`).
            Pipelines saved before this option existed load as ``"generated"``.
        conditional_mean: optional `d2nwg.models.ConditionalMean`; when present, the VAE decodes a residual and
            every sample is that residual plus the regression's tokens for the dataset (CorrDiff's split).
            Pipelines without it (all those saved before it existed) decode whole weights.
        provenance: where the pipeline came from (`d2nwg.training.provenance.training_provenance`: training config,
            steps per stage, the zoo's name, member count and fingerprint, the d2nwg version, and the VAE
            reconstruction ratio and zoo spacing measured at export). Stored in ``model_index.json``; read it
            as `provenance`. ``None`` in pipelines exported before it was recorded.
        condition_anchor: optional `d2nwg.models.ConditionAnchor`: the adapter at which a causal-LM dataset's
            gradient block is taken (`d2nwg.targets.causal_lm.conditioning.gradient_condition`), for zoos built with that pooling.

    Example:
        >>> pipe = D2NWGPipeline.from_pretrained("runs/demo/run/pipeline")  # doctest: +SKIP
        >>> out = pipe(dataset=[x_class0, x_class1, ...], num_samples=10,   # doctest: +SKIP
        ...            generator=torch.Generator().manual_seed(0))
        >>> model = pipe.build_model(out.weights[0])                        # doctest: +SKIP
    """

    model_cpu_offload_seq = "dataset_encoder->denoiser->vae"
    _optional_components = ["conditional_mean", "condition_anchor"]
    hub_snapshot = None
    """The `d2nwg.pipelines.hub.HubSnapshot` (repo, commit, whether the cache was used) of a pipeline loaded by repo id."""

    def __init__(
        self,
        vae: WeightVAE,
        dataset_encoder: DatasetEncoder,
        denoiser: Denoiser,
        scheduler: SchedulerMixin,
        target: TargetSpec | dict | None = None,
        head_solver: str = "generated",
        provenance: dict | None = None,
        conditional_mean: ConditionalMean | None = None,
        condition_anchor: ConditionAnchor | None = None,
    ):
        super().__init__()
        check_head_solver(head_solver)
        if isinstance(target, TargetSpec):
            target = target.to_dict()  # diffusers stores init kwargs as JSON
        self.register_modules(
            vae=vae, dataset_encoder=dataset_encoder, denoiser=denoiser, scheduler=scheduler, conditional_mean=conditional_mean,
            condition_anchor=condition_anchor,
        )
        self.register_to_config(target=target, head_solver=head_solver, provenance=provenance)
        self._layout = WeightLayout.from_dict(target["layout"]) if target else None

    # ------------------------------------------------------------------ target
    @property
    def target_spec(self) -> TargetSpec:
        """The ``target`` config, typed (older targets without an input ``kind`` are inferred)."""
        if not self.config.target:
            raise ValueError("this pipeline has no target")
        return TargetSpec.from_dict(self.config.target)

    @property
    def hub_record(self) -> dict | None:
        """``{"repo_id", "revision", "commit", "cached"}`` of a pipeline loaded by Hub repo id, else ``None``;
        output folders and reports keep it so that a result names the commit it came from."""
        return None if self.hub_snapshot is None else self.hub_snapshot.to_dict()

    @property
    def provenance(self) -> dict | None:
        """The recorded origin of this pipeline (see the class docstring), or ``None`` if it has none."""
        return self.config.get("provenance")

    @property
    def layout(self) -> WeightLayout:
        if self._layout is None:
            raise ValueError("this pipeline has no target layout")
        return self._layout

    @property
    def num_classes(self) -> int:
        return self.target_spec.num_classes

    def build_model(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A fresh module of the target architecture, with ``weights`` injected if given."""
        model = build_model(self.target_spec.architecture)
        if weights is not None:
            self.layout.inject(model, weights)
        return model.eval()

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_dataset(self, dataset: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class features (label order) -> ``(class_tokens [1, K, D], pooled [1, D])``."""
        x, mask = self.padded_dataset(dataset)
        return self.dataset_encoder(x.to(self.device), mask.to(self.device))

    def padded_dataset(self, dataset: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class features -> the conditioning features as ``x [1, K, S, D]`` and ``mask [1, K, S]`` (`pad_class_sets`).

        Raises:
            ValueError: a class count or feature width that does not match the pipeline.
        """
        if len(dataset) != self.num_classes:
            raise ValueError(
                f"the dataset has {len(dataset)} classes but this pipeline generates {self.num_classes}-class models"
            )
        n = self.target_spec.input.condition_features
        x, mask = pad_class_sets([s[:, :n] if s.dim() == 2 else s for s in dataset] if n else dataset)
        expected = self.dataset_encoder.config.feature_dim
        if x.shape[-1] != expected:
            raise ValueError(f"samples have {x.shape[-1]} features, the pipeline expects {expected}")
        return x, mask

    @torch.no_grad()
    def prior_tokens(self, dataset: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The conditional mean's tokens ``[1, T, chunk]`` for ``dataset`` (per-class ``[n_c, D]``), or ``None``
        for a pipeline without one."""
        if self.conditional_mean is None:
            return None
        x, mask = self.padded_dataset(dataset)
        return self.conditional_mean(x.to(self.device), mask.to(self.device)).float().cpu()

    def anchor_state(self) -> dict[str, torch.Tensor]:
        """The adapter a dataset's gradient block is taken at (`ConditionAnchor`).

        Raises:
            ValueError: the pipeline has none (its zoo was not built with gradient conditioning).
        """
        if self.condition_anchor is None:
            raise ValueError("this pipeline has no condition_anchor: its zoo does not condition on task gradients")
        return self.condition_anchor.state(self.layout)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        dataset: Sequence[torch.Tensor],
        num_samples: int = 10,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> D2NWGOutput | tuple:
        """Generate ``num_samples`` weight sets for ``dataset``.

        Args:
            dataset: per-class samples in label order, each ``[n_c, D]`` features.
            num_samples: weight sets to generate.
            num_inference_steps: denoising steps of the scheduler.
            guidance_scale: classifier-free guidance; 1.0 disables it.
            generator: makes sampling reproducible.
            return_dict: return a `D2NWGOutput` (else a ``(weights, tokens)`` tuple).

        Returns:
            ``D2NWGOutput(weights, tokens)``: ``num_samples`` state_dicts of the layout's tensors
            (float32, on the CPU), heads rewritten by ``head_solver`` unless it is ``"generated"``,
            and the decoded weight tokens ``[num_samples, T, chunk]`` (before any head rewrite).
            The same seed and inputs give bit-identical weights.

        Raises:
            ValueError: ``num_samples`` or ``num_inference_steps`` below 1, or a dataset whose class count or
                feature width does not match the pipeline.
        """
        if num_samples < 1 or num_inference_steps < 1:
            raise ValueError(f"num_samples and num_inference_steps must be >= 1, got {num_samples} and {num_inference_steps}")
        # 1. Condition on the dataset, and on nothing for guidance.
        class_tokens, pooled = self.encode_dataset(dataset)
        class_tokens = class_tokens.expand(num_samples, -1, -1)
        pooled = pooled.expand(num_samples, -1)
        guided = guidance_scale != 1.0
        if guided:
            null_tokens, null_pooled = self.denoiser.null_condition(num_samples, class_tokens.shape[1])
            class_tokens = torch.cat([null_tokens, class_tokens])
            pooled = torch.cat([null_pooled, pooled])
        # 2. Start from noise (drawn on the CPU so a seed gives the same weights on any device).
        cfg = self.denoiser.config
        latents = torch.randn(num_samples, cfg.num_tokens, cfg.latent_channels, generator=generator)
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        # 3. Denoise.
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if guided else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            pred = self.denoiser(model_in, t.reshape(1), class_tokens, pooled)
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents).prev_sample
        # 4. Decode latents into weight tokens (a residual, if there is a conditional mean), then into state_dicts.
        tokens = self.vae.decode(latents / self.vae.config.scaling_factor).cpu()
        prior = self.prior_tokens(dataset)
        if prior is not None:
            tokens = tokens + prior
        weights = self.layout.detokenize(tokens)
        # 5. Rewrite each head from the dataset in its generated body's feature space.
        if self.config.head_solver != "generated":
            weights = [self.solve_head(w, dataset) for w in weights]
        if not return_dict:
            return weights, tokens
        return D2NWGOutput(weights=weights, tokens=tokens)

    def set_head_solver(self, head_solver: str) -> None:
        """Switch how heads are written (``"generated"``, ``"lda"`` or ``"class_mean"``); saved with the pipeline.

        Raises:
            ValueError: an unknown name.
        """
        check_head_solver(head_solver)
        self.register_to_config(head_solver=head_solver)

    def solve_head(self, weights: dict[str, torch.Tensor], dataset: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``weights`` with the head computed by ``head_solver`` from ``dataset`` (per-class ``[n_c, D]``
        samples in label order) in the feature space of the body that ``weights`` hold."""
        module = self._solver_module()
        head_names = self.layout.head_names()
        x, y = to_xy([s.float() for s in dataset])
        features = head_inputs(module, head_module_name(head_names), weights, x)
        weight, bias = HEAD_SOLVERS[self.config.head_solver](features, y, len(dataset))
        # Keep the decoded head's scale: the solved rows decide *which* class wins, while the logit
        # scale (how confident the model is, how far the weights sit from the zoo's) stays the
        # generator's. Multiplying weight and bias by one positive factor never changes a prediction.
        decoded = next(weights[n] for n in head_names if n.endswith("weight"))
        scale = decoded.norm() / weight.norm().clamp_min(1e-12)
        return with_head(weights, head_names, weight * scale, bias * scale)

    def _solver_module(self) -> nn.Module:
        # Built once per target (`use_base` may change it): the body is swapped in functionally, so one
        # module serves every sample.
        key = json.dumps(self.config.target["architecture"], sort_keys=True)
        cached = getattr(self, "_head_module", None)
        if cached is None or cached[0] != key:
            self._head_module = (key, self.build_model())
        return self._head_module[1]

    # ------------------------------------------------------------------ saving / loading
    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        report_dir: str | Path | None = None,
        token: str | None = None,
        commit_message: str = "Upload d2nwg pipeline",
    ) -> str:
        """Save, then upload to ``repo_id`` with a model card (results and plots from ``report_dir``)."""
        import tempfile

        from d2nwg.evaluation.model_card import model_card
        from d2nwg.pipelines.hub import push_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_pipeline(
                tmp, repo_id, card=model_card, private=private, report_dir=report_dir, token=token,
                commit_message=commit_message,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        trust_remote_code: bool | None = None,
        **kwargs,
    ) -> D2NWGPipeline:
        """Load from a local folder, or from a Hub repo id via ``snapshot_download`` first.

        The folder is checked before diffusers reads it (`check_pipeline_folder`): its ``model_index.json``
        may name only d2nwg's own components and a diffusers scheduler, no entry may link outside the
        folder, and a target architecture named as ``"module:callable"`` needs ``trust_remote_code``.

        Args:
            pretrained_model_name_or_path: a pipeline folder, or a Hub repo id ``user/name``.
            revision: the branch, tag or commit of a Hub repo (``None``: ``main``); refused for a local folder.
            trust_remote_code: allow a ``"module:callable"`` target architecture to be imported (it runs that
                module's code); ``None`` uses the ambient consent (`d2nwg.security.trust_remote_code`).
            kwargs: passed on to ``DiffusionPipeline.from_pretrained``.

        Returns:
            The pipeline; `hub_snapshot` records the commit of a Hub download (``None`` for a local folder).

        Raises:
            d2nwg.security.RemoteCodeError: the target names code and consent is missing.
            d2nwg.security.UnsafePathError: an entry of the folder links outside it.
            ValueError: a missing folder or component, an index naming other classes, or an unreachable repo.
        """
        path = Path(pretrained_model_name_or_path)
        snapshot = None
        if path.is_dir():
            if revision is not None:
                raise ValueError(f"--revision applies to Hub repo ids; {path} is a local folder")
        else:
            from d2nwg.pipelines.hub import download_pipeline

            snapshot = download_pipeline(str(pretrained_model_name_or_path), revision=revision)
            path = snapshot.path
        check_pipeline_folder(path, cls._optional_components, trust_remote_code, hub_cache=snapshot is not None)
        from diffusers.utils import logging as diffusers_logging

        from d2nwg.errors import one_line
        from d2nwg.utils.console import hidden_progress_bars

        try:
            with hidden_progress_bars(diffusers_logging):  # no "Loading pipeline components" bar on stderr
                pipe = super().from_pretrained(str(path), **kwargs)
        except (OSError, EnvironmentError, KeyError) as err:
            raise ValueError(f"cannot load pipeline from {path}: {one_line(err)}") from None
        # Loaded tensors point into the safetensors buffer at 8-byte offsets; CPU kernels round differently on
        # such unaligned memory, so copy them into fresh (aligned) storage: the loaded pipeline then samples
        # bit-identically to the one that was saved.
        with torch.no_grad():
            for net in (pipe.vae, pipe.dataset_encoder, pipe.denoiser, pipe.conditional_mean, pipe.condition_anchor):
                if net is None:
                    continue
                for tensor in (*net.parameters(), *net.buffers()):
                    tensor.data = tensor.data.clone()
        pipe.set_progress_bar_config(disable=True)
        pipe.hub_snapshot = snapshot
        return pipe
