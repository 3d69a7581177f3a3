"""`d2nwg.utils.console` (terminal output) and `d2nwg.errors` (one-line user errors)."""

from __future__ import annotations

import pytest

from d2nwg.errors import UserError, one_line
from d2nwg.utils.console import hidden_progress_bars, print_summary, print_table


@pytest.mark.parametrize(
    "err, empty, expected",
    [
        (ValueError("first\nsecond"), None, "first"),
        (KeyError("k"), None, "'k'"),
        (RuntimeError(), None, "RuntimeError"),
        (ValueError(""), "unusable", "unusable"),
        (UserError("bad --set"), None, "bad --set"),
    ],
)
def test_one_line(err, empty, expected):
    assert one_line(err, empty) == expected


class FakeLogging:
    """The progress-bar switches of ``transformers.utils.logging`` / ``diffusers.utils.logging``."""

    def __init__(self, on: bool):
        self.on = on

    def is_progress_bar_enabled(self) -> bool:
        return self.on

    def disable_progress_bar(self) -> None:
        self.on = False

    def enable_progress_bar(self) -> None:
        self.on = True


@pytest.mark.parametrize("on", [True, False])
def test_hidden_progress_bars_restores_the_setting_even_on_errors(on):
    logging = FakeLogging(on)
    with pytest.raises(OSError), hidden_progress_bars(logging):
        assert not logging.on
        raise OSError("download failed")
    assert logging.on is on


def test_tables_print_keys_and_formatted_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    print_table("demo outputs", [("zoo", "runs/zoo"), ("score", 0.5)])
    print_summary({"generated_best": 0.97654, "tasks": 3, "missing": None, "per_task": [1, 2]})
    out = capsys.readouterr().out
    assert "demo outputs" in out and "runs/zoo" in out and "0.5" in out
    assert "0.9765" in out and "tasks" in out and "missing" in out and "per_task" not in out
