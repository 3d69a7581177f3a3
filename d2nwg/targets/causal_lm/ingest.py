"""Bring your own LoRAs: a folder of PEFT adapter folders, each mapped to its JSONL task, becomes a generative zoo.

``d2nwg zoo ingest --checkpoints adapters/ --datasets data/ --mapping map.csv --out zoo`` takes this path when
``--checkpoints`` holds PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``). Each
adapter is one member; its mapped dataset (a JSONL file of `d2nwg.data.instructions`) is its task, split into
train/support/test conversations. The zoo is what `model_zoo.llm_lora` builds (architecture
``causal-lm-adapter``, cached base states, stored conversations), so ``d2nwg train`` and ``d2nwg evaluate`` work
on it unchanged.

Every adapter must share one shape: the adapter type (LoRA or MiSS; legacy Bone folders are converted to MiSS on
the way in, `d2nwg.targets.adapters.legacy_bone.convert_legacy_bone`), rank, alpha, target modules, adapted layers and base model. A
mismatch is refused with one line naming the adapter and what differs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from d2nwg.security import inside
from d2nwg.utils.io import read_json

LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class AdapterShape:
    """What every adapter of one zoo must share."""

    kind: str
    r: int
    lora_alpha: float | None
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    base: str


def find_adapter_folders(root: str | Path) -> list[Path]:
    """Every folder at or below ``root`` holding an ``adapter_config.json``, sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("adapter_config.json"))


