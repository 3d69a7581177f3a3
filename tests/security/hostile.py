"""Helpers of the hostile-input tests: run the CLI in-process, check its one error line, edit JSON files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``d2nwg ARGV`` in-process: ``(exit code, stdout, stderr)``; an uncaught exception fails the test."""
    from d2nwg.commands import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one ``error:`` line on stderr, containing every needle."""
    # Lightning's own "INFO: Seed set to 0" log line may precede the error of `train`.
    lines = [line for line in err.strip().splitlines() if not line.startswith("INFO: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def files_under(folder: Path) -> set[str]:
    """Every path below ``folder`` (relative), for "nothing written outside --out" checks."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}
