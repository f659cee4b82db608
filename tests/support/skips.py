"""A test that needs a tool this machine lacks: skipped with the reason, or failed in CI
(ITEMSTREAM_REQUIRE_ALL=1, set by .ci/run), where everything must run."""

from __future__ import annotations

import os

import pytest

REQUIRE_ALL = os.environ.get("ITEMSTREAM_REQUIRE_ALL", "") == "1" or os.environ.get("CI") == "true"


def missing(reason: str) -> None:
    """Skip for a developer without the tool; fail in CI, where everything must run."""
    if REQUIRE_ALL:
        pytest.fail(f"required test dependency missing: {reason}")
    pytest.skip(reason)
