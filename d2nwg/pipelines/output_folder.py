"""Generate weights for a user's dataset and write them as a ready-to-load folder.

``OUT/`` holds ``weights_000.safetensors`` ... (one per sample), ``best.safetensors``
when a selection was asked for, ``labels.json`` (label id -> class name) and
``config.json`` (architecture, layout, input format), so that
``d2nwg.load_model(OUT)`` returns a ready ``nn.Module``.

When the architecture has an ``export_folder`` hook (text adapters), ``OUT/`` is
also a standard folder for the weights `load_model` picks: for adapters,
``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained(base, OUT)``)
plus ``head.safetensors`` and ``head.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from d2nwg.data.labelled import LabelledDataset, to_xy
from d2nwg.evaluation.trust import generation_warnings, ncm_accuracy
from d2nwg.pipelines.input_guard import chance_threshold, check_feature_range, embedding_distance, far_from_zoo_message
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.security import check_architecture_spec
from d2nwg.targets.architectures import build_model, folder_exporter
from d2nwg.targets.population import population_accuracy, stack_state_dicts
from d2nwg.utils.io import atomic_dir, load_safetensors, read_json, save_safetensors
from d2nwg.zoo.layout import WeightLayout


@dataclass
class GenerationResult:
    out: Path
    files: list[Path]
    best: Path | None
    best_score: float | None
    scores: list[float] | None
    num_held_back: int = 0
    exported: str | None = None
    """The weight file that the standard (e.g. PEFT) folder in ``out`` holds, if the architecture exports one."""
    best_at_chance: bool | None = None
    """Whether the best weight set's held-back accuracy is not clearly above chance (`d2nwg.pipelines.input_guard.at_chance`)."""
    chance_threshold: float | None = None
    """The held-back accuracy below which `best_at_chance` holds (`d2nwg.pipelines.input_guard.chance_threshold` for the best of N)."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """What the dataset checks found (e.g. the dataset is far from every training task)."""


def split_held_back(dataset: LabelledDataset, fraction: float, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[str]]]:
    """Per class: samples to condition on, samples held back for selection, and the held-back sources."""
    g = torch.Generator().manual_seed(seed)
    cond, held, held_sources = [], [], []
    for name, x, src in zip(dataset.class_names, dataset.per_class, dataset.sources):
        if len(x) < 2:
            raise ValueError(f"class '{name}' has {len(x)} sample(s); selection needs at least 2 per class")
        n_held = min(max(1, round(fraction * len(x))), len(x) - 1)
        perm = torch.randperm(len(x), generator=g)
        cond.append(x[perm[n_held:]])
        held.append(x[perm[:n_held]])
        held_sources.append([src[i] for i in perm[:n_held].tolist()])
    return cond, held, held_sources


def generate_to_folder(
    pipe: D2NWGPipeline,
    dataset: LabelledDataset,
    out: str | Path,
    *,
    num_samples: int = 10,
    seed: int = 0,
    select: str | None = None,
    held_back_fraction: float = 0.3,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    source: str = "",
    warn=None,
) -> GenerationResult:
    """Generate ``num_samples`` weight sets for ``dataset`` and write them atomically to ``out``.

    With ``select="support"`` a ``held_back_fraction`` of each class is kept out of the
    conditioning, and the weight set most accurate on it is written as ``best.safetensors``.

    The dataset is first compared with the pipeline's zoo (`d2nwg.pipelines.input_guard`; pipelines that recorded
    no statistics skip this): values outside the zoo's range are rejected, and a dataset farther
    from every training task than training tasks are from each other gets a warning (``warn``,
    and ``GenerationResult.warnings``). A best weight set whose held-back accuracy is not clearly
    above chance is flagged (``best_at_chance``, and ``"at_chance"`` in ``config.json``). The trust checks of
    `d2nwg.evaluation.trust.generation_warnings` add a warning each when the best held-back accuracy does not beat the
    nearest class mean on the same samples, the VAE reconstruction ratio recorded at export is low, or the
    samples have collapsed onto one another.

    Raises:
        ValueError: a non-empty ``out``, an unknown ``select``, a class count the pipeline does not
            generate, or values outside the zoo's range.
    """
    warn = warn or (lambda message: None)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} already exists and is not empty")
    if select not in (None, "support"):
        raise ValueError(f"--select must be 'support', got {select!r}")
    if dataset.num_classes != pipe.num_classes:
        raise ValueError(
            f"the dataset has {dataset.num_classes} classes but the pipeline generates {pipe.num_classes}-class models"
        )
    stats = pipe.target_spec.data_stats
    check_feature_range(stats, dataset.per_class, pipe.target_spec.input.condition_features)
    if select:
        if not 0.0 < held_back_fraction < 1.0:
            raise ValueError(f"--held-back must be a fraction in (0, 1), got {held_back_fraction}")
        cond, held, held_sources = split_held_back(dataset, held_back_fraction, seed)
    else:
        cond, held, held_sources = dataset.per_class, None, None
    found = []
    distances = embedding_distance(pipe, stats, cond)
    if distances is not None and (message := far_from_zoo_message(*distances)):
        found.append(message)
        warn(message)
    generator = torch.Generator().manual_seed(seed)
    output = pipe(cond, num_samples=num_samples, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator)
    scores = best_index = best_at_chance = threshold = None
    if held is not None:
        x, y = to_xy(held)
        scores = population_accuracy(pipe.build_model(), stack_state_dicts(output.weights), x, y).tolist()
        best_index = max(range(len(scores)), key=scores.__getitem__)
        threshold = chance_threshold(dataset.num_classes, len(y), candidates=num_samples)
        best_at_chance = scores[best_index] < threshold
    # Trust checks (`d2nwg.evaluation.trust`): no gain over a cheap baseline on the same held-back samples, a weak VAE,
    # collapsed samples; one line each, with the figures.
    ncm = None if held is None else ncm_accuracy(cond, held, pipe.target_spec.input.condition_features)
    best_score = None if best_index is None else scores[best_index]
    for message in generation_warnings(pipe, output.weights, best_score, ncm, sum(len(h) for h in held or [])):
        found.append(message)
        warn(message)
    target = pipe.target_spec
    names = [f"weights_{i:03d}.safetensors" for i in range(num_samples)]
    export = folder_exporter(target.architecture)
    chosen = best_index if best_index is not None else 0  # the weight set load_model picks
    exported = None if export is None else default_weights_file(best_index is not None)
    config = {
        "architecture": target.architecture,
        "layout": target.layout,
        "input": target.input.to_dict(),
        "num_classes": target.num_classes,
        "pipeline": source,
        "pipeline_hub": pipe.hub_record,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "head_solver": pipe.config.head_solver,
        "selection": None
        if held is None
        else {
            "method": "held-back samples", "held_back": held_sources, "scores": scores, "best": best_index,
            "at_chance": best_at_chance, "chance_threshold": threshold,
        },
        "warnings": found,
        "exported": exported,
    }
    with atomic_dir(out) as tmp:
        if export is not None:
            export(output.weights[chosen], target.architecture, tmp)
        for name, weights in zip(names, output.weights):
            save_safetensors(tmp / name, weights, {"seed": seed, "format": "d2nwg-generated"})
        if best_index is not None:
            save_safetensors(
                tmp / "best.safetensors", output.weights[best_index], {"score": scores[best_index], "at_chance": best_at_chance}
            )
        (tmp / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(dataset.class_names)}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return GenerationResult(
        out=out,
        files=[out / n for n in names],
        best=out / "best.safetensors" if best_index is not None else None,
        best_score=scores[best_index] if best_index is not None else None,
        scores=scores,
        num_held_back=sum(len(h) for h in held) if held is not None else 0,
        exported=exported,
        best_at_chance=best_at_chance,
        chance_threshold=threshold,
        warnings=found,
    )


def use_base(pipe: D2NWGPipeline, base: str) -> str | None:
    """Point an adapter pipeline (text classifier or causal LM) at another copy of its base model: a local folder or a Hub id.

    For a pipeline whose zoo was built on a folder that is not on this machine. The base must
    hold the same weights: the generated adapters and the cached features depend on them. It is
    checked against the base the pipeline recorded (`d2nwg.targets.adapters.base_identity.check_base`).

    Returns:
        A warning line when the base has the right shapes but other weights under the adapters, else None.

    Raises:
        ValueError: a pipeline that is not a text pipeline, a base that cannot be loaded, or (a
            ``UserError``) one whose architecture or adapted shapes differ, naming each difference.
    """
    from d2nwg.targets.adapters.base_identity import check_base
    from d2nwg.targets.adapters.frozen_base import canonical_base

    target = pipe.target_spec
    if target.input.kind not in ("text", "generative-text"):
        raise ValueError(f"--base applies to adapter pipelines only; this one generates {target.architecture['name']!r}")
    base = canonical_base(base)
    # Causal-LM pipelines record no base identity yet: their base is loaded as given (shapes are checked on injection).
    warning = check_base(target, base) if target.input.kind == "text" or target.base_identity else None
    architecture = json.loads(json.dumps(target.architecture))  # a deep copy: the frozen config stays untouched
    architecture["config"]["base"] = base
    target = dataclasses.replace(target, architecture=architecture, input=dataclasses.replace(target.input, base=base))
    pipe.register_to_config(target=target.to_dict())
    return warning


def default_weights_file(selected: bool) -> str:
    """The weight set `load_model` loads and adapter folders export: the best on held-back samples if
    selection ran, else the first sample."""
    return "best.safetensors" if selected else "weights_000.safetensors"


def load_model(folder: str | Path, weights: str | None = None, *, trust_remote_code: bool | None = None) -> nn.Module:
    """A ready ``nn.Module`` from a `generate_to_folder` output (``best.safetensors`` if present).

    Args:
        folder: the output folder of ``d2nwg generate``.
        weights: a weight file in ``folder`` (default: ``best.safetensors``, else ``weights_000.safetensors``).
        trust_remote_code: allow an architecture recorded as ``"module:callable"`` to be imported (it runs
            that module's code); ``None`` uses the ambient consent (`d2nwg.security.trust_remote_code`).

    Raises:
        d2nwg.security.RemoteCodeError: the config names code and consent is missing.
        ValueError: not a generate output, a corrupt config or weight file, or weights that do not fit.

    Example:
        >>> import d2nwg
        >>> model = d2nwg.load_model("runs/generated")          # doctest: +SKIP
        >>> labels = json.load(open("runs/generated/labels.json"))  # doctest: +SKIP
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json; is it a d2nwg generate output?")
    config = read_json(config_path, "generate config")
    if not isinstance(config, dict) or "layout" not in config:
        raise ValueError(f"{config_path} is not a d2nwg generate config (no layout)")
    check_architecture_spec(config.get("architecture"), f"generated folder {folder}", trust_remote_code)
    if weights is None:
        weights = default_weights_file((folder / "best.safetensors").exists())
    model = build_model(config["architecture"])
    WeightLayout.from_dict(config["layout"]).inject(model, load_safetensors(folder / weights))
    return model.eval()
