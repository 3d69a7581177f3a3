"""Zoo recipes: scripts that train a model zoo from scratch (``d2nwg zoo build NAME``).

Each recipe module exposes ``build(out, **settings) -> ModelZoo`` and a settings dataclass.
Heavy recipes (text adapters) are imported only when chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

RECIPES: dict[str, str] = {
    "digits": "model_zoo.digits",
    "text-lora": "model_zoo.text_adapters",
    "text-bone": "model_zoo.text_bone",
}


def get_recipe(name: str) -> Callable:
    """The ``build`` function of recipe ``name``."""
    if name not in RECIPES:
        raise ValueError(f"unknown zoo recipe '{name}'; available: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name]).build
