"""ServerSettings reads the contract's environment variables (and nothing at import time)."""

from __future__ import annotations

import pytest

from gradwatch.server.settings import DEFAULT_DATABASE_URL, ServerSettings


def test_contract_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("GRADWATCH_DATABASE_URL", "GRADWATCH_TOKEN", "GRADWATCH_READ_TOKEN", "GRADWATCH_SERVER_MAX_BODY_BYTES"):
        monkeypatch.delenv(k, raising=False)
    s = ServerSettings()
    assert s.database_url == DEFAULT_DATABASE_URL == "sqlite:///./gradwatch.db" and not s.auth_enabled
    monkeypatch.setenv("GRADWATCH_DATABASE_URL", "postgres://u@h:5432/db")
    monkeypatch.setenv("GRADWATCH_TOKEN", "w")
    monkeypatch.setenv("GRADWATCH_READ_TOKEN", "")
    monkeypatch.setenv("GRADWATCH_SERVER_MAX_BODY_BYTES", "1234")
    s = ServerSettings()
    assert s.database_url == "postgresql+psycopg://u@h:5432/db"
    assert s.token == "w" and s.read_token is None and s.auth_enabled and s.max_body_bytes == 1234
    assert ServerSettings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"
