"""Every ``d2nwg`` command, subcommand and zoo recipe answers ``--help`` (exit 0) and documents every option;
a mistyped local pipeline path says so (issue 12, item 7)."""

from __future__ import annotations

import argparse

import pytest

from d2nwg.commands import COMMANDS, build_parser, main


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """``(argv prefix, parser)`` for the parser and every nested subcommand (recipes of ``zoo build`` included)."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))


ALL = list(commands(build_parser()))


def test_the_command_table_is_the_parser():
    assert [argv for argv, _ in ALL if len(argv) == 1] == [(name,) for name in COMMANDS]


def test_every_command_and_recipe_is_listed():
    from model_zoo import RECIPES

    names = {argv for argv, _ in ALL}
    assert {("zoo", "build", recipe) for recipe in RECIPES.names()} <= names
    assert {("zoo", "ingest"), ("zoo", "info"), ("train",), ("evaluate",), ("generate",), ("push",), ("demo",)} <= names


@pytest.mark.parametrize("argv", [argv for argv, _ in ALL], ids=lambda argv: " ".join(argv) or "d2nwg")
def test_help_exits_0_and_every_option_has_help(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    parser = dict(ALL)[argv]
    undocumented = [
        a.option_strings[0] if a.option_strings else a.dest
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()
    ]
    assert undocumented == [], f"{' '.join(argv)}: options without help text"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all((c.help or "").strip() for c in action._choices_actions), f"{' '.join(argv)}: subcommand without help"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert "usage:" in out and err == ""


@pytest.mark.parametrize("path", ["runs/typo/pipeline", "./pipeline", "/nonexistent/pipeline"])
def test_mistyped_pipeline_folder_is_named(path, tmp_path, capsys):
    """A local-looking path that does not exist never reaches huggingface_hub's repo-id checks."""
    (tmp_path / "d.npz").write_bytes(b"")
    argv = ["generate", "--pipeline", path, "--dataset", str(tmp_path / "d.npz"), "--out", str(tmp_path / "g")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: pipeline folder not found: {path}"
