"""No code runs from a pipeline, zoo or generate output without --trust-remote-code; with it, a user's own
architecture module still works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.security.hostile import assert_one_error, copy_tree, edit_json, files_under, run_cli

pytestmark = pytest.mark.timeout(120)
STEPS = ["--steps", "2", "--num-samples", "2"]


def name_code(index: dict, module: str, config: dict) -> None:
    index["target"]["architecture"] = {"name": f"{module}:build", "config": config}


@pytest.fixture
def coded_pipeline(tmp_path, tiny_pipeline_dir, hostile):
    """A copy of the tiny pipeline whose target architecture is the hostile module's ``build``."""
    module, marker = hostile
    pipe = copy_tree(tiny_pipeline_dir, tmp_path / "coded")
    edit_json(pipe / "model_index.json", lambda d: name_code(d, module, d["target"]["architecture"]["config"]))
    return pipe, marker


def test_issue_scenario_subprocess_call_runs_nothing(tmp_path, tiny_pipeline_dir, heldout_images):
    """The report's scenario as written: ``subprocess:call`` with a shell command, through the real console script."""
    marker = tmp_path / "marker"
    evil = copy_tree(tiny_pipeline_dir, tmp_path / "evil")
    spec = {"name": "subprocess:call", "config": {"args": f"touch {marker}", "shell": True}}
    edit_json(evil / "model_index.json", lambda d: d["target"].__setitem__("architecture", spec))
    before = files_under(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "d2nwg.commands", "generate", "--pipeline", evil, "--dataset", heldout_images, "--out", tmp_path / "gen"]
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=120)
    assert_one_error(proc.returncode, proc.stderr, "subprocess:call", "module 'subprocess'", "--trust-remote-code")
    assert not marker.exists()
    assert files_under(tmp_path) == before  # nothing written: no --out folder, no temp folder left


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_pipeline_naming_code_is_refused_before_import(command, coded_pipeline, heldout_images, tiny_digits_zoo, tmp_path, capsys):
    pipe, marker = coded_pipeline
    out = tmp_path / "out"
    data = ["--dataset", heldout_images] if command == "generate" else ["--zoo", tiny_digits_zoo.root]
    code, _, err = run_cli([command, "--pipeline", pipe, *data, "--out", out, *STEPS], capsys)
    assert_one_error(code, err, "--trust-remote-code", "module 'd2nwg_hostile_")
    assert not marker.exists() and not out.exists()


def test_consented_user_architecture_generates(coded_pipeline, heldout_images, tmp_path, capsys):
    """With --trust-remote-code, a real module on PYTHONPATH builds the target and weights are written."""
    import d2nwg
    from d2nwg.security import RemoteCodeError

    pipe, marker = coded_pipeline
    out = tmp_path / "gen"
    code, stdout, err = run_cli(["generate", "--pipeline", pipe, "--dataset", heldout_images, "--out", out, "--trust-remote-code", *STEPS], capsys)
    assert code == 0, err
    assert marker.exists() and (out / "weights_001.safetensors").is_file()
    # The output records the code name: loading it asks for consent again, as transformers does.
    with pytest.raises(RemoteCodeError):
        d2nwg.load_model(out, trust_remote_code=False)
    model = d2nwg.load_model(out, trust_remote_code=True)
    assert model(torch.zeros(3, 64)).shape == (3, 5)


def test_python_api_needs_trust_remote_code(coded_pipeline):
    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
    from d2nwg.security import RemoteCodeError

    pipe_dir, marker = coded_pipeline
    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        D2NWGPipeline.from_pretrained(pipe_dir, trust_remote_code=False)
    assert not marker.exists()
    pipe = D2NWGPipeline.from_pretrained(pipe_dir, trust_remote_code=True)
    assert pipe.build_model() is not None and marker.exists()


@pytest.mark.parametrize(
    "component, value",
    [
        ("vae", ["os", "system"]),
        ("scheduler", ["subprocess", "Popen"]),
        ("denoiser", ["d2nwg.models.vae", "WeightVAE"]),  # a d2nwg class, but not this component's
        ("extra", ["d2nwg_hostile", "Thing"]),  # diffusers treats any [library, class] entry as a component
    ],
)
def test_index_naming_other_classes_is_refused(component, value, tmp_path, tiny_pipeline_dir, heldout_images, capsys):
    pipe = copy_tree(tiny_pipeline_dir, tmp_path / "pipe")
    edit_json(pipe / "model_index.json", lambda d: d.__setitem__(component, value))
    out = tmp_path / "gen"
    code, _, err = run_cli(["generate", "--pipeline", pipe, "--dataset", heldout_images, "--out", out], capsys)
    assert_one_error(code, err, f"for component '{component}'")
    assert not out.exists()


