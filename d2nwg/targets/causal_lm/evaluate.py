"""The evaluation protocol for generative zoos (``causal-lm-adapter``): exact match of greedy answers.

For each held-out task, on its test prompts, every method answers by greedy decoding and is
scored by **exact match** (the stripped answer equals the stripped reference, in [0, 1]) and by
the **mean log-likelihood** of the reference response (nats per token, teacher-forced):

==================  =====================================================================
method              adapter and prompt
==================  =====================================================================
base                no adapter; the test prompt alone (zero-shot)
icl                 no adapter; k support examples as earlier chat turns (k-shot)
retrieval           the training member whose task's conversations embed nearest to the
                    support set's (mean conditioning features, cosine after subtracting the training
                    tasks' mean, which all tasks share; per block as the conditional mean's kernel)
knn_ensemble        the element-wise mean of the k nearest training members
multitask           one adapter of the same shape trained on the union of the training
                    tasks, with k in-context examples in every training and test prompt
                    (so it can tell the tasks apart), as Text-to-LoRA's baseline
finetune            a few fine-tuning steps on the support set from the members' shared initialisation
                    (the zoo's warm start): what a user gets from their examples without a generator
                    (`finetune_settings`: the members' steps at a fifth of their learning rate)
conditional_mean    the pipeline's regression mean alone (`d2nwg.models.ConditionalMean`), without
                    the diffusion residual; n/a for pipelines without one
generated_mean      the pipeline's N adapters for the support set, mean over the N
generated_best      the one of the N with the highest support log-likelihood
generated_finetune  generated_best, then fine-tuned on the support set (half the members' steps at a fifth
                    of their learning rate; D2NWG's use of generated weights as an initialisation)
oracle              the task's own zoo member (trained on its training conversations)
==================  =====================================================================

Selection uses support data only; every figure is on test. ``report.json`` holds per-task rows,
``summary`` (``<method>_em`` and ``<method>_loglik``, ``within_task_spread_ratio``), ``summary_by_kind``
(``new_combination`` and ``unseen_output`` tasks, `model_zoo.date_formats`) and the trust ``warnings`` of
`d2nwg.evaluation.trust` (no gain in exact match over the cheap baselines, a low VAE reconstruction ratio recorded at
export, collapsed samples, near-copies of a member).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean

import torch

from d2nwg.zoo.model_zoo import ModelZoo

METHODS = (
    "base", "icl", "retrieval", "knn_ensemble", "multitask", "finetune",
    "conditional_mean", "generated_mean", "generated_best", "generated_finetune", "oracle",
)  # fmt: skip


def finetune_settings(zoo: ModelZoo, steps: int | None = None, lr: float | None = None) -> dict[str, dict]:
    """``{"finetune": settings, "generated_finetune": settings}`` for ``zoo``: `d2nwg.targets.causal_lm.finetune.support_finetuning`
    of its members' training (from the warm start and from a generated adapter); ``steps``/``lr`` override both.

    Raises:
        ValueError: ``steps`` < 1 or ``lr`` <= 0.
    """
    from d2nwg.targets.causal_lm.finetune import member_training, support_finetuning

    member = member_training(zoo.manifest.get("recipe"), zoo.architecture["config"].get("kind", "lora"))
    return {name: support_finetuning(member, start, steps, lr) for name, start in (("finetune", "warm_start"), ("generated_finetune", "generated"))}


def warm_start(zoo: ModelZoo, seed: int = 0) -> dict[str, torch.Tensor]:
    """The members' shared initialisation (``init.safetensors``, the recipes' warm start), or, for zoos without
    one (ingested adapters), peft's initialisation drawn with ``seed``: where ``finetune`` and ``multitask`` start."""
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.population import initial_state

    return zoo.init_state() or initial_state(lambda: build_model(zoo.architecture), seed)


def read_split(zoo: ModelZoo, task: str, split: str) -> list:
    """The conversations of ``task``'s ``split`` stored in the zoo (``conversations/<task>.<split>.jsonl``)."""
    from d2nwg.data.instructions import read_instructions

    path = zoo.root / "conversations" / f"{task}.{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"the zoo at {zoo.root} has no conversations for task {task!r} ({path.name})")
    return read_instructions(path)


def write_conversations(root: Path, task: str, split: str, items: Sequence) -> Path:
    """Store ``items`` as the zoo's ``conversations/<task>.<split>.jsonl`` (one ``{"messages": [...]}`` per line,
    atomically), the file `read_split` reads back."""
    from d2nwg.utils.io import atomic_write_text

    path = Path(root) / "conversations" / f"{task}.{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"messages": list(c)}, ensure_ascii=False) + "\n" for c in items))
    return path


