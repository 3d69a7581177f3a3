"""d2nwg: diffusion-based neural network weight generation.

Train a latent diffusion hyper-model on a model zoo, then generate weights for
datasets it has never seen.

The public names below are imported on first use (PEP 562), so that ``import d2nwg.commands``
(every ``d2nwg`` command, ``--help`` included) does not pay for torch and diffusers up front.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "D2NWGOutput": "d2nwg.pipelines.pipeline_d2nwg",
    "D2NWGPipeline": "d2nwg.pipelines.pipeline_d2nwg",
    "DatasetEncoder": "d2nwg.models",
    "Denoiser": "d2nwg.models",
    "ModelZoo": "d2nwg.zoo.model_zoo",
    "WeightLayout": "d2nwg.zoo.layout",
    "WeightVAE": "d2nwg.models",
    "load_model": "d2nwg.pipelines.output_folder",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'd2nwg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
