"""The harness starts the service in an environment of the test's own: nothing of the
developer's shell (or CI's) that the service would read leaks in."""

from __future__ import annotations

import pytest

from app.config import ENV_VARS
from harness.servers import clean_env


def test_clean_env_drops_every_setting_of_the_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.setenv(name, "from-the-shell")
        monkeypatch.setenv(name.lower() + "_NOT_A_SETTING", "kept")
    monkeypatch.setenv("auth_mode", "jwt")  # settings are read case-insensitively
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "x=y")
    env = clean_env(DB_POOL_SIZE="3")
    leaked = sorted(name for name in env if name.upper() in ENV_VARS)
    assert leaked == ["DB_POOL_SIZE", "LOG_FORMAT"], leaked
    assert "OTEL_RESOURCE_ATTRIBUTES" not in env
    assert env["DB_POOL_SIZE"] == "3"
