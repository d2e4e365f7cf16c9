"""In CI a test that lacks a tool it needs fails instead of skipping: CI installs every tool, so
there a skip would hide a broken set-up as a green run."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

# CI services set CI=true; .ci/run sets it too.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason`` (a missing tool, and how to install it); fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason}; CI must run this test")
    pytest.skip(reason)
