"""Run the Alembic migrations shipped in ``gradwatch.migrations`` (Alembic is imported lazily)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

#: Arbitrary constant key for pg_advisory_lock: several server processes may start at once.
_PG_LOCK_KEY = 0x67726164


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at the installed migrations package (no alembic.ini needed)."""
    from alembic.config import Config

    import gradwatch.migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(gradwatch.migrations.__file__).parent))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_to_head(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` on a connection of ``engine`` (serialised on PostgreSQL)."""
    from alembic import command

    cfg = alembic_config()
    with engine.connect() as conn:
        pg = conn.dialect.name == "postgresql"
        if pg:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
        finally:
            if pg:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
    log.info("database at migration %s", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade to ``revision`` (tests and operators)."""
    from alembic import command

    cfg = alembic_config()
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()
