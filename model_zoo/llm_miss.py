"""The "llm-miss" zoo: `model_zoo.llm_lora` with MiSS (Bone's successor in peft >= 0.19) adapters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from d2nwg.zoo.model_zoo import ModelZoo
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
    lr: float = 5e-4
    """Learning rate of the warm start (1000 steps on all training tasks), a tenth of LoRA's: under bf16 autocast,
    on 24 tasks' conversations, 60 warm-start steps took the response log-likelihood from -2.24 to -17.3 nats/token
    at lr 5e-3 (diverged) and to -1.60 at 5e-4. The members' 32 steps from it train at ``member_lr``."""
    member_lr: float = 1.6e-2
    """Learning rate of each member's 32 steps from the warm start. At the warm start's 5e-4 the float32 zoo's
    members were under-trained (oracle exact match 0.539 on the 24 held-out tasks; LoRA's 0.839). Chosen on 8
    *training* tasks (every 24th), 32 steps from the default warm start, test log-likelihood (nats/token) and exact
    match: 5e-4 -0.166 / 0.555, 1e-3 -0.133 / 0.648, 2e-3 -0.120 / 0.688, 4e-3 -0.098 / 0.758, 8e-3 -0.070 / 0.789,
    1.6e-2 -0.063 / 0.836, 3.2e-2 -0.087 / 0.766. With it, the held-out oracles reach 0.716 (docs/results/llm-miss.md)."""
    precision: str = "32-true"
    """Float32, not LoRA's bf16 autocast: under bf16 the MiSS warm start diverges even at lr 5e-4. Measured on 96
    training tasks' conversations, 400 warm-start steps at lr 5e-4, test log-likelihood on 8 other tasks:
    bf16-mixed -14.2 nats/token (adapter norm 37.8; gradient clipping at 1 did not change it), 32-true -0.74
    (norm 9.5). The default bf16 zoo's 1000-step warm start ended at -23 and its members at -10 (exact match
    0 on every held-out task)."""


def build(out: str | Path, **settings) -> ModelZoo:
    """Build (or resume building) a MiSS causal-LM adapter zoo in ``out``."""
    return build_llm_adapters(out, **{**asdict(LLMMissRecipe()), **settings})


RECIPE = Recipe("llm-miss", LLMMissRecipe, build)
