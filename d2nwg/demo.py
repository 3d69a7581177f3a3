"""The one-command demo: build the digits zoo, train, evaluate, then generate for a folder of PNGs."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FAST_ZOO = {"num_train_tasks": 40, "num_heldout_tasks": 2, "num_unseen_class_tasks": 2, "steps": 40, "group_size": 64}
FAST_TRAIN = ["model.vae_steps=30", "model.diffusion_steps=30", "data.batch_size=16"]


def write_task_images(
    zoo, task: str, out: Path, splits: Sequence[str] = ("support", "test"), per_class: int | None = None
) -> Path:
    """Write a digits task's samples as 8x8 grey PNGs, ink bright as in the zoo.

    Args:
        zoo: a `ModelZoo` of 8x8 digit images (64 features in [0, 1]).
        task: one of ``zoo.tasks``.
        out: folder that gets ``<class name>/<split>_<j>.png``, j zero-padded to 3 digits.
        splits: which of the task's splits to write.
        per_class: at most this many samples per class and split (default: all).

    Returns:
        ``out``, a class-folder image dataset that `d2nwg.data.labelled.load_dataset` reads.
    """
    from PIL import Image

    classes = zoo.tasks[task]["classes"]
    for split in splits:
        for name, samples in zip(classes, zoo.class_samples(task, split)):
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            for j, x in enumerate(samples[:per_class]):
                pixels = np.clip(np.rint(x.numpy().reshape(8, 8) * 255.0), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{split}_{j:03d}.png")
    return out


def run_demo(out: Path, config: str | None = None, fast: bool = False) -> dict:
    """Run every stage into ``out`` and print what was produced; returns the paths and timings."""
    from d2nwg.data.labelled import load_dataset
    from d2nwg.evaluation.protocol import evaluate
    from d2nwg.pipelines.output_folder import generate_to_folder, load_model
    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
    from d2nwg.training.lightning_cli import train
    from d2nwg.utils.console import print_heading, print_summary, print_summary_by_kind, print_table
    from d2nwg.utils.plots import plot_training_curves
    from model_zoo import get_recipe

    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    print_heading("1/4 building the digits zoo")
    zoo = get_recipe("digits")(out / "zoo", **(FAST_ZOO if fast else {}))
    timings["zoo"] = time.perf_counter() - t

    t = time.perf_counter()
    print_heading("2/4 training the hyper-model")
    run = out / "run"
    pipeline_dir = run / "pipeline"
    if not (pipeline_dir / "model_index.json").exists():
        train(run, config, str(zoo.root), FAST_TRAIN if fast else [], progress_bar=False)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    print_heading("3/4 evaluating on held-out tasks")
    pipe = D2NWGPipeline.from_pretrained(pipeline_dir)
    report_dir = out / "report"
    report = evaluate(pipe, zoo, report_dir, num_samples=10)
    metrics = sorted(run.glob("logs/*/metrics.csv"))
    if metrics:
        plot_training_curves(metrics[-1], report_dir / "training_curves.png")
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    print_heading("4/4 generating for a held-out task given as PNG images")
    task = zoo.members("heldout")[0].task
    images = write_task_images(zoo, task, out / "images" / task)
    dataset = load_dataset(images, pipe.target_spec.input)
    generated = out / "generated"
    if generated.exists():
        import shutil

        shutil.rmtree(generated)
    result = generate_to_folder(pipe, dataset, generated, num_samples=10, select="support", source=str(pipeline_dir))
    model = load_model(generated)
    timings["generate"] = time.perf_counter() - t

    print_summary(report["summary"])
    print_summary_by_kind(report["summary_by_kind"])
    print_table(
        "demo outputs",
        [
            ("zoo", zoo.root),
            ("pipeline", pipeline_dir),
            ("report", report_dir / "report.md"),
            ("plot", report_dir / "accuracy_by_method.png"),
            ("images of the new task", images),
            ("generated weights", result.best),
            ("held-back accuracy of best", f"{result.best_score:.4f}"),
            ("loaded model", type(model).__name__),
            ("seconds per stage", json.dumps({k: round(v, 1) for k, v in timings.items()})),
        ],
    )
    return {"timings": timings, "summary": report["summary"], "best_score": result.best_score}
