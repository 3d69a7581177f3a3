"""`d2nwg generate` for generative pipelines: a JSONL task in, a PEFT adapter folder for the causal LM out.

The dataset's (prompt, response) records condition the pipeline; of the N generated adapters the
one with the highest mean log-likelihood of the records' responses is kept (selection on the
user's own examples, the support set). The output folder is a standard PEFT folder whose
``adapter_config.json`` names the base, so::

    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("adapter/")

loads base and adapter in one call. ``samples/`` keeps every generated adapter and ``generation.json``
the scores, including the greedy exact match of the chosen adapter on the records.

With ``finetune_steps`` the chosen adapter is then trained for that many steps on the records (D2NWG uses
generated weights as an initialisation the same way); 16 is what `benchmarks/bench_finetune.py` chose on the
`llm-lora` zoo's training tasks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class AdapterResult:
    """What `generate_adapter_folder` wrote and measured."""

    out: Path
    best: int
    """Index of the chosen adapter among the N."""
    loglik: list[float]
    """Mean response log-likelihood (nats per token) of each adapter on the records."""
    exact_match: float
    """Greedy exact match of the written adapter on the records, in [0, 1] (after fine-tuning, if any: then the
    records are its training data, not a held-out check)."""
    records: int
    warnings: list[str]
    """Trust warnings (`d2nwg.evaluation.trust.generation_warnings`: VAE ratio at export, collapsed samples), one line each."""
    finetune: dict | None = None
    """The fine-tuning settings (`d2nwg.targets.causal_lm.finetune.support_finetuning`) when the adapter was fine-tuned, else None."""


def with_default_system(conversations: list, system: str | None) -> list:
    """Give conversations without a system message the one the zoo's tasks were written with (``None``: as they are).

    A chat template fills a missing system message with its own default (SmolLM2: a 17-token persona), which the
    zoo's adapters never saw and which would not fit the pipeline's ``max_length``.
    """
    if system is None:
        return conversations
    return [c if c and c[0]["role"] == "system" else [{"role": "system", "content": system}, *c] for c in conversations]


def generate_adapter_folder(
    pipe,
    conversations: list,
    out: str | Path,
    *,
    num_samples: int = 10,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    max_new_tokens: int | None = None,
    finetune_steps: int = 0,
    finetune_lr: float | None = None,
    source: str = "the dataset",
) -> AdapterResult:
    """Generate N adapters for ``conversations`` and write the best as a PEFT folder at ``out`` (atomically).

    Args:
        pipe: a `d2nwg.pipelines.pipeline_d2nwg.D2NWGPipeline` whose target is a ``causal-lm-adapter``.
        conversations: the task's examples (`d2nwg.data.instructions.read_instructions`).
        out: the output folder (replaced only once everything is written).
        finetune_steps: AdamW steps on the records from the chosen adapter (0: none), at a fifth of the zoo
            members' learning rate (`d2nwg.targets.causal_lm.finetune.support_finetuning`; the members' settings come from the
            pipeline's provenance, or `d2nwg.targets.causal_lm.finetune.MEMBER_TRAINING`) unless ``finetune_lr`` is given.

    Raises:
        ValueError: (one line) a non-empty ``out``; ``finetune_steps`` < 0, ``finetune_lr`` <= 0, or ``finetune_lr``
            without ``finetune_steps``; a record (numbered from 1 in ``source``) longer than the
            pipeline's ``max_length`` / ``response_window``.
    """
    from d2nwg.evaluation.trust import generation_warnings
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.conditioning import gradient_condition
    from d2nwg.targets.causal_lm.decoding import AdapterGenerator, exact_match, references
    from d2nwg.targets.causal_lm.features import conversation_features, GRADIENT_POOLING
    from d2nwg.targets.causal_lm.finetune import adapter_scores, finetune_adapter, member_training, support_finetuning
    from d2nwg.targets.causal_lm.peft_export import save_causal_lm_adapter
    from d2nwg.targets.population import stack_state_dicts
    from d2nwg.utils.io import atomic_dir, save_safetensors

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} already exists and is not empty")
    arch = pipe.target_spec.architecture
    cfg = arch["config"]
    tuning = None
    if finetune_lr is not None and not finetune_steps:
        raise ValueError("a fine-tuning learning rate needs fine-tuning steps (--finetune-steps)")
    if finetune_steps:  # settled (and checked) before the sampling
        # The members' training as the pipeline's provenance recorded it; older pipelines: the recipes' defaults.
        member = ((pipe.provenance or {}).get("zoo") or {}).get("member_training") or member_training(None, cfg.get("kind", "lora"))
        tuning = support_finetuning(member, "generated", finetune_steps, finetune_lr)
    conversations = with_default_system(conversations, cfg.get("system"))
    module = build_model(arch).eval()
    try:
        x = conversation_features(
            conversations, module.first, module.max_length, module.response_window, cfg["base"], pooling=module.pooling
        )
    except ValueError as err:  # "conversation 5 has ..." -> the record the user can find in the file
        raise ValueError(re.sub(r"conversation (\d+)", lambda m: f"record {int(m.group(1)) + 1} of {source}", str(err))) from None
    if module.pooling == GRADIENT_POOLING:  # the task's gradient at the zoo's warm start (the pipeline's anchor)
        x = gradient_condition(module, pipe.anchor_state(), x)
    output = pipe(
        dataset=[x], num_samples=num_samples, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
    )
    loglik = adapter_scores(module, stack_state_dicts(output.weights), x)
    best = int(loglik.argmax())
    adapter = output.weights[best]
    if tuning is not None:
        adapter = finetune_adapter(module, adapter, x, tuning, seed)
    generator = AdapterGenerator(arch)
    generator.set_adapter(adapter)
    em = exact_match(generator.answer(conversations, max_new_tokens=max_new_tokens), references(conversations))
    warnings = generation_warnings(pipe, output.weights)
    with atomic_dir(out) as tmp:
        save_causal_lm_adapter(adapter, arch, tmp)
        (tmp / "samples").mkdir()
        for i, weights in enumerate(output.weights):
            save_safetensors(tmp / "samples" / f"sample_{i:02d}.safetensors", weights)
        record = {
            "best": best, "loglik": [float(v) for v in loglik], "exact_match": em, "records": len(conversations),
            "seed": seed, "num_samples": num_samples, "decoding": "greedy", "max_new_tokens": max_new_tokens or int(cfg["response_window"]),
            "warnings": warnings, "finetune": tuning,
            "pipeline_hub": pipe.hub_record,
        }  # fmt: skip
        (tmp / "generation.json").write_text(json.dumps(record, indent=2))
    return AdapterResult(out, best, [float(v) for v in loglik], em, len(conversations), warnings, tuning)
