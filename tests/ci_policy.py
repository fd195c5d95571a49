"""What a test does when a tool or data set it needs is missing: skip on a developer's machine, fail in CI.

A module of its own (not conftest.py): ``from conftest import ...`` is ambiguous under pytest's default
import mode, where tests/models/conftest.py is also a top-level ``conftest``.
"""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))  # CI must run every test: there a missing tool or data set is a failure


def skip_or_fail(reason: str) -> None:
    (pytest.fail if IN_CI else pytest.skip)(f"{reason}{' (CI=true: failing instead of skipping)' if IN_CI else ''}")