def test_index_naming_a_module_file_in_the_folder_imports_nothing(tmp_path, tiny_pipeline_dir, heldout_images, capsys):
    """diffusers can load a component class from a ``.py`` file shipped in the folder: never reached."""
    marker = tmp_path / "marker"
    pipe = copy_tree(tiny_pipeline_dir, tmp_path / "pipe")
    (pipe / "vae" / "evil_vae.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass EvilVAE: ...\n")
    edit_json(pipe / "model_index.json", lambda d: d.__setitem__("vae", ["evil_vae", "EvilVAE"]))
    code, _, err = run_cli(["generate", "--pipeline", pipe, "--dataset", heldout_images, "--out", tmp_path / "gen"], capsys)
    assert_one_error(code, err, "'evil_vae.EvilVAE'")
    assert not marker.exists()


@pytest.fixture
def coded_zoo(tmp_path, tiny_digits_zoo, hostile):
    module, marker = hostile
    zoo = copy_tree(tiny_digits_zoo.root, tmp_path / "zoo")
    edit_json(zoo / "manifest.json", lambda d: d["architecture"].__setitem__("name", f"{module}:build"))
    return zoo, marker


@pytest.mark.parametrize(
    "argv",
    [
        ["zoo", "info", "{zoo}"],
        ["zoo", "align", "{zoo}", "--out", "{out}"],
        ["train", "--zoo", "{zoo}", "--out", "{out}", "--set", "model.vae_steps=1", "--set", "model.diffusion_steps=1"],
        ["evaluate", "--pipeline", "{pipe}", "--zoo", "{zoo}", "--out", "{out}"],
    ],
    ids=["info", "align", "train", "evaluate"],
)
def test_zoo_naming_code_is_refused(argv, coded_zoo, tiny_pipeline_dir, tmp_path, capsys):
    zoo, marker = coded_zoo
    out = tmp_path / "out"
    fill = {"{zoo}": str(zoo), "{out}": str(out), "{pipe}": str(tiny_pipeline_dir)}
    code, _, err = run_cli([fill.get(a, a) for a in argv], capsys)
    assert_one_error(code, err, "--trust-remote-code")
    assert not marker.exists() and not out.exists()


def test_consented_zoo_opens_and_its_module_builds(coded_zoo, capsys):
    zoo, marker = coded_zoo
    code, stdout, err = run_cli(["zoo", "info", zoo, "--json", "--trust-remote-code"], capsys)
    assert code == 0, err
    from d2nwg.targets.architectures import build_model
    from d2nwg.zoo.model_zoo import ModelZoo

    opened = ModelZoo.open(zoo, trust_remote_code=True)
    assert isinstance(build_model(opened.architecture), torch.nn.Module) and marker.exists()


def test_ingest_with_own_module_callable_needs_no_flag_but_its_zoo_does(tmp_path, hostile, forget_consent, capsys):
    """``zoo ingest --arch module:callable`` is the user's own code; the zoo it writes asks again when read."""
    from safetensors.torch import save_file

    from d2nwg.targets.mlp.model import MLP

    module, marker = hostile
    ckpts, data = tmp_path / "ckpts", tmp_path / "data"
    ckpts.mkdir(), data.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = ["checkpoint,dataset"]
    for i in range(4):
        x = torch.rand(60, 64, generator=g)
        y = torch.arange(60) % 3
        np.savez(data / f"d{i}.npz", x=x.numpy(), y=y.numpy())
        torch.manual_seed(i)
        save_file(MLP(64, [8], 3).state_dict(), str(ckpts / f"m{i}.safetensors"))
        lines.append(f"m{i}.safetensors,d{i}")
    (tmp_path / "map.csv").write_text("\n".join(lines) + "\n")
    zoo = tmp_path / "zoo"
    argv = ["zoo", "ingest", "--checkpoints", ckpts, "--datasets", data, "--mapping", tmp_path / "map.csv",
            "--arch", f"{module}:build", "--arch-config", '{"in_features": 64, "hidden": [8], "num_classes": 3}',
            "--heldout-fraction", "0.25", "--out", zoo]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert marker.exists()
    marker.unlink()
    sys.modules.pop(module, None)
    forget_consent()  # a later process starts with no consent
    code, _, err = run_cli(["zoo", "info", zoo], capsys)
    assert_one_error(code, err, "--trust-remote-code")
    assert not marker.exists()


def test_registered_names_need_no_consent(tiny_pipeline_dir, tmp_path, heldout_images, capsys):
    code, _, err = run_cli(["generate", "--pipeline", tiny_pipeline_dir, "--dataset", heldout_images, "--out", tmp_path / "g", *STEPS], capsys)
    assert code == 0, err
