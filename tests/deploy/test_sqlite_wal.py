"""SQLite's write-ahead log stays bounded: after a reader that pinned an old snapshot lets go, the
next checkpoint cuts the -wal file back (it would otherwise keep its largest size forever)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import text

from gradwatch.server.db.engine import WAL_SIZE_LIMIT, Database, make_engine


def test_wal_file_is_cut_back_after_a_pinned_reader_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    db = Database(make_engine(f"sqlite:///{path}"))
    wal = Path(f"{path}-wal")
    with db.write() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, blob BLOB)"))
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM t").fetchone()  # pins a snapshot: no checkpoint can finish
    payload = b"x" * 65536
    for _ in range(200):  # ~13 MB through the log
        with db.write() as conn:
            conn.execute(text("INSERT INTO t (blob) VALUES (:b)"), {"b": payload})
    grown = wal.stat().st_size
    assert grown > 3 * WAL_SIZE_LIMIT  # the pinned reader let the log grow
    reader.execute("COMMIT")
    reader.close()
    for _ in range(40):  # later writes checkpoint, restart the log, and truncate the file
        with db.write() as conn:
            conn.execute(text("DELETE FROM t WHERE id = (SELECT MIN(id) FROM t)"))
        if wal.stat().st_size <= WAL_SIZE_LIMIT:
            break
    assert wal.stat().st_size <= WAL_SIZE_LIMIT, (grown, wal.stat().st_size)
    db.engine.dispose()
