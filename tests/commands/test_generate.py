"""`d2nwg generate` on a folder of PNGs, its bad-input errors, and `--help` of every subcommand."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import d2nwg
from d2nwg.commands import main

STEPS = ["--steps", "3"]


def assert_one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float32).reshape(-1) / 255.0


@pytest.fixture(scope="module")
def generated(tiny_pipeline_dir, heldout_images, tmp_path_factory):
    """``d2nwg generate --select support`` run once: (out dir, exit code, stdout)."""
    out = tmp_path_factory.mktemp("generate") / "out"
    import io  # module fixtures cannot use capsys: redirect instead
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main([
            "generate", "--pipeline", str(tiny_pipeline_dir), "--dataset", str(heldout_images),
            "--num-samples", "3", "--select", "support", "--out", str(out), *STEPS,
        ])
    return out, code, buf.getvalue()


def test_generate_writes_the_folder(generated, heldout_images, tiny_digits_zoo):
    out, code, stdout = generated
    assert code == 0, stdout
    names = {p.name for p in out.iterdir()}
    assert {"weights_000.safetensors", "weights_001.safetensors", "weights_002.safetensors"} <= names
    assert {"best.safetensors", "labels.json", "config.json"} <= names
    assert "weights_003.safetensors" not in names
    assert not [n for n in names if n.startswith(".")]  # no temp leftovers
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {str(i): name for i, name in enumerate(sorted(p.name for p in heldout_images.iterdir()))}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == tiny_digits_zoo.architecture
    assert config["num_classes"] == 5
    assert config["selection"]["best"] in range(3)
    assert len(config["selection"]["scores"]) == 3


def test_best_score_is_reproducible_from_the_images(generated, heldout_images):
    """Independent check: re-read the held-back PNGs, run load_model(OUT), compare with the printed score."""
    out, code, stdout = generated
    assert code == 0
    match = re.search(r"accuracy on (\d+) held-back samples: ([0-9.]+)", stdout)
    assert match, stdout
    printed_n, printed = int(match.group(1)), float(match.group(2))
    config = json.loads((out / "config.json").read_text())
    held_back = config["selection"]["held_back"]  # per class (label order): "class/file.png"
    labels = json.loads((out / "labels.json").read_text())
    assert len(held_back) == len(labels)
    xs, ys = [], []
    for label, sources in enumerate(held_back):
        assert sources, "every class holds back at least one sample"
        for source in sources:
            assert source.split("/")[0] == labels[str(label)]
            xs.append(read_png(heldout_images / source))
            ys.append(label)
    assert len(ys) == printed_n
    model = d2nwg.load_model(out)  # the README snippet
    with torch.no_grad():
        pred = model(torch.tensor(np.stack(xs))).argmax(-1)
    accuracy = (pred == torch.tensor(ys)).float().mean().item()
    assert accuracy == pytest.approx(printed, abs=5e-5)
    assert accuracy == pytest.approx(max(config["selection"]["scores"]), abs=1e-6)
    # best.safetensors is the best-scoring sample
    best = config["selection"]["best"]
    best_model = d2nwg.load_model(out, weights=f"weights_{best:03d}.safetensors")
    for (n, a), (_, b) in zip(model.state_dict().items(), best_model.state_dict().items()):
        assert torch.equal(a, b), n


def test_refuses_existing_output(generated, tiny_pipeline_dir, heldout_images, capsys):
    out, _, _ = generated
    before = sorted(p.name for p in out.iterdir())
    code = main(["generate", "--pipeline", str(tiny_pipeline_dir), "--dataset", str(heldout_images), "--out", str(out), *STEPS])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == before


# ----------------------------------------------------------------------------- bad inputs
def _garbage_image(images: Path, pipeline: Path) -> tuple[Path, Path]:
    first = sorted(p for p in images.iterdir())[0]
    (first / "zz_broken.png").write_bytes(b"this is not a png")
    return images, pipeline


def _four_classes(images: Path, pipeline: Path) -> tuple[Path, Path]:
    shutil.rmtree(sorted(images.iterdir())[-1])
    return images, pipeline


def _empty_class(images: Path, pipeline: Path) -> tuple[Path, Path]:
    folder = sorted(images.iterdir())[1]
    for f in folder.iterdir():
        f.unlink()
    return images, pipeline


def _missing_component(images: Path, pipeline: Path) -> tuple[Path, Path]:
    shutil.rmtree(pipeline / "denoiser")
    return images, pipeline


def _corrupt_safetensors(images: Path, pipeline: Path) -> tuple[Path, Path]:
    weights = pipeline / "denoiser" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    return images, pipeline


def _offline_hub_id(images: Path, pipeline: Path) -> tuple[Path, str]:
    return images, "nobody/nothing"


BAD_INPUTS = {
    "unreadable-image": (_garbage_image, "zz_broken.png"),
    "four-classes": (_four_classes, "4 classes"),
    "empty-class": (_empty_class, "no images"),
    "missing-component": (_missing_component, "denoiser"),
    "corrupt-safetensors": (_corrupt_safetensors, "denoiser"),
    "offline-hub-id": (_offline_hub_id, "nobody/nothing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(case, tiny_pipeline_dir, heldout_images, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    # no network and an empty cache: a Hub id cannot resolve
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)  # "nobody/nothing" must not exist as a local folder
    images, pipeline = tmp_path / "images", tmp_path / "pipeline"
    shutil.copytree(heldout_images, images)
    shutil.copytree(tiny_pipeline_dir, pipeline)
    make, expected = BAD_INPUTS[case]
    images, pipeline = make(images, pipeline)
    out = tmp_path / "out"
    code = main(["generate", "--pipeline", str(pipeline), "--dataset", str(images), "--num-samples", "2", "--out", str(out), *STEPS])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert_one_error_line(captured.err)
    assert expected in captured.err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left behind


# ----------------------------------------------------------------------------- --help
HELP = [
    ["zoo", "build", "digits"],
    ["zoo", "info"],
    ["train"],
    ["evaluate"],
    ["generate"],
    ["push"],
    ["demo"],
]


@pytest.mark.parametrize("argv", HELP, ids=[" ".join(a) for a in HELP])
def test_help_mentions_defaults(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    assert "default" in text


def test_same_seed_writes_byte_identical_files(generated, tiny_pipeline_dir, heldout_images, tmp_path):
    """Same seed and inputs: every written file has the same bytes (checksums match; issue 12, item 7)."""
    out = generated[0]
    again = tmp_path / "again"
    assert main([
        "generate", "--pipeline", str(tiny_pipeline_dir), "--dataset", str(heldout_images),
        "--num-samples", "3", "--select", "support", "--out", str(again), *STEPS,
    ]) == 0  # fmt: skip
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in out.iterdir())
    different = [p.name for p in out.iterdir() if p.read_bytes() != (again / p.name).read_bytes()]
    assert different == []
