"""Provenance: where a pipeline came from, recorded at export and shown by ``d2nwg evaluate`` and the model card.

A pipeline's run logs hold its config and step counts, but the pipeline folder travels alone (to the Hub,
to a colleague). `training_provenance` therefore records, in ``model_index.json`` (the pipeline's
``provenance`` init kwarg; `d2nwg.pipelines.pipeline_d2nwg.D2NWGPipeline.provenance` reads it back)::

    {"d2nwg_version": "0.1.0",
     "steps": {"vae": 1500, "diffusion": 3000},           # optimiser steps each stage ran
     "config": {...},                                    # the full LightningCLI config (model, data, trainer, seed)
     "zoo": {"name", "recipe", "path", "members", "split", "trained_on", "fingerprint", "nn_distance",
             "member_training"},                         # the last for causal-LM adapter zoos only
     "vae_recon_ratio": 0.94}                            # measured at export on EXPORT_VAE_MEMBERS members

``zoo.fingerprint`` is ``sha256:`` plus 16 hex digits over the zoo's layout and every member's id, split,
task and file bytes: a zoo rebuilt, re-ingested or with one member retrained gets another. ``nn_distance``
(the zoo's nearest-neighbour spacing, `d2nwg.evaluation.trust.zoo_spacing`) and ``vae_recon_ratio`` let
``d2nwg generate`` run the trust checks of `d2nwg.evaluation.trust` without the zoo; ``member_training`` (how the members
trained, `d2nwg.targets.causal_lm.finetune.member_training`) sets ``d2nwg generate --finetune-steps``' learning rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

FINGERPRINT_DIGITS = 16
EXPORT_VAE_MEMBERS = 64
"""Members whose reconstruction an export measures (`d2nwg.evaluation.diagnostics.vae_reconstruction`; held-out ones first): a
mean ratio needs no more, and each causal-LM member costs two scorings of its test split (200 members: about 130 s
of the default ``llm-lora`` training, scaled from a profile of a 20-task zoo). ``d2nwg evaluate`` still measures up to 200."""
"""Hex digits of the sha256 kept (64 bits: enough to tell zoos apart, short enough to print)."""


def d2nwg_version() -> str:
    """The installed d2nwg version (the package's ``__version__`` when it is run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("d2nwg")
    except PackageNotFoundError:
        import d2nwg

        return d2nwg.__version__


def zoo_fingerprint(zoo) -> str:
    """``sha256:<16 hex>`` over the zoo's layout and each member's id, split, task and file bytes (sorted by id)."""
    digest = hashlib.sha256(json.dumps(zoo.layout.to_dict(), sort_keys=True).encode())
    for member in sorted(zoo.members(), key=lambda m: m.id):
        digest.update(f"\n{member.id}\t{member.split}\t{member.task}\n".encode())
        with open(zoo.root / member.file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:FINGERPRINT_DIGITS]


def zoo_record(zoo, split: str = "train", seed: int = 0) -> dict:
    """The ``zoo`` entry of a provenance: name, recipe, path, member counts, fingerprint, spacing and, for causal-LM
    adapter zoos, ``member_training``."""
    from d2nwg.evaluation.trust import flat_tokens, streamed_zoo_spacing

    members = zoo.members(split)
    extra = {}
    if zoo.architecture.get("name") == "causal-lm-adapter":  # what `d2nwg generate --finetune-steps` repeats
        from d2nwg.targets.causal_lm.finetune import member_training

        extra["member_training"] = member_training(zoo.manifest.get("recipe"), zoo.architecture["config"].get("kind", "lora"))
    return {
        "name": zoo.root.name,
        "recipe": (zoo.manifest.get("recipe") or {}).get("name", "custom"),
        "path": str(zoo.root),
        "members": len(zoo),
        "split": split,
        "trained_on": len(zoo.members(split)),
        "fingerprint": zoo_fingerprint(zoo),
        # Read in chunks: zoos larger than memory train member by member and must export the same way.
        "nn_distance": streamed_zoo_spacing(
            len(members), lambda index: flat_tokens(zoo.layout, [zoo.load_member(members[int(i)]) for i in index]), seed
        ),
        **extra,
    }


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (dataclasses as dicts, anything else unknown as its ``str``)."""

    def default(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def training_config(trainer, module, datamodule) -> dict:
    """The run's full config as LightningCLI parsed it (model, data, trainer, checkpoint, seed), or, for a
    ``Trainer`` built by hand, the module's and data module's hyperparameters."""
    from lightning.pytorch.cli import SaveConfigCallback

    saved = next((c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)), None)
    if saved is not None:
        return _jsonable(saved.config.as_dict())
    return _jsonable({"model": dict(module.hparams), "data": dict(getattr(datamodule, "hparams", {}))})


def training_provenance(trainer, module, pipe, seed: int = 0) -> dict:
    """The provenance of a pipeline exported at the end of ``trainer``'s fit (see the module docstring).

    Args:
        trainer: the finished ``lightning.Trainer`` (its data module holds the zoo).
        module: the trained `d2nwg.training.lightning_module.D2NWGModule`.
        pipe: the exported pipeline; its VAE is measured on the zoo (`vae_recon_ratio`).
        seed: seeds the member subsets of the VAE and spacing measurements (as ``d2nwg evaluate --seed``).

    Returns:
        A JSON-ready dict.
    """
    from d2nwg.evaluation.diagnostics import vae_reconstruction

    datamodule = trainer.datamodule
    zoo, split = datamodule.zoo, datamodule.hparams.split
    vae_steps = min(trainer.global_step, module.hparams.vae_steps)
    return {
        "d2nwg_version": d2nwg_version(),
        "steps": {"vae": vae_steps, "diffusion": trainer.global_step - vae_steps},
        "config": training_config(trainer, module, datamodule),
        "zoo": zoo_record(zoo, split, seed),
        "vae_recon_ratio": vae_reconstruction(pipe, zoo, seed, EXPORT_VAE_MEMBERS)["vae_recon_ratio"],
    }
