"""d2nwg: diffusion-based neural network weight generation.

Train a latent diffusion hyper-model on a model zoo, then generate weights for
datasets it has never seen.
"""

from d2nwg.generate import load_model
from d2nwg.models import DatasetEncoder, Denoiser, WeightVAE
from d2nwg.pipeline import D2NWGOutput, D2NWGPipeline
from d2nwg.weights import WeightLayout
from d2nwg.zoo import ModelZoo

__all__ = ["D2NWGOutput", "D2NWGPipeline", "DatasetEncoder", "Denoiser", "ModelZoo", "WeightLayout", "WeightVAE", "load_model"]
__version__ = "0.1.0"
