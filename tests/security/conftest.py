"""Hostile files made in the test: a module that leaves a marker when imported, and CLI helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HOSTILE_SOURCE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")   # what a hostile module does at import time


def build(**config):
    from d2nwg.targets.mlp.model import MLP
    return MLP(**config)
'''


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """``(module_name, marker)``: a module on ``sys.path`` that writes ``marker`` the moment it is imported,
    and whose ``build(**config)`` returns the digits MLP (so consented use works end to end)."""
    folder = tmp_path / "pythonpath"
    folder.mkdir()
    marker = tmp_path / "marker"
    name = f"d2nwg_hostile_{abs(hash(str(tmp_path))) % 10**8}"
    (folder / f"{name}.py").write_text(HOSTILE_SOURCE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    yield name, marker
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def forget_consent():
    """Each test starts as a new process would: no code name consented to (`d2nwg.security`)."""
    from d2nwg import security

    before = set(security._TRUSTED_NAMES)
    yield lambda: security._TRUSTED_NAMES.intersection_update(before)
    security._TRUSTED_NAMES.intersection_update(before)


# The shared test helpers (`hub_server`) live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
