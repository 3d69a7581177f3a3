"""The ``d2nwg zoo`` commands, run in-process through `d2nwg.commands.main` (and once as the console script)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from d2nwg.commands import main
from d2nwg.targets.architectures import build_model
from d2nwg.zoo.model_zoo import ModelZoo
from model_zoo.digits import DigitsRecipe

BUILD = {"num_train_tasks": 6, "num_heldout_tasks": 1, "num_unseen_class_tasks": 1, "steps": 10, "group_size": 4}


def build_argv(out: Path, **settings) -> list[str]:
    argv = ["zoo", "build", "digits", "--out", str(out)]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def assert_one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def cli_zoo(tmp_path_factory):
    """``d2nwg zoo build digits`` with BUILD, run once; yields (dir, return code, stdout)."""
    out = tmp_path_factory.mktemp("cli") / "zoo"
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "200")  # rich and argparse: no wrapping of the summary table
    try:
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            code = main(build_argv(out, **BUILD))
    finally:
        mp.undo()
    return out, code, buf.getvalue()


def test_build_succeeds_and_prints_member_counts(cli_zoo):
    out, code, stdout = cli_zoo
    assert code == 0
    members = [line for line in stdout.splitlines() if "members" in line]
    assert members, stdout
    heldout = BUILD["num_heldout_tasks"] + BUILD["num_unseen_class_tasks"]
    total = BUILD["num_train_tasks"] + heldout
    assert re.search(rf"\b{total}\b", members[0])
    assert f"'train': {BUILD['num_train_tasks']}" in members[0]
    assert f"'heldout': {heldout}" in members[0]


def test_build_passes_settings_to_the_recipe(cli_zoo):
    out, code, _ = cli_zoo
    zoo = ModelZoo.open(out)
    assert zoo.manifest["recipe"] == {"name": "digits", **asdict(DigitsRecipe(**BUILD))}
    assert len(zoo.members("train")) == BUILD["num_train_tasks"]


def test_info_json(cli_zoo, capsys):
    out, _, _ = cli_zoo
    capsys.readouterr()
    assert main(["zoo", "info", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    zoo = ModelZoo.open(out)
    heldout = BUILD["num_heldout_tasks"] + BUILD["num_unseen_class_tasks"]
    assert summary["members"] == BUILD["num_train_tasks"] + heldout == len(zoo)
    assert summary["members_by_split"] == {"train": BUILD["num_train_tasks"], "heldout": heldout}
    assert summary["params_per_member"] == zoo.layout.num_params
    model = build_model(zoo.architecture)
    assert summary["params_per_member"] == sum(p.numel() for p in model.parameters())
    accs = [m.metrics["test_acc"] for m in zoo]
    assert summary["test_acc"]["min"] == pytest.approx(min(accs))
    assert summary["test_acc"]["max"] == pytest.approx(max(accs))
    assert summary["test_acc"]["mean"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
    assert captured.err == ""


def test_info_table(cli_zoo, capsys, monkeypatch):
    out, _, _ = cli_zoo
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["zoo", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "members" in text and "parameters per member" in text
    assert f"{ModelZoo.open(out).layout.num_params:,}" in text


def test_info_missing_dir_is_one_error_line(tmp_path, capsys):
    code = main(["zoo", "info", str(tmp_path / "missing")])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.err)
    assert "missing" in captured.err
    assert captured.out == ""


def test_info_corrupt_manifest_is_one_error_line(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{not json")
    assert main(["zoo", "info", str(tmp_path)]) == 2
    assert_one_error_line(capsys.readouterr().err)


def test_build_with_other_settings_in_existing_zoo_is_rejected(cli_zoo, capsys):
    out, _, _ = cli_zoo
    before = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(build_argv(out, **{**BUILD, "steps": BUILD["steps"] + 1})) == 2
    assert_one_error_line(capsys.readouterr().err)
    assert (out / "manifest.json").read_bytes() == before


def test_build_help_lists_options_with_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build", "digits", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = text[text.index("options:") :]
    for f in dataclasses.fields(DigitsRecipe):
        flag = f"--{f.name.replace('_', '-')} "
        assert flag in options, f"{flag} not in help"
        rest = options[options.index(flag) + len(flag) :]
        entry = re.split(r" --\w", rest, maxsplit=1)[0]
        assert f"(default: {f.default})" in entry, f"{flag}: {entry!r}"
    assert "--out" in options


def test_console_script_reports_user_error(tmp_path):
    script = Path(sys.executable).parent / "d2nwg"
    if not script.exists():
        pytest.skip(f"console script not installed at {script}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [str(script), "zoo", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if "ImportError" in proc.stderr and "model_zoo" in proc.stderr:
        pytest.fail(
            "the console script cannot import model_zoo: the editable install predates "
            "model_zoo/__init__.py (it is listed as a namespace package); rerun `pip install -e .`\n" + proc.stderr
        )
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr)
    assert proc.stdout == ""
