"""One statement through the raw driver inside the caller's SQLAlchemy transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection


def run_raw(conn: Connection, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` (written with ``?`` placeholders) through the driver, in the caller's
    transaction; its rows. SQLAlchemy Core costs ~100 us a statement, the driver ~5."""
    raw: Any = conn.connection.driver_connection
    cur = raw.cursor()
    try:
        cur.execute(sql.replace("?", "%s") if conn.dialect.name == "postgresql" else sql, params)
        return cur.fetchall() if cur.description is not None else []
    finally:
        cur.close()