def read_adapter(folder: Path) -> tuple[AdapterShape, dict[str, torch.Tensor]]:
    """An adapter folder's shape and its tensors under standard PEFT keys (legacy Bone converted to MiSS).

    Raises:
        ValueError: (one line, naming the folder) an unreadable config or weights, or an adapter type other than
            LoRA, MiSS or Bone.
    """
    from d2nwg.targets.adapters.legacy_bone import convert_legacy_bone, convert_legacy_bone_config
    from d2nwg.utils.io import load_weights

    try:
        config = read_json(folder / "adapter_config.json", f"adapter '{folder.name}' config")
    except OSError as err:
        raise ValueError(f"adapter '{folder.name}': cannot read adapter_config.json: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"adapter '{folder.name}': adapter_config.json is not a JSON object")
    weights_path = next((folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()), None)
    if weights_path is None:
        raise ValueError(f"adapter '{folder.name}' has no adapter_model.safetensors or adapter_model.bin")
    weights = load_weights(weights_path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "BONE":
        config, weights = convert_legacy_bone_config(config), convert_legacy_bone(weights)
        peft_type = "MISS"
    if peft_type == "LORA":
        kind, alpha = "lora", float(config.get("lora_alpha", 8))
    elif peft_type == "MISS":
        kind, alpha = ("miss-bat" if config.get("init_weights") == "bat" else "miss"), None
    else:
        raise ValueError(f"adapter '{folder.name}' is a {peft_type or 'untyped'} adapter; d2nwg ingests LoRA, MiSS and Bone")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    # Module names ("model.layers.28.self_attn.q_proj") or short names ("q_proj"): keep the last part.
    short = tuple(sorted({str(t).rsplit(".", 1)[-1] for t in targets}))
    layers = tuple(sorted({int(m.group(1)) for k in weights if (m := LAYER.search(k))}))
    shape = AdapterShape(kind, int(config.get("r", 0)), alpha, short, layers, str(config.get("base_model_name_or_path") or ""))
    return shape, weights


def shape_mismatch(name: str, shape: AdapterShape, reference_name: str, reference: AdapterShape) -> str | None:
    """One line naming the first way ``shape`` differs from the reference adapter's, or ``None``."""
    labels = {"kind": "adapter type", "r": "rank", "lora_alpha": "lora_alpha", "target_modules": "target modules",
              "layers": "adapted layers", "base": "base model"}  # fmt: skip
    for field, label in labels.items():
        mine, theirs = getattr(shape, field), getattr(reference, field)
        if mine != theirs:
            return f"adapter '{name}' has {label} {_show(mine)}, but '{reference_name}' has {_show(theirs)}; a zoo holds adapters of one shape"
    return None


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value) if isinstance(value, str) else str(value)


def to_member(module, peft_weights: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Standard PEFT keys -> the architecture's state-dict keys (`d2nwg.targets.causal_lm.modeling.CausalLMAdapter`)."""
    from d2nwg.targets.adapters.kinds import to_peft_state_dict

    member = {}
    for key, value in module.state_dict().items():
        peft_key = next(iter(to_peft_state_dict({key: value})))
        if peft_key not in peft_weights:
            raise ValueError(f"adapter '{name}' lacks tensor {peft_key}")
        if tuple(peft_weights[peft_key].shape) != tuple(value.shape):
            raise ValueError(f"adapter '{name}': tensor {peft_key} has shape {list(peft_weights[peft_key].shape)}, expected {list(value.shape)}")
        member[key] = peft_weights[peft_key].float().contiguous()
    return member


def response_limits(tokenizer, conversations: Sequence) -> tuple[int, int]:
    """``(max_length, response_window)`` that fit every conversation (tokens, after the chat template)."""
    from d2nwg.data.instructions import IGNORE_INDEX, encode_conversations

    batch = encode_conversations(tokenizer, list(conversations), last_turn_only=True)
    lengths = batch["attention_mask"].sum(1)
    labelled = batch["labels"] != IGNORE_INDEX
    first = labelled.float().argmax(1)
    return int(lengths.max()), int((lengths - first).max())


def ingest_adapters(
    checkpoints: str | Path,
    datasets: str | Path,
    mapping: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    heldout_fraction: float = 0.1,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    warn: Callable[[str], None] = lambda message: None,
):
    """Build a generative zoo at ``out`` from PEFT adapter folders and their JSONL tasks; returns the `ModelZoo`.

    Args:
        checkpoints: a folder of PEFT adapter folders (at any depth).
        datasets: the folder the mapping's dataset names resolve in (``name`` or ``name.jsonl``).
        mapping: CSV ``checkpoint,dataset[,split][,run]`` or JSON, as for ``d2nwg zoo ingest``; a checkpoint is an
            adapter folder's path below ``checkpoints`` or its name.
        base: the base model (default: the adapters' ``base_model_name_or_path``).
        heldout_fraction: share of tasks without a mapped split held out. split_fractions: per-dataset
            train/support/test shares of its conversations.

    Raises:
        ValueError: (one line) mismatched adapters, unknown adapters or datasets, too few conversations.
    """
    from d2nwg.data.instructions import read_instructions
    from d2nwg.ingest.mapping import read_mapping
    from d2nwg.ingest.settings import check_new_folder, parse_split_fractions
    from d2nwg.ingest.tasks import IngestTask, split_tasks
    from d2nwg.targets.adapters.frozen_base import load_base_model, load_tokenizer
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.evaluate import write_conversations
    from d2nwg.targets.causal_lm.features import NEW_ZOO_POOLING, conversation_features
    from d2nwg.targets.causal_lm.modeling import architecture_spec
    from d2nwg.zoo.layout import WeightLayout
    from d2nwg.zoo.model_zoo import SPLITS, ModelZoo
    from d2nwg.zoo.specs import InputSpec

    out = check_new_folder(out)
    checkpoints, datasets = Path(checkpoints), Path(datasets)
    fractions = parse_split_fractions(split_fractions)
    folders = {str(f.relative_to(checkpoints)): f for f in find_adapter_folders(checkpoints)}
    by_name: dict[str, list[Path]] = {}
    for f in folders.values():
        by_name.setdefault(f.name, []).append(f)

    # 1. adapters: one shape for all
    adapters, tasks, reference = {}, [], None
    for entry in read_mapping(mapping):
        folder = folders.get(entry.checkpoint) or (by_name.get(entry.checkpoint, [None])[0] if len(by_name.get(entry.checkpoint, [])) == 1 else None)
        if folder is None:
            raise ValueError(f"mapping names adapter '{entry.checkpoint}', which is not a unique adapter folder below {checkpoints}")
        named = inside(datasets, entry.dataset, "mapped dataset")
        dataset = named if named.is_file() else inside(datasets, f"{entry.dataset}.jsonl", "mapped dataset")
        if not dataset.is_file():
            raise ValueError(f"adapter '{entry.checkpoint}': dataset '{entry.dataset}' not found in {datasets}")
        shape, weights = read_adapter(folder)
        if base is not None:
            shape = AdapterShape(**{**shape.__dict__, "base": base})
        if reference is None:
            reference = (entry.checkpoint, shape)
        elif message := shape_mismatch(entry.checkpoint, shape, *reference):
            raise ValueError(message)
        if dataset.stem in {t.id for t in tasks}:
            raise ValueError(f"adapter '{entry.checkpoint}': dataset '{dataset.name}' is mapped to another adapter too; one adapter per task")
        adapters[dataset.stem] = (entry.checkpoint, weights, dataset)
        tasks.append(IngestTask(dataset.stem, dataset.stem, [], entry.split, dataset.stem, (entry.group,) if entry.group else ()))
    shape = reference[1]
    if not shape.base:
        raise ValueError("the adapters do not name their base model (base_model_name_or_path); pass --base")
    task_split = split_tasks(tasks, heldout_fraction, seed)

    # 2. conversations split per task, and the limits that fit them all
    base_name = shape.base
    tokenizer = load_tokenizer(base_name)
    parts: dict[str, dict[str, list]] = {}
    for task, (name, _, path) in adapters.items():
        items = read_instructions(path)
        random.Random(f"{seed}:{task}").shuffle(items)
        n_train, n_support = round(fractions[0] * len(items)), round(fractions[1] * len(items))
        parts[task] = {"train": items[:n_train], "support": items[n_train : n_train + n_support], "test": items[n_train + n_support :]}
        empty = [s for s in SPLITS if not parts[task][s]]
        if empty:
            raise ValueError(f"dataset {path.name} of adapter '{name}' has {len(items)} conversations, too few for a {', '.join(empty)} split")
    longest, window = response_limits(tokenizer, [c for p in parts.values() for s in p.values() for c in s])
    # Headroom: user prompts at generation time may be a little longer than the longest record seen here.
    max_length, window = longest + max(8, longest // 4), window + max(4, window // 4)
    encoder = load_base_model(base_name)
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise ValueError(f"the longest conversation has {longest} tokens; with headroom {max_length}, more than the base's {limit} positions")
    options = {"lora_alpha": shape.lora_alpha} if shape.kind == "lora" else None
    arch = architecture_spec(
        base_name, shape.kind, shape.target_modules, shape.layers, shape.r, max_length, window, options, pooling=NEW_ZOO_POOLING
    )
    module = build_model(arch)

    # 3. the zoo: cached base states, conversations, one member per adapter
    classes = {
        task: {s: conversation_features(items, module.first, max_length, window, base_name, encoder=encoder, tokenizer=tokenizer, pooling=module.pooling) for s, items in p.items()}
        for task, p in parts.items()
    }
    members = {task: to_member(module, weights, name) for task, (name, weights, _) in adapters.items()}
    zoo = ModelZoo.create(
        out,
        architecture=arch,
        layout=WeightLayout.from_state_dict(next(iter(members.values())), chunk_size=module.hidden),
        classes=classes,
        tasks={t: {"classes": [t], "split": task_split[t], "dataset": adapters[t][2].name, "kind": "new_dataset"} for t in adapters},
        input_spec=InputSpec(kind="generative-text", base=arch["config"]["base"], max_length=max_length, first_layer=module.first, condition_features=module.hidden),
        recipe={"name": "custom", "source": "peft-adapters", "seed": seed},
    )
    for task, p in parts.items():
        for split, items in p.items():
            write_conversations(zoo.root, task, split, items)
    from d2nwg.targets.causal_lm.finetune import adapter_scores
    from d2nwg.targets.population import stack_state_dicts

    for task, member in members.items():
        score = adapter_scores(module, stack_state_dicts([member]), classes[task]["test"])
        zoo.add(member, task, {"test_loglik": float(score[0])}, seed=0, flush=False)
    zoo.flush()
    zoo.fit_layout("train")
    return zoo