def multitask_adapter(zoo: ModelZoo, k: int, per_task: int, steps: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
    """One adapter trained on the union of the training tasks, each prompt with ``k`` in-context examples.

    Cached in the zoo (``baselines/multitask-<hash>.safetensors``, keyed by the settings), since it costs as much
    as several members. ``per_task`` conversations of each training task are used, each with ``k`` other training
    conversations of its task as examples.
    """
    from d2nwg.data.instructions import with_examples
    from d2nwg.targets.causal_lm.features import conversation_features
    from d2nwg.targets.causal_lm.finetune import finetune_adapter, precision_context
    from d2nwg.targets.causal_lm.modeling import CausalLMAdapter
    from d2nwg.utils.io import load_safetensors, save_safetensors

    cfg = dict(zoo.architecture["config"])
    # The members' compute precision (`model_zoo.llm_lora`), so the baseline trains as they did.
    precision = str((zoo.manifest.get("recipe") or {}).get("precision", "32-true"))
    settings = {"k": k, "per_task": per_task, "steps": steps, "lr": lr, "seed": seed, "arch": cfg, "precision": precision}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = zoo.root / "baselines" / f"multitask-{key}.safetensors"
    if path.is_file():
        return load_safetensors(path)
    # In-context prompts are (k + 1) times longer than the members' conversations.
    long = CausalLMAdapter(**{**cfg, "max_length": cfg["max_length"] * (k + 1)})
    conversations = []
    for task, record in zoo.tasks.items():
        if record["split"] != "train":
            continue
        items = read_split(zoo, task, "train")
        for j in range(min(per_task, len(items))):
            examples = [c for i, c in enumerate(items) if i != j]
            conversations.append(with_examples(items[j], examples[j:] + examples[:j], k))
    with precision_context(precision, "cpu"):
        x = conversation_features(conversations, long.first, long.max_length, long.response_window, cfg["base"], pooling=long.pooling)
    # From the members' shared initialisation, as they start.
    state = finetune_adapter(long, warm_start(zoo, seed), x, {"steps": steps, "lr": lr, "batch_size": 16, "precision": precision}, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, state)
    return state


def evaluate_causal_lm(
    pipeline,
    zoo: ModelZoo,
    out: str | Path,
    *,
    num_samples: int = 10,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    max_tasks: int | None = None,
    k_shot: int = 4,
    knn: int = 5,
    multitask_per_task: int = 4,
    multitask_steps: int = 200,
    multitask_lr: float = 2e-3,
    finetune_steps: int | None = None,
    finetune_lr: float | None = None,
    max_new_tokens: int | None = None,
) -> dict:
    """Run the protocol of the module docstring on ``zoo``'s held-out tasks; writes ``report.json`` and ``report.md``.

    Args:
        pipeline: a `d2nwg.pipelines.pipeline_d2nwg.D2NWGPipeline` trained on ``zoo``.
        zoo: a zoo of ``causal-lm-adapter`` members with stored conversations (`model_zoo.llm_lora`).
        num_samples: adapters generated per task (N). max_tasks: held-out tasks per kind (``None``: all).
        k_shot: in-context examples for ``icl`` and ``multitask``; knn: members averaged by ``knn_ensemble``.
        multitask_per_task, multitask_steps, multitask_lr: the multi-task LoRA's data and optimiser.
        finetune_steps, finetune_lr: override the ``finetune`` and ``generated_finetune`` steps and learning rate
            (``None``: `finetune_settings`, scaled from the members' own).
        max_new_tokens: longest greedy answer (``None``: the zoo's ``response_window``, which holds every reference
            response with its end-of-turn tokens, so no right answer is cut and a rambling one stops early).

    Returns:
        The report dict: ``tasks`` (per-task rows), ``summary`` and ``summary_by_kind``.

    Raises:
        ValueError: a zoo that is not generative, or without conversations; ``finetune_steps`` < 1 or
            ``finetune_lr`` <= 0.
    """
    from d2nwg.data.instructions import with_examples
    from d2nwg.evaluation.trust import (
        baseline_message,
        residual_message,
        collapse_message,
        flat_tokens,
        median,
        near_copy_message,
        recon_message,
        sample_diversity,
        zoo_spacing,
    )
    from d2nwg.models.conditional_mean import kernel_keys
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.decoding import AdapterGenerator, exact_match, references
    from d2nwg.targets.causal_lm.finetune import adapter_scores, finetune_adapters
    from d2nwg.targets.population import mean_state_dict, stack_state_dicts

    if zoo.architecture.get("name") != "causal-lm-adapter":
        raise ValueError(f"{zoo.root} is not a generative zoo (architecture {zoo.architecture.get('name')!r})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    module = build_model(zoo.architecture).eval()
    generator = AdapterGenerator(zoo.architecture)
    members = {m.task: m for m in zoo.members()}
    train = [m for m in zoo.members("train")]
    width, blocks = zoo.input_spec.condition_features or module.hidden, zoo.input_spec.condition_blocks

    raw = torch.stack([zoo.class_samples(m.task, "train")[0][:, :width].mean(0) for m in train])  # (M, C)
    center = raw.mean(0)  # every task's embedding shares this component (mean cosine 0.98 on llm-lora)

    def task_embedding(task: str, split: str) -> torch.Tensor:
        return kernel_keys(zoo.class_samples(task, split)[0][:, :width].mean(0, keepdim=True), center, blocks)[0]

    train_emb = torch.stack([task_embedding(m.task, "train") for m in train])  # (M, H)
    heldout = [t for t, r in zoo.tasks.items() if r["split"] != "train" and t in members]
    by_kind: dict[str, list[str]] = {}
    for t in heldout:
        by_kind.setdefault(zoo.task_kind(t), []).append(t)
    task_ids = [t for kind in sorted(by_kind) for t in by_kind[kind][:max_tasks]]
    # Trust figures (d2nwg.evaluation.trust): how far a task's samples are from each other and from the zoo, in zoo spacings.
    zoo_tokens = flat_tokens(pipeline.layout, [zoo.load_member(m) for m in train])
    spacing = zoo_spacing(zoo_tokens, seed)
    tuning = finetune_settings(zoo, finetune_steps, finetune_lr)  # bad settings fail before any training
    multitask = multitask_adapter(zoo, k_shot, multitask_per_task, multitask_steps, multitask_lr, seed)
    start = warm_start(zoo, seed)
    zero = {k: torch.zeros_like(v) for k, v in start.items()}  # no update: the base's log-likelihood via the slice

    def judge(state, prompts, refs) -> tuple[float, float]:
        """Exact match and log-likelihood through the whole LM (prompts with in-context examples, longer than the
        cached features)."""
        generator.set_adapter(state)
        return exact_match(generator.answer(prompts, max_new_tokens=max_new_tokens), refs), fmean(generator.response_loglik(prompts))

    pipeline.set_progress_bar_config(disable=True)
    # Pass 1: each task's generated adapters and the one chosen on support, so that both fine-tuning rows of every
    # task can then train vmapped across tasks (`finetune_adapters`). One at a time they took 285 s of the default
    # llm-lora evaluation (docs/results/llm-lora.md); a step costs 0.21 s alone and 0.15 s per adapter in groups.
    supports, outputs, support_lls = [], [], []
    for i, task in enumerate(task_ids):
        x_support = zoo.class_samples(task, "support")[0]
        output = pipeline(
            dataset=[x_support], num_samples=num_samples, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed + i),
        )  # fmt: skip
        supports.append(x_support)
        outputs.append(output.weights)
        support_lls.append(adapter_scores(module, stack_state_dicts(output.weights), x_support))
    bests = [int(ll.argmax()) for ll in support_lls]
    finetuned = finetune_adapters(module, [start] * len(task_ids), supports, tuning["finetune"], seed)
    generated_finetuned = finetune_adapters(
        module, [w[b] for w, b in zip(outputs, bests)], supports, tuning["generated_finetune"], seed
    )  # fmt: skip
    rows = []
    for i, task in enumerate(task_ids):
        support, test = read_split(zoo, task, "support"), read_split(zoo, task, "test")
        refs = references(test)
        x_support, x_test = supports[i], zoo.class_samples(task, "test")[0]
        weights, best, support_ll = outputs[i], bests[i], support_lls[i]
        icl_prompts = [with_examples(c, support, k_shot) for c in test]
        sims = train_emb @ task_embedding(task, "support")
        order = sims.argsort(descending=True).tolist()
        nearest = [zoo.load_member(train[j]) for j in order[:knn]]
        row: dict = {"task": task, "kind": zoo.task_kind(task), "retrieved": train[order[0]].task}
        for name, state, prompts in (("icl", None, icl_prompts), ("multitask", multitask, icl_prompts)):
            row[f"{name}_em"], row[f"{name}_loglik"] = judge(state, prompts, refs)
        # Every adapter that answers the bare test prompts answers in one batch (`AdapterGenerator.answer_many`), the
        # base too (``None``); their log-likelihoods come from the cached features, the base's as a zero adapter
        # (LoRA's and MiSS's update is then zero).
        adapters = {
            "base": None, "retrieval": nearest[0], "knn_ensemble": mean_state_dict(nearest), "oracle": zoo.load_member(members[task]),
            "finetune": finetuned[i], "generated_finetune": generated_finetuned[i],
        }  # fmt: skip
        prior = pipeline.prior_tokens([x_support])
        if prior is not None:
            adapters["conditional_mean"] = pipeline.layout.detokenize(prior)[0]
        else:
            row["conditional_mean_em"] = row["conditional_mean_loglik"] = None
        states = [*adapters.values(), *weights]
        ems = [exact_match(a, refs) for a in generator.answer_many(states, test, max_new_tokens=max_new_tokens)]
        test_ll = adapter_scores(module, stack_state_dicts([zero if s is None else s for s in states]), x_test)
        for j, name in enumerate(adapters):
            row[f"{name}_em"], row[f"{name}_loglik"] = ems[j], float(test_ll[j])
        ems, test_ll = ems[len(adapters) :], test_ll[len(adapters) :]
        row.update(sample_diversity([flat_tokens(pipeline.layout, weights)], zoo_tokens, [m.id for m in train], spacing)[0])
        row.update({
            "generated_mean_em": sum(ems) / len(ems), "generated_mean_loglik": float(test_ll.mean()),
            "generated_best_em": ems[best], "generated_best_loglik": float(test_ll[best]),
            "generated_best_support_loglik": float(support_ll[best]),
        })  # fmt: skip
        rows.append(row)
    summary = summarize_generation(rows)
    summary.update({"tasks": len(rows), "num_samples": num_samples, "k_shot": k_shot, "seconds": time.perf_counter() - started})
    summary["finetune_settings"] = tuning
    summary["within_task_spread_ratio"] = median([r["within_task_spread_ratio"] for r in rows])
    summary["nearest_member_ratio"] = median([r["nearest_member_ratio"] for r in rows])
    cheap = {"the base zero-shot": summary["base_em"], f"the base with {k_shot} in-context examples": summary["icl_em"],
             "retrieval": summary["retrieval_em"], f"the {knn}-nearest adapter average": summary["knn_ensemble_em"],
             f"{tuning['finetune']['steps']} fine-tuning steps on the support set": summary["finetune_em"]}  # fmt: skip
    provenance = getattr(pipeline, "provenance", None) or {}
    warnings = [
        baseline_message(summary["generated_best_em"], cheap, f"in exact match on the same {len(rows)} held-out task(s)", summary["generated_mean_em"]),
        residual_message(summary["generated_best_em"], summary["conditional_mean_em"], f"in exact match on the same {len(rows)} held-out task(s)"),
        recon_message(provenance.get("vae_recon_ratio")),
        collapse_message([r["within_task_spread_ratio"] for r in rows]),
        near_copy_message(rows),
    ]
    kinds = sorted({r["kind"] for r in rows})
    report = {
        "tasks": rows,
        "warnings": [w for w in warnings if w],
        "summary": summary,
        "summary_by_kind": {k: summarize_generation([r for r in rows if r["kind"] == k]) | {"tasks": sum(r["kind"] == k for r in rows)} for k in kinds},
        "pipeline_hub": pipeline.hub_record,
    }
    from d2nwg.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", generation_markdown(report))
    return report


def summarize_generation(rows: Sequence[Mapping]) -> dict:
    """Mean of every ``<method>_em`` / ``<method>_loglik`` over ``rows`` (``None`` when no row has it)."""
    out = {}
    for method in METHODS:
        for metric in ("em", "loglik"):
            values = [r[f"{method}_{metric}"] for r in rows if r.get(f"{method}_{metric}") is not None]
            out[f"{method}_{metric}"] = sum(values) / len(values) if values else None
    return out


def generation_table(summary: Mapping) -> list[tuple[str, str, str]]:
    """``(method, exact match, log-likelihood)`` rows, formatted."""

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    return [(m, fmt(summary.get(f"{m}_em")), fmt(summary.get(f"{m}_loglik"))) for m in METHODS]


def generation_markdown(report: Mapping) -> str:
    lines = ["# Generative evaluation", "", f"{report['summary']['tasks']} held-out tasks, greedy decoding.", ""]
    for title, summary in [("all", report["summary"])] + list(report["summary_by_kind"].items()):
        lines += [f"## {title}", "", "| method | exact match | log-likelihood (nats/token) |", "|---|---|---|"]
        lines += [f"| {m} | {em} | {ll} |" for m, em, ll in generation_table(summary)]
        lines.append("")
    return "\n".join(lines)
