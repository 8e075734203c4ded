"""Engine factory: SQLite gets WAL and the pragmas a concurrent reader/writer needs.

Several server processes may share one SQLite file (a second ``gradwatch serve`` on the same
directory). Every write transaction then starts with ``BEGIN IMMEDIATE``: it takes the file's
write lock up front, waiting up to ``busy_timeout`` for another process to finish. A deferred
``BEGIN`` that reads first and writes later cannot wait (SQLite answers "database is locked" at
once when its snapshot is stale), so writers of two processes would fail instead of queueing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

#: bytes the SQLite write-ahead log is truncated to after a checkpoint (the autocheckpoint's 1000 pages)
WAL_SIZE_LIMIT = 4 * 1024 * 1024


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


#: Execution option marking a connection whose transactions write (SQLite: ``BEGIN IMMEDIATE``).
WRITE_OPTION = "gradwatch_write"


def make_engine(url: str, *, busy_timeout: float = 30.0, **kwargs: Any) -> Engine:
    """Create the engine for ``url``.

    SQLite: WAL (readers never block the writer), synchronous=NORMAL (durable at checkpoints, safe
    with WAL), busy_timeout (wait instead of "database is locked"), foreign_keys, and a bounded
    write-ahead log (``WAL_SIZE_LIMIT``). The driver's own transaction handling is switched off and
    SQLAlchemy emits ``BEGIN`` itself (``BEGIN IMMEDIATE`` on connections marked with the
    ``gradwatch_write`` execution option), so raw DBAPI ``executemany`` calls inside a SQLAlchemy
    transaction are part of that transaction.
    """
    if is_sqlite(url):
        busy_ms = int(busy_timeout * 1000)
        connect_args = {"check_same_thread": False, "timeout": busy_timeout}
        engine = create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")  # first: switching to WAL may wait too
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # After a checkpoint that empties the log, cut the -wal file back to this size (it is
            # never shrunk otherwise: a reader that pinned an old snapshot during heavy ingest left
            # a 33 MB log beside a 3 MB database).
            cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


class Database:
    """An engine plus the write discipline: SQLite has one writer, so writes take a process lock
    (otherwise two deferred transactions upgrading to write locks fail with "database is locked")."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        #: names this database in per-process caches (the URL, password hidden)
        self.key = str(engine.url)
        self._write_lock = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction committed on success and rolled back on any exception."""
        if self.sqlite:
            with self._write_lock, self.engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    yield conn
        else:
            with self.engine.begin() as conn:
                yield conn
