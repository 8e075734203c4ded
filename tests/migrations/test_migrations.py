"""Migrations: one head; upgrade, downgrade, upgrade; the models match the migrations (both databases)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from gradwatch.server.db.base import Base
from gradwatch.server.db.engine import make_engine
from gradwatch.server.db.migrate import alembic_config, downgrade, upgrade_to_head

# Reuse the PostgreSQL helpers of the server tests (tests/ is not a package).
_spec = importlib.util.spec_from_file_location("_gw_server_conftest", Path(__file__).parent.parent / "server" / "conftest.py")
assert _spec and _spec.loader
_h = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _h
_spec.loader.exec_module(_h)

TABLES = {"run", "layer", "layer_stat", "layer_stat_block", "step_record", "scalar", "event", "ingest_batch",
          "ingest_cursor"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    url, name = _h.fresh_pg_db()
    try:
        yield url
    finally:
        _h.pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert len(list(script.walk_revisions())) >= 1


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
        downgrade(engine, "base")
        assert not (TABLES & set(inspect(engine).get_table_names()))
        upgrade_to_head(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
        upgrade_to_head(engine)  # idempotent
    finally:
        engine.dispose()


def test_0002_backfills_the_rollup_from_existing_rows_and_downgrades_cleanly(empty_url: str) -> None:
    """A database holding rows from before the rollup existed: upgrading builds its blocks from
    the rows (NaN as NULL + mask bit); downgrading to 0001 drops the blocks, keeps the rows."""
    from sqlalchemy import text

    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine, "0001")
        rows = []
        for lid in (1, 2):
            for step in range(0, 150):
                nan = step % 17 == 3
                rows.append({"lid": lid, "step": step, "l2": None if nan else float(step * lid), "mask": 8 if nan else 0})
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO layer_stat (layer_id, step, rank, l2, nan_mask) "
                              "VALUES (:lid, :step, 0, :l2, :mask)"), rows)
        upgrade_to_head(engine)
        with engine.connect() as conn:
            got = conn.execute(text("SELECT layer_id, block, n, step_min, step_max, l2_min, l2_max, l2_sum, l2_cnt, "
                                    "l2_nan FROM layer_stat_block ORDER BY layer_id, block")).all()
        want = []
        for lid in (1, 2):
            for blk in range(3):
                rs = [r for r in rows if r["lid"] == lid and r["step"] // 64 == blk]
                vals = [r["l2"] for r in rs if r["l2"] is not None]
                want.append((lid, blk, len(rs), rs[0]["step"], rs[-1]["step"], min(vals), max(vals), sum(vals),
                             len(vals), len(rs) - len(vals)))
        assert [tuple(r) for r in got] == want
        downgrade(engine, "0001")
        names = set(inspect(engine).get_table_names())
        assert "layer_stat_block" not in names and "layer_stat" in names
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM layer_stat")).scalar_one() == len(rows)
    finally:
        engine.dispose()


def test_models_match_migrations(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"models and migrations differ (run alembic revision --autogenerate): {diff}"
    finally:
        engine.dispose()


def test_sqlite_pragmas_and_clustered_stats_table(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        upgrade_to_head(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'layer_stat'").scalar()
            assert "WITHOUT ROWID" in sql
    finally:
        engine.dispose()


def test_cli_db_upgrade(tmp_path: Path) -> None:
    import subprocess

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    out = subprocess.run([sys.executable, "-m", "gradwatch.cli", "db", "upgrade", "--db", url],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr
    engine = make_engine(url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
