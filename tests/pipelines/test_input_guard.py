"""Guard the condition (issue 12, item 6): out-of-range data is rejected, far-away data is warned about,
and a chance-level ``best.safetensors`` says so."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from d2nwg.commands import main
from d2nwg.pipelines.input_guard import at_chance, chance_threshold, check_feature_range, zoo_statistics
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.zoo.specs import TargetSpec

GENERATE = ["--num-samples", "3", "--steps", "3", "--select", "support"]


@pytest.fixture(scope="module")
def guarded_pipeline_dir(tiny_digits_zoo, make_tiny_pipeline, tmp_path_factory) -> Path:
    """The untrained tiny pipeline with the statistics an export records (`zoo_statistics` of the train tasks)."""
    pipe = make_tiny_pipeline(tiny_digits_zoo)
    tasks = list(dict.fromkeys(m.task for m in tiny_digits_zoo.members("train")))
    stats = zoo_statistics(pipe, [tiny_digits_zoo.class_samples(t, "train") for t in tasks], raw_features=True)
    pipe.register_to_config(target=dataclasses.replace(pipe.target_spec, data_stats=stats).to_dict())
    path = tmp_path_factory.mktemp("guarded") / "pipeline"
    pipe.save_pretrained(path)
    return path


def task_npz(zoo, path: Path, scale: float = 1.0) -> Path:
    """A held-out task's support samples as an ``.npz`` (x, y), multiplied by ``scale``."""
    x, y = zoo.task_data(zoo.members("heldout")[0].task, "support")
    np.savez(path, x=(x * scale).numpy(), y=y.numpy())
    return path


def noise_images(root: Path, classes: int = 5, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=(8, 8)).astype(np.uint8), mode="L").save(root / f"c{k}" / f"{i}.png")
    return root


def test_export_records_the_zoo_range_and_task_embeddings(guarded_pipeline_dir, tiny_digits_zoo):
    stats = D2NWGPipeline.from_pretrained(guarded_pipeline_dir).target_spec.data_stats
    assert stats["features"]["min"] == 0.0 and stats["features"]["max"] == pytest.approx(1.0)
    assert len(stats["embeddings"]) == len({m.task for m in tiny_digits_zoo.members("train")})
    assert 0 < stats["nn_distance"]["median"] <= stats["nn_distance"]["max"]
    # Targets without statistics (older pipelines) read and write as before.
    plain = TargetSpec.from_dict({k: v for k, v in TargetSpec.from_dict(json.loads(
        (guarded_pipeline_dir / "model_index.json").read_text())["target"]).to_dict().items() if k != "data_stats"})
    assert plain.data_stats is None and "data_stats" not in plain.to_dict()


def test_pixels_0_255_for_a_0_1_zoo_are_rejected_in_one_line(guarded_pipeline_dir, tiny_digits_zoo, tmp_path, capsys):
    data = task_npz(tiny_digits_zoo, tmp_path / "pixels255.npz", scale=255.0)
    code = main(["generate", "--pipeline", str(guarded_pipeline_dir), "--dataset", str(data), "--out", str(tmp_path / "gen"), *GENERATE])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "[0, 255]" in err[0] and "[0, 1]" in err[0] and "rescale" in err[0]
    assert not (tmp_path / "gen").exists()


def test_in_range_data_generates_without_warnings(guarded_pipeline_dir, tiny_digits_zoo, tmp_path, capsys):
    data = task_npz(tiny_digits_zoo, tmp_path / "task.npz")
    code = main(["generate", "--pipeline", str(guarded_pipeline_dir), "--dataset", str(data), "--out", str(tmp_path / "gen"), *GENERATE])
    assert code == 0
    # The untrained pipeline earns a trust warning (`d2nwg.evaluation.trust`: no gain over NCM); the guard itself stays silent.
    assert "far from every training task" not in capsys.readouterr().err
    assert not [w for w in json.loads((tmp_path / "gen" / "config.json").read_text())["warnings"] if "cheap baseline" not in w]


def test_pure_noise_warns_with_distances_and_flags_chance_level_best(guarded_pipeline_dir, tmp_path, capsys):
    data = noise_images(tmp_path / "noise")
    code = main(["generate", "--pipeline", str(guarded_pipeline_dir), "--dataset", str(data), "--out", str(tmp_path / "gen"), *GENERATE])
    assert code == 0
    captured = capsys.readouterr()
    # Trust warnings about the untrained pipeline (`d2nwg.evaluation.trust`) aside, the guard warns once.
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:") and "cheap baseline" not in line]
    assert len(warnings) == 1 and "far from every training task" in warnings[0], captured.err
    numbers = re.search(r"embedding is ([0-9.e+-]+) from the nearest one, while training tasks are at most ([0-9.e+-]+)", warnings[0])
    distance, spacing = float(numbers[1]), float(numbers[2])
    assert distance > spacing > 0
    best_line = next(line for line in captured.out.splitlines() if line.startswith("best:"))
    assert "AT CHANCE" in best_line
    config = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert config["selection"]["at_chance"] is True and config["warnings"][0] == warnings[0].removeprefix("warning: ")


def test_pipelines_without_statistics_generate_as_before(tiny_pipeline_dir, tiny_digits_zoo, tmp_path, capsys):
    data = task_npz(tiny_digits_zoo, tmp_path / "pixels255.npz", scale=255.0)
    code = main(["generate", "--pipeline", str(tiny_pipeline_dir), "--dataset", str(data), "--out", str(tmp_path / "gen"), *GENERATE])
    assert code == 0, capsys.readouterr().err


def test_feature_range_tolerates_values_near_the_zoo_range():
    stats = {"features": {"min": 0.0, "max": 1.0}}
    check_feature_range(stats, [torch.rand(20, 4) * 1.3 - 0.1])  # a little beyond [0, 1]: accepted
    check_feature_range(None, [torch.full((3, 4), 1e6)])  # no statistics: nothing to check
    with pytest.raises(ValueError, match="outside"):
        check_feature_range(stats, [torch.rand(20, 4) * 10])


def test_chance_threshold_accounts_for_picking_the_best_of_several():
    assert chance_threshold(5, 24, candidates=10) > chance_threshold(5, 24) > 0.2
    assert at_chance(0.25, 5, 24, candidates=10) and not at_chance(0.9, 5, 24, candidates=10)
    # Many held-back samples: a clear margin over 1/K is no longer chance.
    assert not at_chance(0.3, 5, 10_000)
