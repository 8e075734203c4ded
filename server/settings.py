"""Server configuration: one ``ServerSettings`` object, read from the environment in factories only.

The three variables users see are named by the contract (``GRADWATCH_DATABASE_URL``,
``GRADWATCH_TOKEN``, ``GRADWATCH_READ_TOKEN``); everything else uses the ``GRADWATCH_SERVER_`` prefix.
Nothing reads the environment at import time: call :func:`get_settings` or build one in a test.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./gradwatch.db"


class ServerSettings(BaseSettings):
    """Everything the server needs to start; pass one to ``create_app``."""

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_SERVER_", populate_by_name=True, extra="ignore")

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("database_url", "GRADWATCH_DATABASE_URL", "GRADWATCH_SERVER_DATABASE_URL"),
    )
    token: str | None = Field(None, validation_alias=AliasChoices("token", "GRADWATCH_TOKEN"))
    read_token: str | None = Field(None, validation_alias=AliasChoices("read_token", "GRADWATCH_READ_TOKEN"))
    #: Largest accepted request body (every route) or ingest websocket frame, in bytes.
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    #: Largest ``max_points`` a series query may ask for, and what one that leaves it out gets
    #: (at most 10,000: a series response stays bounded).
    max_points_limit: int = Field(10_000, gt=0, le=10_000)
    #: Run migrations to head when the app starts.
    migrate_on_start: bool = True
    #: Rows per chunk when streaming exports.
    export_chunk_rows: int = Field(50_000, gt=0)
    #: Bytes of ingest payloads being decoded and stored at once, all connections together. A
    #: batch costs a few times its size in memory while stored, so this bounds the server's peak;
    #: a websocket frame beyond it waits (back-pressure), a POST waits ``ingest_wait_seconds``
    #: and then gets 503 with ``Retry-After``.
    ingest_max_inflight_bytes: int = Field(64 * 1024 * 1024, gt=0)
    #: How long a POSTed batch waits for room under ``ingest_max_inflight_bytes``.
    ingest_wait_seconds: float = Field(10.0, ge=0)
    #: An ingest websocket that sends no frame for this long is closed (code 1001; agents reconnect).
    ingest_idle_timeout: float = Field(600.0, gt=0)
    #: Ingest websockets open at once per client (its bearer token, or its address without one).
    ingest_max_connections: int = Field(64, gt=0)

    #: Run the detectors (``docs/detectors.md``) over every stored batch, in its transaction.
    detectors_enabled: bool = True
    #: Run the alert workers in this process (webhook deliveries from the ``alert_outbox``). Any
    #: number of processes may: each delivery is claimed by one.
    alerts_enabled: bool = True
    #: How often an idle alert worker looks for due deliveries, in seconds.
    alert_poll_seconds: float = Field(1.0, gt=0, le=3600)
    #: Alert worker threads per process (a slow receiver holds one of them).
    alert_workers: int = Field(2, ge=1, le=64)
    #: Timeout of one webhook POST, in seconds.
    alert_timeout_seconds: float = Field(10.0, gt=0, le=600)
    #: Attempts per delivery before it is marked failed.
    alert_max_attempts: int = Field(8, ge=1, le=100)
    #: Wait before the second attempt; doubled after each failure up to ``alert_backoff_max_seconds``.
    alert_backoff_seconds: float = Field(2.0, gt=0, le=3600)
    alert_backoff_max_seconds: float = Field(300.0, gt=0, le=86400)

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, v: str) -> str:
        # Accept the common spellings of PostgreSQL URLs and route them to psycopg 3.
        for prefix in ("postgres://", "postgresql://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix):]
        return v

    @field_validator("token", "read_token")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token or self.read_token)


def get_settings() -> ServerSettings:
    """Read settings from the environment (a fresh object each call; cheap)."""
    return ServerSettings()  # type: ignore[call-arg]  # fields come from the environment
