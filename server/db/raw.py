"""Statements through the raw driver inside the caller's SQLAlchemy transaction."""

from __future__ import annotations

from collections.abc import Sequence
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


def run_raw_all(conn: Connection, statements: list[tuple[str, tuple[Any, ...]]],
                driver_first: Sequence[tuple[str, Any]] = ()) -> list[list[tuple[Any, ...]]]:
    """Run ``?``-placeholder statements in order, in the caller's transaction; each one's rows.
    PostgreSQL: all in one round trip (pipeline mode), each statement still its own (its
    snapshot taken after the ones before it ran, e.g. after a lock they took).
    ``driver_first`` (PostgreSQL only): statements in the driver's own placeholders run first in
    the same round trip, their rows not returned."""
    if conn.dialect.name != "postgresql" or (len(statements) < 2 and not driver_first):
        return [run_raw(conn, sql, params) for sql, params in statements]
    raw: Any = conn.connection.driver_connection
    todo = [*driver_first, *((sql.replace("?", "%s"), params) for sql, params in statements)]
    curs = [raw.cursor() for _ in todo]
    try:
        with raw.pipeline():
            for cur, (sql, params) in zip(curs, todo):
                cur.execute(sql, params)
        return [cur.fetchall() if cur.description is not None else [] for cur in curs[len(driver_first):]]
    finally:
        for cur in curs:
            cur.close()
