"""The ``mlp`` architecture: a ReLU classifier on vector inputs (the default digits zoo's members).

`d2nwg.targets.architectures.ARCHITECTURES` imports `ARCHITECTURE` from here on first use."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from d2nwg.targets.architectures import Architecture


class MLP(nn.Sequential):
    """A ReLU multi-layer perceptron classifier: ``in_features -> hidden... -> num_classes``.

    Layers are named ``fc0, fc1, ...`` so layout globs such as ``"fc*.weight"`` read naturally.
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (32,), num_classes: int = 5):
        layers: list[tuple[str, nn.Module]] = []
        widths = [in_features, *hidden]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [(f"fc{i}", nn.Linear(a, b)), (f"act{i}", nn.ReLU())]
        layers.append((f"fc{len(hidden)}", nn.Linear(widths[-1], num_classes)))
        super().__init__(OrderedDict(layers))
        self.num_classes = num_classes


ARCHITECTURE = Architecture("mlp", MLP)
