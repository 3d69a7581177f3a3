"""Shared fixtures: one tiny digits zoo built once per test session."""

from __future__ import annotations

import pytest

TINY_DIGITS = {"num_train_tasks": 10, "num_heldout_tasks": 3, "steps": 15, "group_size": 4}
"""Settings of the session zoo: 13 members in 4 groups (the last one partial)."""


@pytest.fixture(scope="session")
def tiny_digits_settings() -> dict:
    return dict(TINY_DIGITS)


@pytest.fixture(scope="session")
def tiny_digits_zoo(tmp_path_factory, tiny_digits_settings):
    """A fully built tiny digits zoo (read-only for tests: copy it before corrupting anything)."""
    from model_zoo.digits import build

    return build(tmp_path_factory.mktemp("digits_zoo") / "zoo", **tiny_digits_settings)
