"""Statements through the raw driver inside the caller's SQLAlchemy transaction."""

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


def run_raw_all(conn: Connection, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
    """Run ``?``-placeholder statements in order, in the caller's transaction; each one's rows.
    PostgreSQL: all in one round trip (pipeline mode), each statement still its own (its
    snapshot taken after the ones before it ran, e.g. after a lock they took)."""
    if conn.dialect.name != "postgresql" or len(statements) < 2:
        return [run_raw(conn, sql, params) for sql, params in statements]
    raw: Any = conn.connection.driver_connection
    curs = [raw.cursor() for _ in statements]
    try:
        with raw.pipeline():
            for cur, (sql, params) in zip(curs, statements):
                cur.execute(sql.replace("?", "%s"), params)
        return [cur.fetchall() if cur.description is not None else [] for cur in curs]
    finally:
        for cur in curs:
            cur.close()
