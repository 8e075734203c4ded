"""Run the Alembic migrations shipped in ``gradwatch.migrations`` (Alembic is imported lazily)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    """SQLite's counterpart of the advisory lock: an exclusive ``flock`` on ``<db file>.lock``, so
    servers started together on one new file migrate one after the other (the second finds the
    schema at head). In-memory databases and systems without ``fcntl`` need no lock."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(f"{path}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def upgrade_to_head(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` on a connection of ``engine`` (serialised across
    processes: PostgreSQL's advisory lock, a file lock beside a SQLite file)."""
    from alembic import command

    cfg = alembic_config()
    with _file_lock(engine), engine.connect() as conn:
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
