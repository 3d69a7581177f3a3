"""Zoo recipes: scripts that train a model zoo from scratch (``d2nwg zoo build NAME``).

A recipe is a `Recipe` entry in the `RECIPES` registry: a name, a settings dataclass
(one field per ``--option``, each documented by the docstring under it) and
``build(out, **settings) -> ModelZoo``. Each recipe module defines its entry as a
module-level ``RECIPE`` next to the code it describes; this package only records
*where* each entry lives (`Registry.register_lazy`), so listing the recipes imports
none of them and a text recipe's module is imported only when that recipe is used.

Add a recipe by writing ``model_zoo/<name>.py`` with ``RECIPE = Recipe(...)`` and one
``RECIPES.register_lazy(...)`` line below, or from your own code with
``RECIPES.register(name, Recipe(...))``.

Example:
    >>> from model_zoo import RECIPES
    >>> RECIPES.names()
    ['digits', 'text-lora', 'text-bone', 'llm-lora', 'llm-miss']
    >>> zoo = RECIPES.get("digits")("runs/zoo", num_train_tasks=100)      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from d2nwg.registry import Registry

if TYPE_CHECKING:
    from d2nwg.zoo.model_zoo import ModelZoo


@dataclass(frozen=True)
class Recipe:
    """A zoo recipe: calling it builds (or resumes building) a zoo.

    Args:
        name: the registry name (``d2nwg zoo build NAME``); zoos record it in their manifest.
        settings_cls: a dataclass of settings with defaults; the docstring under each field
            is its ``--help`` text.
        build: ``build(out, **settings) -> ModelZoo``.

    Example:
        >>> zoo = RECIPES.get("digits")("runs/zoo", hidden=16)              # doctest: +SKIP
    """

    name: str
    settings_cls: type
    build: Callable[..., ModelZoo]

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.settings_cls):
            raise ValueError(f"recipe '{self.name}' settings must be a dataclass, got {self.settings_cls!r}")

    def __call__(self, out, **settings: Any) -> ModelZoo:
        """``build(out, **settings)``; unknown settings raise ``TypeError`` from the settings dataclass."""
        return self.build(out, **settings)

    def settings(self) -> list[dataclasses.Field]:
        """The settings fields, in declaration order (each has a default)."""
        return list(dataclasses.fields(self.settings_cls))

    def settings_help(self) -> dict[str, str]:
        """``{field: help}``: the docstring under each settings field, whitespace collapsed to one line.

        jsonargparse reads the docstrings (the way LightningCLI documents its configs);
        a field without one gets its name in words.
        """
        from jsonargparse import ArgumentParser, set_parsing_settings

        # Field docstrings are off by default in jsonargparse and the switch is global; turning it on
        # also lets LightningCLI's --help show field docstrings, which is what we want there too.
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        parser = ArgumentParser()
        parser.add_class_arguments(self.settings_cls)
        found = {a.dest: " ".join(a.help.split()) for a in parser._actions if isinstance(a.help, str)}
        return {f.name: found.get(f.name) or f.name.replace("_", " ") for f in self.settings()}


RECIPES: Registry[Recipe] = Registry("zoo recipe")
RECIPES.register_lazy("digits", "model_zoo.digits:RECIPE")
RECIPES.register_lazy("text-lora", "model_zoo.text_lora:RECIPE")
RECIPES.register_lazy("text-bone", "model_zoo.text_bone:RECIPE")
RECIPES.register_lazy("llm-lora", "model_zoo.llm_lora:RECIPE")
RECIPES.register_lazy("llm-miss", "model_zoo.llm_miss:RECIPE")


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name`` (callable like its ``build``).

    Raises:
        ValueError: an unknown name (listing the known ones).
    """
    return RECIPES.get(name)
