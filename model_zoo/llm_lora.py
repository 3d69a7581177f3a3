"""Causal-LM adapter zoos: LoRA ("llm-lora") or MiSS ("llm-miss") adapters on SmolLM2-135M-Instruct.

Each member is an adapter on the top layers of the frozen instruct LM (default: ``q_proj`` and
``v_proj`` of layers 24-29 of 30), trained on one generative task of the date-format family
(`model_zoo.date_formats`): the prompt is a date, the response the same date in the task's
output format. Members are judged on what the adapted LM *generates* (greedy exact match) and
on the mean log-likelihood of the reference response.

**Slice and data.** Measured on two tasks (``ymd-dash__dmy-slash``, ``mdy-slash__long-fr``), greedy exact
match of the task's own rank-8 LoRA trained *from peft's random init* on 16 test dates: layers 28-29, 32
examples, 100 steps at lr 1e-2: 0.13 and 0.06 (it memorises the training dates); layers 26-29, 64 examples,
100 steps: 0.25 and 0.06; layers 24-29, 96 examples, 150 steps at lr 5e-3: 1.00 and 0.94, but about 100 s per
member on 2 CPU cores, so a zoo of hundreds is hours. Copying digits into a new order needs attention in more
than the top layers.

**Warm start.** So members first share one adapter trained on the union of the training tasks
(``warm_start_steps``): it learns what the tasks share (reading a date, month names in each language,
copying digits) but not which format to write, since the prompt never says. Each member then trains
``steps`` from it on its own task, which mostly has to pick the format. Measured on four tasks (the two
above, ``long-de__ymd-dot``, ``dmy-dot__medium-es``), 32 examples each, warm start of 1000 steps on 192
tasks: 32 member steps of 8 give exact match 0.50, 0.69, 0.88 and 1.00 at 5.5 s per member; with a warm start
of 300 steps on 64 tasks and 24 member steps, 0.38 to 0.56. The warm start is the zoo's shared initialisation
(``init.safetensors``): one gauge, so the weight VAE need not learn symmetries, and the multi-task baseline
of `d2nwg.targets.causal_lm.evaluate` starts from it too.

**Speed.** The 24 frozen layers below the slice run once per conversation: their output is
the cached sample (`d2nwg.targets.causal_lm.features.conversation_features`). Members recompute only the slice
and the LM head on the response positions, in vmapped groups. ``precision="bf16-mixed"`` autocasts
caching and training to bfloat16 (about 2x faster on this CPU; weights and recorded metrics stay float32).
Groups are the unit of resuming; a killed build redoes only the group it was in (a build killed before the
zoo exists, during caching or the warm start, starts over).

**What the hyper-model sees.** Members are the warm start plus a small task delta, so the layout is fitted
with ``scale="residual"`` (`d2nwg.zoo.layout.WeightLayout.fit_stats`): each tensor is scaled by the spread
of its members around their element-wise mean, which the VAE subtracts. With the per-tensor scale the
deltas were 4.2% of the tokens' variance, and the default VAE's reconstruction ratio (decoded members' mean
per-token probability of the reference over the members') was 0.656; with the residual scale, 0.873 (same
zoo, same 500 steps). Conversations are embedded for conditioning
with ``pooling="prompt-response"`` (`d2nwg.targets.causal_lm.features.conversation_features`): the prompt and the
response count equally, so the nearest training tasks share the held-out task's output format more
often (24 of the 60 top-5 neighbours of the 12 ``new_combination`` tasks, against 5 of 60 when the
template-heavy prompt dominates the mean). After the warm start, a training task's train records and a
held-out task's support records add a second block (``pooling="prompt-response-gradient"``,
`d2nwg.targets.causal_lm.conditioning.gradient_condition`): the gradient of their response loss with respect to the adapter at the
warm start, count-sketched to H numbers. It says which way the task pulls the shared adapter, which the hidden
states only imply. The other splits' block stays zero: nothing may condition on test records, and nothing reads
a training task's support block or a held-out task's train block (`benchmarks/bench_ridge.py` computes the
former when it needs it). The configs (``configs/llm-lora.yaml``) add the conditional mean
(`d2nwg.models.ConditionalMean`): with one member per task, each mostly the noise of its 32 steps, the
diffusion model alone did not learn what its conditioning says (generated best exact match 0.052 on the 24
held-out tasks); a closed-form regression of the members on the task embedding, plus a generated residual,
gives 0.544.

**Splits.** Tasks whose output format is in ``unseen_outputs`` are held out as ``unseen_output``
(a language or a numeric format no training task writes); ``num_new_combination_tasks`` more
are held out as ``new_combination`` (both formats seen, never together). Each task's
conversations are written to ``conversations/<task>.<split>.jsonl`` in the zoo, in the JSONL
format `d2nwg generate` reads, for exact-match evaluation.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import Progress

from d2nwg.targets.architectures import build_model
from d2nwg.targets.population import initial_state, unstack_state_dict
from d2nwg.utils.io import atomic_write_text
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import SPLITS, ModelZoo, member_groups
from d2nwg.zoo.specs import InputSpec
from model_zoo import Recipe
from model_zoo.date_formats import conversations, split_tasks


@dataclass
class LLMAdapterRecipe:
    """Settings of a causal-LM adapter zoo."""

    kind: str = "lora"
    """Adapter kind: lora, miss or miss-bat (llm-miss uses miss)."""
    base: str = "smollm2-135m-instruct"
    """Causal LM: the packaged SmolLM2-135M-Instruct (converted once from its GGUF), or a local folder or Hub id of a Llama-architecture causal LM."""
    layers: str = "24,25,26,27,28,29"
    """Adapted layers, e.g. "28,29", or "auto:6" (the six layers of highest weight signal-to-noise ratio)."""
    target_modules: str = "q_proj,v_proj"
    """Linear layers adapted inside each block."""
    r: int = 8
    """Adapter rank (MiSS: block size)."""
    unseen_outputs: str = "long-it,dmy-space"
    """Comma-separated output formats no training task uses; every task writing one is a held-out *unseen* task."""
    num_unseen_output_tasks: int = 12
    """Held-out tasks with an unseen output format kept (a seeded draw of the 31 by default); 0: all of them."""
    num_new_combination_tasks: int = 12
    """Held-out tasks pairing an input and an output format that both occur in training, never together."""
    num_train_tasks: int = 192
    """Training tasks (one member each); 0: every remaining pair of the family (325 by default)."""
    samples_train: int = 32
    """Conversations per task that its adapter (and the shared warm start) trains on."""
    samples_support: int = 8
    """Conversations per task a generated adapter is conditioned on and selected with."""
    samples_test: int = 16
    """Conversations per task that measure exact match and log-likelihood."""
    max_length: int = 40
    """Tokens per chat-templated conversation (the longest date pair with SmolLM2's template has 40)."""
    response_window: int = 15
    """Last positions of a conversation that may carry response tokens (the LM head runs there only; the longest
    response of the family, with the end-of-turn tokens, has 15)."""
    warm_start_steps: int = 1000
    """AdamW steps (batches of 16) of one adapter on the union of the training tasks; it is the members' shared
    initialisation (0: members start from peft's initialisation). It learns what the tasks share (reading dates,
    month names, copying digits), so each member only has to pick its format."""
    steps: int = 32
    """AdamW steps per member, from the warm start."""
    lr: float = 5e-3
    """Learning rate of the warm start (and of each member unless ``member_lr`` is set)."""
    member_lr: float = 0.0
    """Learning rate of each member (0: ``lr``)."""
    batch_size: int = 8
    """Conversations per member and step."""
    group_size: int = 4
    """Members trained together in one vmapped run; also the unit of resuming."""
    precision: str = "bf16-mixed"
    """Compute precision of caching and training: bf16-mixed (autocast; weights stay float32) or 32-true."""
    seed: int = 0
    """Seed of the task split, the dates and the shared initialisation."""
    device: str = "auto"
    """Where the base states are cached and members train: auto (cuda when available, else cpu), cpu or cuda."""


def recorded_settings(recipe: LLMAdapterRecipe) -> dict:
    """The settings ``manifest.json`` records and a resumed build must match: all but ``device`` (it does not change
    the zoo, so a build may resume on another one), and ``member_lr`` only when set, so that zoos built before it
    existed still resume and reopen."""
    return {k: v for k, v in asdict(recipe).items() if k != "device" and not (k == "member_lr" and not v)}


def architecture(recipe: LLMAdapterRecipe) -> dict:
    from d2nwg.targets.adapters.frozen_base import cached_base_model, canonical_base
    from d2nwg.targets.adapters.kinds import parse_layers
    from d2nwg.targets.causal_lm.features import GRADIENT_POOLING
    from d2nwg.targets.causal_lm.modeling import architecture_spec

    targets = [t.strip() for t in recipe.target_modules.split(",") if t.strip()]
    layers = parse_layers(cached_base_model(canonical_base(recipe.base)), str(recipe.layers), targets)
    # system="": the family's conversations carry an empty system message (date_formats.conversations), and
    # user records without one get it too, not the chat template's default persona.
    return architecture_spec(
        recipe.base, recipe.kind, targets, layers, recipe.r, recipe.max_length, recipe.response_window, system="", pooling=GRADIENT_POOLING
    )


def build(out: str | Path, **settings) -> ModelZoo:
    """Build (or resume building) a causal-LM adapter zoo in ``out``; writes ``build_time.json`` (seconds this call
    spent: ``features_s``, split into ``caching_s``, ``warm_start_s`` and ``gradients_s`` when it made them, and
    ``members_s``).

    Raises:
        ValueError: unknown formats in ``unseen_outputs``, too few pairs, or conversations longer than
            ``max_length`` / ``response_window``.
    """
    from d2nwg.targets.adapters.frozen_base import load_base_model, load_tokenizer
    from d2nwg.targets.causal_lm.conditioning import gradient_condition
    from d2nwg.targets.causal_lm.evaluate import write_conversations
    from d2nwg.targets.causal_lm.features import conversation_features, condition_blocks
    from d2nwg.targets.causal_lm.finetune import adapter_scores, precision_context, train_adapters

    recipe = LLMAdapterRecipe(**settings)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if recipe.device == "auto" else recipe.device)
    started = time.perf_counter()
    unseen = [f.strip() for f in recipe.unseen_outputs.split(",") if f.strip()]
    tasks = split_tasks(
        unseen, recipe.num_new_combination_tasks, recipe.num_train_tasks or None, recipe.seed, recipe.num_unseen_output_tasks or None
    )
    arch = architecture(recipe)
    model = build_model(arch)
    init = initial_state(lambda: build_model(arch), recipe.seed)
    precision = functools.partial(precision_context, recipe.precision, device)
    precision()  # an unknown precision fails before the hours of work
    layout = WeightLayout.from_state_dict(init, chunk_size=model.hidden)
    sizes = {"train": recipe.samples_train, "support": recipe.samples_support, "test": recipe.samples_test}

    # 1. conversations and their cached features: the frozen layers below the slice run once per conversation
    out = Path(out)
    classes: dict[str, dict[str, torch.Tensor]] = {}
    stages: dict[str, float] = {}  # seconds of each feature stage, for build_time.json
    if not (out / "manifest.json").exists():  # resuming: ModelZoo.create reopens the zoo and keeps its data
        base = arch["config"]["base"]
        encoder, tokenizer = load_base_model(base).to(device), load_tokenizer(base)
        with Progress(transient=True) as progress:
            bar = progress.add_task("caching base states", total=len(tasks))
            for task in tasks:
                items = conversations(task, sum(sizes.values()), recipe.seed)
                classes[task] = {}
                start = 0
                for split in SPLITS:
                    part = items[start : start + sizes[split]]
                    start += sizes[split]
                    write_conversations(out, task, split, part)
                    with precision():
                        classes[task][split] = conversation_features(
                            part, model.first, recipe.max_length, recipe.response_window, base, encoder=encoder, tokenizer=tokenizer,
                            pooling=model.pooling,
                        )
                progress.advance(bar)
        del encoder
        stages["caching_s"] = time.perf_counter() - started
        if recipe.warm_start_steps:
            # One adapter on every training task's conversations: the members' shared initialisation.
            union = torch.cat([classes[t]["train"] for t, v in tasks.items() if v["split"] == "train"])[None].to(device)
            model.to(device)
            with precision(), Progress(transient=True) as progress:
                progress.add_task("warm start (one adapter on all training tasks)", total=None)
                warm = train_adapters(model, init, union, steps=recipe.warm_start_steps, lr=recipe.lr, batch_size=16, seed=recipe.seed)
            init = {k: v[0].cpu().contiguous() for k, v in warm.items()}
            del union
        stages["warm_start_s"] = time.perf_counter() - started - stages["caching_s"]
        # The gradient block of the conditioning features, at the members' shared initialisation, only where it is
        # read: a training task's train split (the regression and the generator fit on it) and a held-out task's
        # support split (what its adapters are generated from). Elsewhere the block stays zero, as in the test split;
        # filling it there cost about 60 s of the default build (0.2 s per support split, 0.64 per train split).
        model.to(device)
        with precision(), Progress(transient=True) as progress:
            bar = progress.add_task("task gradients at the warm start", total=len(tasks))
            for task, record in tasks.items():
                split = "train" if record["split"] == "train" else "support"
                classes[task][split] = gradient_condition(model, init, classes[task][split].to(device)).cpu()
                progress.advance(bar)
        stages["gradients_s"] = time.perf_counter() - started - stages["caching_s"] - stages["warm_start_s"]
    zoo = ModelZoo.create(
        out,
        architecture=arch,
        layout=layout,
        classes=classes,
        tasks=tasks,
        init_state=init,
        input_spec=InputSpec(
            kind="generative-text", base=arch["config"]["base"], max_length=recipe.max_length, first_layer=model.first,
            # The pooled conversation embedding describes the task; the rest is the cached state the slice reads.
            condition_features=model.condition_width, condition_blocks=condition_blocks(model.pooling),
        ),
        recipe={"name": "llm-lora" if recipe.kind == "lora" else "llm-miss", **recorded_settings(recipe)},
    )
    del classes  # the zoo holds them now (data.safetensors)
    features_s = time.perf_counter() - started

    # 2. members, in vmapped groups from the shared initialisation
    task_ids = list(zoo.tasks)
    init = zoo.init_state()  # the warm start (reread when resuming)
    model.to(device)
    with Progress(transient=True) as progress:
        bar = progress.add_task("training adapters", total=len(task_ids))
        for group in member_groups(task_ids, recipe.group_size):
            if all(f"{t}-s{recipe.seed}" in zoo for t in group):
                progress.advance(bar, len(group))
                continue
            x = torch.stack([zoo.class_samples(t, "train")[0] for t in group]).to(device)  # (G, n, D)
            with precision():
                params = train_adapters(
                    model, init, x, steps=recipe.steps, lr=recipe.member_lr or recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed
                )
            # The recorded metric (`zoo info`): test log-likelihood, in float32 (bf16 rounds it to 1/64 nat). Only the
            # test split: scoring the train and support splits too cost about 190 s of the default build (a
            # profile of a 20-task zoo, scaled), and nothing reads them; the held-out members' exact match is the evaluation's oracle row.
            scores = adapter_scores(model, params, torch.stack([zoo.class_samples(t, "test")[0] for t in group]).to(device))
            params = {k: v.cpu() for k, v in params.items()}
            for i, (task, sd) in enumerate(zip(group, unstack_state_dict(params))):
                zoo.add(sd, task, {"test_loglik": float(scores[i])}, seed=recipe.seed, flush=False)
            zoo.flush()
            progress.advance(bar, len(group))
    # Members are the warm start plus a small task delta: scale tokens by that delta (see `fit_stats`).
    zoo.fit_layout("train" if zoo.members("train") else None, scale="residual")
    timing = {"features_s": features_s, **stages, "members_s": time.perf_counter() - started - features_s, "members": len(zoo)}
    atomic_write_text(zoo.root / "build_time.json", json.dumps(timing, indent=2))
    return zoo


RECIPE = Recipe("llm-lora", LLMAdapterRecipe, build)
