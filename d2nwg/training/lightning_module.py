"""Training of the hyper-model with Lightning: the weight VAE first, then latent diffusion.

One `D2NWGModule` trains both stages: steps ``[0, vae_steps)`` train the VAE, the
following ``diffusion_steps`` train the dataset encoder and denoiser on the frozen
VAE's latents. ``d2nwg train`` (and ``train.py fit``) run the stages as **two fits of
this one module that share ``last.ckpt``** (`d2nwg.training.stages.fit_stages`): before each fit
wraps the module for its strategy, `setup` freezes the networks the other stage
trains (``fit_stage``), so each step's graph uses exactly the parameters DDP
synchronises and Lightning's default ``ddp`` strategy needs no
``find_unused_parameters``. The second fit resumes from the checkpoint the first
wrote at the stage boundary, which is exact (below), so a single process trains
bit for bit as one fit over both stages; that single fit (``fit_stage=None``) still
works on one process, and is refused on several.

Under DDP each rank trains on its own shard of the zoo (a ``DistributedSampler``) with
its own RNG stream; the VAE latents are encoded once, a share per rank, and gathered
so that every rank holds the same ones; the EMA follows the synchronised parameters
and is checked to agree across ranks at the end of each fit.

A checkpoint holds the networks, both optimisers and schedulers, the EMA, the
global RNG state and the data loader's place in its epoch, so a run resumed
from it continues at the same step and stage and reproduces the uninterrupted
run (`d2nwg.training.callbacks.ResumeCheckpoint` says when checkpoints are written).
A run resumed in the diffusion stage re-encodes the zoo with the restored,
frozen VAE (encoding draws nothing) and keeps the saved ``latent_scale``.
The module holds only losses, optimisers and the EMA; the networks live in
`d2nwg.models` and sampling in `d2nwg.pipelines.pipeline_d2nwg`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass

import lightning as L
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel
from lightning.pytorch.strategies import FSDPStrategy

from d2nwg.models import ConditionalMean, DatasetEncoder, Denoiser, WeightVAE
from d2nwg.models.conditional_mean import class_means
from d2nwg.targets.architectures import build_model
from d2nwg.targets.heads import check_head_solver, head_inputs, head_module_name
from d2nwg.targets.population import population_logits
from d2nwg.training.distributed import assert_same_on_ranks, fork_rank_rng, gather_rank_states, own_rank_state


@dataclass
class VAESettings:
    """Size and regularisation of the weight VAE."""

    latent_channels: int = 32
    """Latent numbers per latent token (4x compression at merge=4, chunk 32: wider latents decode
    better but diffuse worse; 32 gave the best generated accuracy on digits)."""
    merge: int = 4
    """Weight tokens folded into one latent token."""
    hidden_dim: int = 64
    depth: int = 1
    heads: int = 4
    input_noise: float = 1e-3
    """Std of the noise on normalised input weights (p-diff)."""
    latent_noise: float = 0.1
    """Std of the noise on latents before decoding (p-diff)."""
    kl_weight: float = 1e-6
    function_weight: float = 50.0
    """Weight of the function-space term: KL from the member's predictions to the reconstruction's,
    per sample, on the member's own training samples. Weight-space MSE alone spends the latent on
    the many first-layer numbers and blurs the small head that decides accuracy. 0 turns it off."""
    function_samples: int = 0
    """Samples per class the function-space term runs members on (0: all that the batch draws).
    Fewer make it cheaper where members are expensive to run (text adapters)."""


@dataclass
class EncoderSettings:
    """Size of the Set Transformer dataset encoder."""

    dim: int = 64
    heads: int = 4
    num_inducing: int = 8
    depth: int = 2


@dataclass
class DenoiserSettings:
    """Size of the latent transformer."""

    dim: int = 96
    depth: int = 3
    heads: int = 4


@dataclass
class DiffusionSettings:
    """Noise schedule and conditioning."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "sample"
    """What the denoiser predicts: "sample" (x0; clearly better than "epsilon" on weight latents), "epsilon" or "v_prediction"."""
    cond_dropout: float = 0.1
    """Probability of dropping the dataset condition (trains the unconditional branch for guidance)."""
    ema_decay: float = 0.999


