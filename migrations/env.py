"""Alembic environment: one migration tree for SQLite and PostgreSQL, batch mode on SQLite.

The server passes its own connection in ``config.attributes["connection"]``; the ``alembic``
command line (repo-root alembic.ini) builds one from ``sqlalchemy.url`` or GRADWATCH_DATABASE_URL.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from gradwatch.server.db import models  # noqa: F401  (registers the tables)
from gradwatch.server.db.base import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from gradwatch.server.db.engine import make_engine

    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "GRADWATCH_DATABASE_URL", "sqlite:///./gradwatch.db"
    )
    engine = make_engine(url)
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
