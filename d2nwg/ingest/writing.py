"""Writing the ingested zoo: members, task data, layout and the recipe record that ``zoo info`` shows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from d2nwg.ingest.checkpoints import BadCheckpoint, Target
from d2nwg.ingest.datasets import ZooDataset
from d2nwg.ingest.discovery import Sources
from d2nwg.ingest.settings import IngestSettings
from d2nwg.ingest.tasks import IngestTask
from d2nwg.utils.io import atomic_dir
from d2nwg.zoo.model_zoo import ModelZoo
from d2nwg.zoo.specs import InputSpec


def write_zoo(
    out: Path,
    tasks: Sequence[IngestTask],
    task_splits: Mapping[str, str],
    datasets: Mapping[str, ZooDataset],
    target: Target,
    input_spec: InputSpec,
    recipe: Mapping,
) -> ModelZoo:
    """Stage 6: write the zoo atomically: ``out`` appears complete or not at all.

    The class pool holds the classes of the datasets the tasks use, as ``"<dataset>/<class>"``. Member
    weights are read from their checkpoint files again, so only one is in memory at a time.

    Returns:
        The written zoo, opened from ``out``.
    """
    used = sorted({t.dataset for t in tasks})
    classes = {
        f"{key}/{cls}": datasets[key].splits[i] for key in used for i, cls in enumerate(datasets[key].data.class_names)
    }
    zoo_tasks = {
        t.id: {
            "classes": [f"{t.dataset}/{c}" for c in datasets[t.dataset].data.class_names],
            "split": task_splits[t.id],
            "dataset": t.dataset,  # lets `zoo info`/`evaluate` check that no held-out task shares a train dataset
        }
        for t in tasks
    }
    with atomic_dir(out) as tmp:
        zoo = ModelZoo.create(
            tmp,
            architecture=target.spec,
            layout=target.layout,
            classes=classes,
            tasks=zoo_tasks,
            input_spec=input_spec,
            recipe=dict(recipe),
        )
        for task in tasks:
            for member in task.members:
                state = target.read(member.path)
                zoo.add(state, task.id, member.metrics, seed=0, member_id=member.member_id, flush=False)
        zoo.flush()
        zoo.fit_layout("train")
    return ModelZoo.open(out)


def ingest_recipe(
    settings: IngestSettings, sources: Sources, tasks: Sequence[IngestTask], skipped: Sequence[BadCheckpoint]
) -> dict:
    """The zoo's ``recipe`` record: where the members came from and with which options."""
    return {
        "name": "ingest",
        "checkpoints": str(sources.checkpoint_root.resolve()),
        "datasets": str(sources.dataset_root.resolve()),
        "mapping": str(sources.mapping.resolve()),
        "include": list(settings.include),
        "exclude": list(settings.exclude),
        "chunk_size": settings.chunk_size,
        "heldout_fraction": settings.heldout_fraction,
        "split_fractions": list(settings.split_fractions),
        "seed": settings.seed,
        "epochs": settings.epochs,
        "skip_bad": settings.skip_bad,
        "skipped": [b.name for b in skipped],
        "sources": {m.member_id: m.entry.checkpoint for t in tasks for m in t.members},
    }
