"""The hyper-model's networks, each a diffusers ``ModelMixin, ConfigMixin``."""

from d2nwg.models.condition_anchor import ConditionAnchor
from d2nwg.models.conditional_mean import ConditionalMean
from d2nwg.models.dataset_encoder import DatasetEncoder
from d2nwg.models.denoiser import Denoiser
from d2nwg.models.vae import WeightVAE

__all__ = ["ConditionAnchor", "ConditionalMean", "DatasetEncoder", "Denoiser", "WeightVAE"]
