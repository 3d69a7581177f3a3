"""The adapter-scale benchmark runs end to end on a toy size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_adapter_scale.py"


@pytest.mark.parametrize("phase", ["train", "sample"])
def test_bench_phase_on_toy_size(monkeypatch, phase):
    spec = importlib.util.spec_from_file_location("bench_adapter_scale", PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.SIZES, "toy", (32, 2, 16))
    row = bench.run_phase("toy", phase)
    assert row["params"] == 2 * (8 * 32 + 32 * 8 + 8 * 32 + 16 * 8)
    assert row["tokens"] == 2 * (8 + 8 + 8 + 4) and row["peak_mb"] >= 0
    assert (row["vae_step_s"] > 0) if phase == "train" else (row["sampled_params"] == row["params"])
