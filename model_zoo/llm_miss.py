"""The "llm-miss" zoo: `model_zoo.llm_lora` with MiSS (Bone's successor in peft >= 0.19) adapters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from d2nwg.zoo import ModelZoo
from model_zoo import Recipe
from model_zoo.llm_lora import LLMAdapterRecipe
from model_zoo.llm_lora import build as build_llm_adapters


@dataclass
class LLMMissRecipe(LLMAdapterRecipe):
    """Settings of a MiSS causal-LM adapter zoo on SmolLM2-135M-Instruct."""

    kind: str = "miss"
    """Adapter kind: miss (block (r, out)) or miss-bat (blocks (out // r, r, r))."""
    r: int = 16
    """MiSS block size (MiSS folds the input into r sums, so it needs larger blocks than LoRA's rank)."""


def build(out: str | Path, **settings) -> ModelZoo:
    """Build (or resume building) a MiSS causal-LM adapter zoo in ``out``."""
    return build_llm_adapters(out, **{**asdict(LLMMissRecipe()), **settings})


RECIPE = Recipe("llm-miss", LLMMissRecipe, build)
