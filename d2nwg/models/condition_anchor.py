"""`ConditionAnchor`: the adapter at which a dataset's conditioning gradient is taken.

Causal-LM zoos built with ``pooling="prompt-response-gradient"`` describe a task partly by the gradient of its
response loss with respect to the adapter, taken at the zoo's warm start (`d2nwg.targets.causal_lm.conditioning.gradient_condition`).
A pipeline trained on such a zoo carries that warm start so that ``d2nwg generate`` computes a user's dataset's
gradient at the same point the zoo's were taken.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class ConditionAnchor(ModelMixin, ConfigMixin):
    """An adapter state stored as raw (unnormalised) weight tokens ``[T, chunk]`` of the pipeline's layout.

    Args:
        num_tokens, chunk_size: the layout's token grid (`d2nwg.zoo.layout.WeightLayout`).

    Buffers: ``tokens [T, chunk]`` (float32; ``WeightLayout.tokenize(state, normalize=False)``, which
    ``detokenize(..., normalize=False)`` inverts exactly).
    """

    @register_to_config
    def __init__(self, num_tokens: int = 1, chunk_size: int = 1):
        super().__init__()
        self.register_buffer("tokens", torch.zeros(num_tokens, chunk_size))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], layout) -> ConditionAnchor:
        """The anchor holding ``state`` (a state_dict of ``layout``'s tensors)."""
        tokens = layout.tokenize(state, normalize=False)[0].float()
        module = cls(num_tokens=tokens.shape[0], chunk_size=tokens.shape[1])
        module.tokens.copy_(tokens)
        return module

    @classmethod
    def for_zoo(cls, zoo) -> ConditionAnchor | None:
        """The anchor a pipeline trained on ``zoo`` (a `d2nwg.zoo.model_zoo.ModelZoo`) carries: its warm start
        (``init.safetensors``) when its architecture's pooling is ``"prompt-response-gradient"``, else ``None``.

        Raises:
            ValueError: such a zoo without ``init.safetensors``.
        """
        from d2nwg.targets.causal_lm.features import GRADIENT_POOLING

        if (zoo.architecture.get("config") or {}).get("pooling") != GRADIENT_POOLING:
            return None
        init = zoo.init_state()
        if init is None:
            raise ValueError(f"the zoo at {zoo.root} conditions on task gradients but has no init.safetensors (their anchor)")
        return cls.from_state(init, zoo.layout).eval().requires_grad_(False)

    def state(self, layout) -> dict[str, torch.Tensor]:
        """The anchor as a state_dict of ``layout``'s tensors."""
        return layout.detokenize(self.tokens[None], normalize=False)[0]