def as_settings(cls, value):
    """Settings from a dataclass or the dict a config file or checkpoint gives back."""
    return value if isinstance(value, cls) else cls(**(asdict(value) if is_dataclass(value) else dict(value)))


class D2NWGModule(L.LightningModule):
    """Trains WeightVAE, then DatasetEncoder + Denoiser, on a `ZooDataModule`.

    Args:
        vae: VAE settings.
        encoder: dataset-encoder settings.
        denoiser: denoiser settings.
        diffusion: schedule, guidance dropout and EMA settings.
        vae_steps: optimiser steps of the VAE stage.
        diffusion_steps: optimiser steps of the diffusion stage.
        vae_lr: AdamW learning rate of the VAE stage.
        diffusion_lr: AdamW learning rate of the diffusion stage.
        weight_decay: AdamW weight decay of both stages.
        head_solver: how the exported pipeline writes classifier heads: ``"lda"`` (default) computes
            each generated body's head from the dataset in that body's feature space, which is what
            generalises to classes no zoo member saw (digits unseen-class tasks: 0.76 with the decoded
            head, 0.96 with LDA; unseen orders unchanged); ``"generated"`` keeps the decoded head.
            Only the export reads it: the networks train the same either way.
        conditional_mean: fit a `d2nwg.models.ConditionalMean` (kernel ridge regression of the members' weight
            tokens on their dataset's per-class mean conditioning features) before training; the VAE and the diffusion model
            then learn each member's residual from it, and the pipeline adds the regression back. For zoos with
            one noisy member per task (`llm-lora`: generated best exact match 0.052 -> 0.544 on 24 held-out
            tasks; docs/results/ablations.md). Needs the zoo's tokens in memory (``data.memory_limit_mb``).
        conditional_mean_ridge: its ridge strength (> 0); ``None`` picks it by leave-one-out error on the members.

    Attributes:
        fit_stage: which stage the next fit runs, set by `d2nwg.training.stages.fit_stages`: ``"vae"`` or
            ``"diffusion"`` (the other stage's networks are frozen and left out of DDP), or None
            (default: one fit over both stages, single process only).
    """

    FIT_STAGES = (None, "vae", "diffusion")

    def __init__(
        self,
        vae: VAESettings = VAESettings(),
        encoder: EncoderSettings = EncoderSettings(),
        denoiser: DenoiserSettings = DenoiserSettings(),
        diffusion: DiffusionSettings = DiffusionSettings(),
        vae_steps: int = 1500,
        diffusion_steps: int = 3000,
        vae_lr: float = 1e-3,
        diffusion_lr: float = 3e-4,
        weight_decay: float = 0.0,
        head_solver: str = "lda",
        conditional_mean: bool = False,
        conditional_mean_ridge: float | None = None,
    ):
        super().__init__()
        check_head_solver(head_solver)  # fail before any training step, not at export
        if conditional_mean_ridge is not None and not conditional_mean_ridge > 0:
            raise ValueError(f"model.conditional_mean_ridge must be > 0, got {conditional_mean_ridge}")
        self.save_hyperparameters()
        self.vae_settings = as_settings(VAESettings, vae)
        self.encoder_settings = as_settings(EncoderSettings, encoder)
        self.denoiser_settings = as_settings(DenoiserSettings, denoiser)
        self.diffusion_settings = as_settings(DiffusionSettings, diffusion)
        self.automatic_optimization = False
        self.vae: WeightVAE | None = None
        self.dataset_encoder: DatasetEncoder | None = None
        self.denoiser: Denoiser | None = None
        self.conditional_mean: ConditionalMean | None = None
        self.ema: EMAModel | None = None
        self.fit_stage: str | None = None
        self.register_buffer("latent_scale", torch.ones(()))

    # ------------------------------------------------------------------ building
    def build(self, num_tokens: int, chunk_size: int, feature_dim: int, num_classes: int) -> None:
        """Create the three networks for a zoo of this geometry (called from `setup`)."""
        vae, enc = self.vae_settings, self.encoder_settings
        vae_config = {k: v for k, v in asdict(vae).items() if not k.startswith("function_")}
        self.vae = WeightVAE(chunk_size=chunk_size, num_tokens=num_tokens, **vae_config)
        self.dataset_encoder = DatasetEncoder(feature_dim=feature_dim, max_classes=num_classes, **asdict(enc))
        self.denoiser = Denoiser(
            latent_channels=vae.latent_channels,
            num_tokens=self.vae.num_latent_tokens,
            cond_dim=enc.dim,
            max_classes=num_classes,
            **asdict(self.denoiser_settings),
        )
        self.ema = EMAModel(self.diffusion_parameters(), decay=self.diffusion_settings.ema_decay)
        self.noise_scheduler = self.make_train_scheduler()

    def setup(self, stage: str) -> None:
        self._rng_restored, self._fit_start = False, 0  # `on_load_checkpoint` sets them when the fit resumes
        if self.vae is None:
            self.setup_networks(self.trainer.datamodule)
        self.freeze_idle_stage()

    def freeze_idle_stage(self) -> None:
        """Freeze the networks that this fit's stage does not train, before the strategy wraps the module."""
        if self.fit_stage not in self.FIT_STAGES:
            raise ValueError(f"fit_stage must be one of {self.FIT_STAGES}, got {self.fit_stage!r}")
        if self.fit_stage is not None:
            vae_stage = self.fit_stage == "vae"
            self.vae.requires_grad_(vae_stage)
            self.dataset_encoder.requires_grad_(not vae_stage)
            self.denoiser.requires_grad_(not vae_stage)

    def setup_networks(self, dm) -> None:
        """Build the networks for ``dm``'s zoo and set the VAE's zoo-mean token offset."""
        self.build(dm.zoo.layout.num_tokens, dm.zoo.layout.chunk_size, dm.feature_dim, dm.num_classes)
        # Fitted in closed form before any step (and refitted identically when a run resumes; the checkpoint keeps
        # a fingerprint to check that): the VAE and the diffusion model learn the residual from it.
        self.prior_tokens = self.fit_conditional_mean(dm)
        with torch.no_grad():
            self.vae.mean_tokens.copy_(self.zoo_mean_tokens(self.residual(dm.tokens)))
        self.check_head_solver(dm)
        self.register_buffer("padding_mask", dm.zoo.layout.padding_mask(), persistent=False)
        self.layout = dm.zoo.layout
        self.condition_features = dm.condition_features
        self.architecture = dm.zoo.architecture

    def fit_conditional_mean(self, dm) -> torch.Tensor | None:
        """Fit `conditional_mean` on ``dm``'s members if enabled; returns its in-sample tokens ``[N, T, chunk]``."""
        if not self.hparams.conditional_mean:
            return None
        if not isinstance(dm.tokens, torch.Tensor):
            raise ValueError(
                "model.conditional_mean needs the zoo's tokens in memory; raise data.memory_limit_mb above "
                f"{dm.zoo.token_bytes(len(dm.tokens)) / 2**20:.0f}"
            )
        # Each member's whole training split, as the dataset encoder sees it (the leading conditioning features).
        embeddings = torch.stack([class_means(per_class, dm.condition_features) for per_class in dm.class_samples])
        regression, fitted = ConditionalMean.fit(
            embeddings, dm.tokens, self.hparams.conditional_mean_ridge, blocks=dm.zoo.input_spec.condition_blocks
        )
        # Not a submodule: DDP would broadcast its buffers (M x T x chunk numbers) every step, and it is
        # refitted rather than restored on resume.
        object.__setattr__(self, "conditional_mean", regression)
        return fitted

    def conditional_mean_fingerprint(self) -> dict | None:
        """What a checkpoint records of the fitted regression, to refuse resuming with another one."""
        if self.conditional_mean is None:
            return None
        return {"ridge": self.conditional_mean.config.ridge, "coef_sum": float(self.conditional_mean.coef.double().abs().sum())}

    def residual(self, tokens, index: torch.Tensor | None = None):
        """``tokens`` minus the conditional mean's fit for those members (``index``: their rows; all if None)."""
        if getattr(self, "prior_tokens", None) is None:
            return tokens
        prior = self.prior_tokens if index is None else self.prior_tokens[index.cpu()]
        return tokens - prior.to(tokens.device)

    def zoo_mean_tokens(self, tokens) -> torch.Tensor:
        """``[1, T, chunk]`` mean of the members' tokens (in memory, or streamed from disk a share per rank)."""
        if isinstance(tokens, torch.Tensor):
            return tokens.mean(0, keepdim=True)
        start, stop = self.rank_share(len(tokens))
        total = tokens.sum(start, stop).to(self.trainer.strategy.root_device)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")  # float64 sums, added across ranks
        return (total / len(tokens)).float().cpu()[None]

    def rank_share(self, n: int) -> tuple[int, int]:
        """``[start, stop)``: this rank's consecutive share of ``n`` members (ceil(n / world) each; the last may be short)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per = -(-n // world)
        return min(n, rank * per), min(n, (rank + 1) * per)

    def check_head_solver(self, dm) -> None:
        """Fail before training, not at export, when the zoo's layout has no classifier head to solve."""
        if self.hparams.head_solver == "generated":
            return
        zoo = dm.zoo
        member = zoo.members("train")[0]
        x, _ = zoo.task_data(member.task, "support")
        try:
            with torch.random.fork_rng(devices=[]):  # building a model draws weights: keep training's RNG stream as is
                model = build_model(zoo.architecture).eval()
            head_inputs(model, head_module_name(zoo.layout.head_names()), zoo.load_member(member), x)
        except ValueError as err:
            raise ValueError(
                f"head_solver {self.hparams.head_solver!r} cannot write this zoo's heads ({err}); "
                "set model.head_solver=generated"
            ) from None

    def make_train_scheduler(self) -> DDPMScheduler:
        d = self.diffusion_settings
        # clip_sample=False: latents of weights are not images in [-1, 1].
        return DDPMScheduler(
            num_train_timesteps=d.num_train_timesteps,
            beta_schedule=d.beta_schedule,
            prediction_type=d.prediction_type,
            clip_sample=False,
        )

    def make_sample_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.noise_scheduler.config, clip_sample=False)

    def diffusion_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.dataset_encoder.parameters(), *self.denoiser.parameters()]

    def configure_optimizers(self):
        h = self.hparams
        vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=h.vae_lr, weight_decay=h.weight_decay)
        diff_opt = torch.optim.AdamW(self.diffusion_parameters(), lr=h.diffusion_lr, weight_decay=h.weight_decay)
        vae_sched = torch.optim.lr_scheduler.CosineAnnealingLR(vae_opt, max(h.vae_steps, 1), eta_min=h.vae_lr * 0.05)
        diff_sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            diff_opt, max(h.diffusion_steps, 1), eta_min=h.diffusion_lr * 0.05
        )
        return [vae_opt, diff_opt], [vae_sched, diff_sched]

    # ------------------------------------------------------------------ stages
    @property
    def in_vae_stage(self) -> bool:
        return self.global_step < self.hparams.vae_steps

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        index, tokens, samples = batch
        vae_opt, diff_opt = self.optimizers()
        vae_sched, diff_sched = self.lr_schedulers()
        vae_stage = self.in_vae_stage
        if vae_stage:
            losses = self.vae_loss(tokens, samples, index)
            opt, sched = vae_opt, vae_sched
            self.log_dict({f"vae/{k}": v for k, v in losses.items()}, prog_bar=True, sync_dist=True)
        else:
            if getattr(self, "latents", None) is None:
                self.freeze_vae()
            losses = self.diffusion_loss(self.latents[index], samples[..., : self.condition_features])
            opt, sched = diff_opt, diff_sched
            self.log_dict({f"diffusion/{k}": v for k, v in losses.items()}, prog_bar=True, sync_dist=True)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        if not vae_stage:
            self.ema.step(self.diffusion_parameters())
        return losses["loss"]

    def vae_loss(self, tokens: torch.Tensor, samples: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Weight-space VAE loss plus, if enabled, the function-space KL on the members' samples ``[B, K, S, D]``.
        With a conditional mean the VAE sees the members' residuals (``index``: their rows in the zoo)."""
        residual = self.residual(tokens, index)
        output = self.vae(residual)
        losses = self.vae.loss(residual, self.padding_mask, output=output)
        weight = self.vae_settings.function_weight
        if weight > 0:
            if getattr(self, "target", None) is None:
                # The members' architecture, built on first use (a run resumed past the VAE stage never
                # needs it) and run functionally with reconstructed weights. Not a submodule: not trained, not saved.
                # A fresh run builds it at step 0 from the global RNG; a resumed run must not draw again (its
                # RNG state is the saved one), so later builds leave the RNG as they found it.
                with torch.random.fork_rng(devices=[], enabled=self.global_step > 0):
                    object.__setattr__(self, "target", build_model(self.architecture).to(self.device))
            per_class = self.vae_settings.function_samples or samples.shape[2]
            inputs = samples[:, :, :per_class].flatten(1, 2)  # (B, K*S, D); samples are drawn in random order
            with torch.no_grad():
                reference = population_logits(self.target, self.layout.unflatten(tokens), inputs).log_softmax(-1)
            predicted = output[0] + (tokens - residual)  # the conditional mean added back (zero without one)
            predicted = population_logits(self.target, self.layout.unflatten(predicted), inputs).log_softmax(-1)
            kl = torch.nn.functional.kl_div(predicted.flatten(0, 1), reference.flatten(0, 1), log_target=True, reduction="batchmean")
            losses["function_kl"] = kl
            losses["loss"] = losses["loss"] + weight * kl
        return losses

    @torch.no_grad()
    def freeze_vae(self) -> None:
        """End of the VAE stage: freeze it, encode the zoo once and scale latents to unit std."""
        self.vae.eval().requires_grad_(False)
        latents = self.encode_zoo(self.residual(self.trainer.datamodule.tokens))  # (N, L, C) means, the same on every rank
        if self.latent_scale.item() == 1.0:  # a resumed run keeps the scale it trained with
            self.latent_scale.fill_(1.0 / latents.std().clamp_min(1e-6).item())
        self.latents = latents * self.latent_scale

    @torch.no_grad()
    def encode_zoo(self, tokens) -> torch.Tensor:
        """Latent means ``[N, L, C]`` of every member. Under DDP each rank encodes its `rank_share` and all
        ranks gather all shares, so every rank holds the same latents (and encodes 1/world of the zoo)."""
        if isinstance(tokens, torch.Tensor) and self.trainer.world_size == 1:
            tokens = tokens.to(self.device)
            return torch.cat([self.vae.encode(chunk)[0] for chunk in tokens.split(256)])
        n, world = len(tokens), self.trainer.world_size
        chunk = 256 if isinstance(tokens, torch.Tensor) else tokens.members_per_chunk()
        start, stop = self.rank_share(n)
        per = -(-n // world)
        mine = torch.zeros(per, self.vae.num_latent_tokens, self.vae_settings.latent_channels, device=self.device)
        for a in range(start, stop, chunk):
            b = min(a + chunk, stop)
            mine[a - start : b - start] = self.vae.encode(tokens[a:b].to(self.device))[0]
        if world == 1:
            return mine
        return self.all_gather(mine).flatten(0, 1)[:n]  # (world, per, L, C) -> (N, L, C)

    def diffusion_loss(self, latents: torch.Tensor, class_sets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Denoising loss on scaled latents ``[B, L, C]``, with condition dropout for guidance."""
        b = latents.shape[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        class_tokens, pooled = self.dataset_encoder(class_sets)  # (B, K, D), (B, D)
        drop = torch.rand(b, device=self.device) < self.diffusion_settings.cond_dropout
        null_tokens, null_pooled = self.denoiser.null_condition(b, class_tokens.shape[1])
        class_tokens = torch.where(drop[:, None, None], null_tokens, class_tokens)
        pooled = torch.where(drop[:, None], null_pooled, pooled)
        pred = self.denoiser(noisy, t, class_tokens, pooled)
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = latents
        loss = torch.nn.functional.mse_loss(pred, target)
        return {"loss": loss}

    # ------------------------------------------------------------------ checkpoint / export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["conditional_mean"] = self.conditional_mean_fingerprint()
        # The global RNG drives the conditioning samples, noise, timesteps and condition dropout: with it
        # (and the data loader's place in its epoch, `d2nwg.training.datamodule.ResumableLoader`) a resumed run
        # continues exactly as an uninterrupted one.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        ranks = gather_rank_states(dict(checkpoint["rng"]))  # under DDP each rank draws its own stream
        if ranks is not None:
            checkpoint["rng"]["ranks"] = ranks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, now = checkpoint.get("conditional_mean"), self.conditional_mean_fingerprint()
        same = saved == now or (
            saved and now and saved["ridge"] == now["ridge"] and abs(saved["coef_sum"] - now["coef_sum"]) <= 1e-6 * now["coef_sum"]
        )
        if not same:
            def describe(f):
                return "no conditional mean" if not f else f"a conditional mean with ridge {f['ridge']:g}"

            raise ValueError(
                f"the checkpoint was trained with {describe(saved)}, this run fits {describe(now)} "
                "(model.conditional_mean / model.conditional_mean_ridge, or another zoo); resume with the same settings"
            )
        self._pending_ema = checkpoint.get("ema")
        self._fit_start = int(checkpoint.get("global_step", 0))  # the loops' step is restored only after `on_fit_start`
        # Restored here, after `setup` built the networks (which draws) and before the first batch.
        rng = checkpoint.get("rng") or {}
        own = own_rank_state(rng.get("ranks"))
        if own is not None:
            rng, self._rng_restored = own, True
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def on_fit_start(self) -> None:
        start, end, world = self._fit_start, self.trainer.max_steps, self.trainer.world_size
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Not exercised anywhere yet: the EMA update, gradient clipping and the zoo encoding run on whole
            # parameters inside a training step, where FSDP holds shards. Refuse rather than fail mid-run.
            raise ValueError("strategy fsdp is not supported yet (EMA and clipping need whole parameters); use --strategy ddp")
        if self.fit_stage is None and world > 1 and start < self.hparams.vae_steps < end:
            raise ValueError(
                f"one fit over both stages cannot run on {world} processes (the idle stage's networks would be "
                "unused parameters); train with `d2nwg train` or `d2nwg.training.stages.fit_stages`, which run one fit per stage"
            )
        if self.fit_stage == "vae" and end > self.hparams.vae_steps or self.fit_stage == "diffusion" and start < self.hparams.vae_steps:
            raise ValueError(f"a {self.fit_stage}-stage fit cannot run steps [{start}, {end}) (vae_steps={self.hparams.vae_steps})")
        if not self._rng_restored:
            fork_rank_rng()  # a fresh run: each rank its own stream (a resumed one restored its own)

    def on_train_start(self) -> None:
        per_rank = self.trainer.datamodule.hparams.batch_size
        sizes = {"batch_size/per_rank": float(per_rank), "batch_size/effective": float(per_rank * self.trainer.world_size)}
        for logger in self.loggers:  # rank zero only, like every Lightning logger
            logger.log_metrics(sizes, step=self.global_step)
        self.load_pending_ema()

    def load_pending_ema(self) -> None:
        """Load the EMA weights a restored checkpoint carried (`on_load_checkpoint` keeps them until the EMA sits on
        the module's device; a fit resumed at its last step never starts training, so the export loads them)."""
        self.ema.to(self.device)
        pending = getattr(self, "_pending_ema", None)
        if pending is not None:
            self.ema.load_state_dict(pending)
            self._pending_ema = None

    def on_train_end(self) -> None:
        # Cheap proof that data parallelism kept the ranks in step: per-tensor sums of the EMA and latents.
        assert_same_on_ranks(torch.stack([p.double().sum() for p in self.ema.shadow_params]), "the EMA weights")
        if getattr(self, "latents", None) is not None:
            assert_same_on_ranks(self.latents.double().sum((1, 2)), "the cached VAE latents")

    def export_conditional_mean(self) -> ConditionalMean | None:
        """A copy of the fitted `ConditionalMean` for a pipeline, or ``None`` when it is off."""
        import copy

        return None if self.conditional_mean is None else copy.deepcopy(self.conditional_mean).eval().requires_grad_(False)

    def export_networks(self) -> tuple[WeightVAE, DatasetEncoder, Denoiser]:
        """The VAE (with its latent scale) and EMA copies of the encoder and denoiser, for a pipeline."""
        import copy

        self.load_pending_ema()
        vae = copy.deepcopy(self.vae).eval()
        vae.register_to_config(scaling_factor=float(self.latent_scale))
        encoder, denoiser = copy.deepcopy(self.dataset_encoder).eval(), copy.deepcopy(self.denoiser).eval()
        self.ema.copy_to([*encoder.parameters(), *denoiser.parameters()])
        for net in (vae, encoder, denoiser):
            net.requires_grad_(False)
        return vae, encoder, denoiser
