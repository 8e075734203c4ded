"""Migrations: one head; upgrade, downgrade, upgrade; the models match the migrations (both databases)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

TABLES = {"run", "layer", "layer_stat", "layer_stat_block", "layer_stat_coarse", "step_record", "scalar", "event",
          "ingest_batch", "transform_value", "project_rules", "detector_state", "alert_outbox", "alert_attempt",
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


def test_0006_backfills_the_coarse_level_from_the_blocks_and_downgrades_cleanly(empty_url: str) -> None:
    """A database at 0005 (the revision before) holding rows and their 64-step blocks: upgrading builds the 1,024-step
    level from the blocks (equal to the aggregates of the rows, pooled moments included);
    downgrading to 0005 drops it and keeps rows and blocks."""
    import math
    import random

    from sqlalchemy import text

    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine, "0005")
        rnd = random.Random(6)
        rows = []
        for lid in (1, 2):
            for rank in (0, 1):
                for step in range(5, 2600, rnd.choice([1, 3])):
                    nan = rnd.random() < 0.05
                    mean = rnd.uniform(-1, 1) * 100
                    rows.append({"lid": lid, "step": step, "rank": rank, "numel": rnd.randrange(1, 50),
                                 "mean": None if nan else mean, "m2": None if nan else rnd.random() * 10,
                                 "l2": None if nan else rnd.random(), "mask": 1 | 2 | 4 if nan else 0})
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO layer_stat (layer_id, step, rank, numel, mean, m2, l2, nan_mask) "
                              "VALUES (:lid, :step, :rank, :numel, :mean, :m2, :l2, :mask)"), rows)
            # the 64-step blocks as ingest keeps them at 0004 (its recompute statement, frozen in 0003)
            conn.execute(text(_rollup_0003()))
        upgrade_to_head(engine, "0006")
        with engine.connect() as conn:
            got = conn.execute(text("SELECT layer_id, block, rank, n, step_min, step_max, l2_min, l2_max, l2_sum, "
                                    "l2_cnt, l2_nan, mom_n, mom_mean, mom_m2, mom_skip FROM layer_stat_coarse "
                                    "ORDER BY layer_id, block, rank")).all()
        keys = sorted({(r["lid"], r["step"] // 1024, r["rank"]) for r in rows})
        assert [tuple(g[:3]) for g in got] == keys
        for g in got:
            rs = [r for r in rows if (r["lid"], r["step"] // 1024, r["rank"]) == tuple(g[:3])]
            fin = [r for r in rs if r["mean"] is not None]
            vals = [r["l2"] for r in fin]
            n = sum(r["numel"] for r in fin)
            mu = sum(r["numel"] * r["mean"] for r in fin) / n
            m2 = sum(r["m2"] + r["numel"] * (r["mean"] - mu) ** 2 for r in fin)
            assert tuple(g[3:8]) == (len(rs), rs[0]["step"], rs[-1]["step"], min(vals), max(vals))
            assert math.isclose(g[8], sum(vals), rel_tol=1e-12)
            assert tuple(g[9:12]) == (len(vals), len(rs) - len(fin), n)
            assert math.isclose(g[12], mu, rel_tol=1e-9) and math.isclose(g[13], m2, rel_tol=1e-9)
            assert g[14] == len(rs) - len(fin)
        downgrade(engine, "0005")
        names = set(inspect(engine).get_table_names())
        assert "layer_stat_coarse" not in names and {"layer_stat", "layer_stat_block"} <= names
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM layer_stat")).scalar_one() == len(rows)
            assert conn.execute(text("SELECT sum(n) FROM layer_stat_block")).scalar_one() == len(rows)
        upgrade_to_head(engine)
    finally:
        engine.dispose()


def _rollup_0003() -> str:
    """The 64-step blocks of every stored row, as revision 0003 backfills them."""
    import importlib

    mod = importlib.import_module("gradwatch.migrations.versions.0003_exact_moments")
    captured: list[str] = []

    class _Op:
        @staticmethod
        def execute(sql: str) -> None:
            captured.append(sql)

    real, mod.op = mod.op, _Op  # type: ignore[attr-defined]
    try:
        mod._backfill(mod._NEW, pooled=True)
    finally:
        mod.op = real  # type: ignore[attr-defined]
    return captured[0]


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


def test_0003_converts_var_std_rows_to_m2_and_back(empty_url: str) -> None:
    """A database filled by the previous schema (var/std columns, their NaN bits): upgrading turns
    var into m2 = var·numel, moves the NaN bits, rebuilds the rollup with the derived var/std; the
    API's var is the stored one again; downgrading restores var/std and the old bits."""
    from sqlalchemy import text

    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine, "0002")
        rows = []
        for step in range(0, 100):
            nan_var = step % 13 == 5
            nan_l2 = step % 11 == 4
            rows.append({"lid": 1, "step": step, "numel": 8, "mean": 0.5 * step, "var": None if nan_var else step / 4,
                         "std": None if nan_var else (step / 4) ** 0.5, "l2": None if nan_l2 else 2.0 * step,
                         "mask": (6 if nan_var else 0) | (8 if nan_l2 else 0)})
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO layer_stat (layer_id, step, rank, numel, mean, var, std, l2, nan_mask) "
                              "VALUES (:lid, :step, 0, :numel, :mean, :var, :std, :l2, :mask)"), rows)
        upgrade_to_head(engine)
        with engine.connect() as conn:
            got = conn.execute(text("SELECT step, m2, l2, wnorm, nan_mask FROM layer_stat ORDER BY step")).all()
            blocks = conn.execute(text("SELECT block, var_max, var_nan, std_max, l2_nan FROM layer_stat_block "
                                       "ORDER BY block")).all()
        for r, (step, m2, l2, wnorm, mask) in zip(rows, got):
            assert m2 == (None if r["var"] is None else r["var"] * 8) and l2 == r["l2"] and wnorm is None
            assert mask == (2 if r["var"] is None else 0) | (4 if r["l2"] is None else 0), step
        for blk, var_max, var_nan, std_max, l2_nan in blocks:
            rs = [r for r in rows if r["step"] // 64 == blk]
            vs = [r["var"] for r in rs if r["var"] is not None]
            assert var_max == pytest.approx(max(vs)) and std_max == pytest.approx(max(vs) ** 0.5)
            assert var_nan == len(rs) - len(vs) and l2_nan == sum(r["l2"] is None for r in rs)
        downgrade(engine, "0002")
        with engine.connect() as conn:
            back = conn.execute(text("SELECT var, std, l2, nan_mask FROM layer_stat ORDER BY step")).all()
        for r, (var, std, l2, mask) in zip(rows, back):
            assert (var is None) == (r["var"] is None) and l2 == r["l2"] and mask == r["mask"]
            if var is not None:
                assert var == pytest.approx(r["var"]) and std == pytest.approx(r["std"])
    finally:
        engine.dispose()


def test_0004_backfills_transform_values_from_the_step_json(empty_url: str) -> None:
    """Rows stored before transform values were a table: their scalar reports (NaN included) land
    in ``transform_value``; per-layer lists stay in the JSON; downgrading drops the table."""
    import json

    from sqlalchemy import text

    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine, "0003")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO run (id, project, status, world_size, created_at, updated_at) "
                              "VALUES ('r', 'p', 'running', 1, 0, 0)"))
            for step in range(1, 4):
                tr = {"zclip": {"threshold": float(step), "coef": "NaN" if step == 2 else 0.5},
                      "agc": {"min_coef": [0.5, 1.0]}}
                conn.execute(text("INSERT INTO step_record (run_id, step, rank, time, skipped, nan_mask, transforms) "
                                  "VALUES ('r', :s, 0, 0, false, 0, :t)"), {"s": step, "t": json.dumps(tr)})
        upgrade_to_head(engine)
        with engine.connect() as conn:
            got = conn.execute(text("SELECT transform, field, step, value, is_nan FROM transform_value "
                                    "ORDER BY transform, field, step")).all()
        assert [tuple(r) for r in got] == [("zclip", "coef", 1, 0.5, False), ("zclip", "coef", 2, None, True),
                                           ("zclip", "coef", 3, 0.5, False), ("zclip", "threshold", 1, 1.0, False),
                                           ("zclip", "threshold", 2, 2.0, False), ("zclip", "threshold", 3, 3.0, False)]
        downgrade(engine, "0003")
        assert "transform_value" not in set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_0008_adds_the_signal_columns_null_and_downgrades_cleanly(empty_url: str) -> None:
    """A database at 0007n holding rows, blocks and coarse blocks: upgrading adds zeros, headroom,
    underflow, mom_cos and upd_ratio to ``layer_stat`` (NULL: not measured, no NaN bit) and their rollup
    aggregates (count 0) to both levels, keeping every row; a row written afterwards stores them;
    downgrading to 0007n drops exactly those columns and keeps the rows."""
    from sqlalchemy import text

    new_layer = {"zeros", "headroom", "underflow", "mom_cos", "upd_ratio"}
    new_rollup = {f"{s}_{a}" for s in ("headroom", "mom_cos", "upd_ratio") for a in ("min", "max", "sum", "cnt", "nan")}
    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine, "0006")  # the frozen 0003 rollup SQL writes the 0006 block columns
        rows = [{"lid": 1, "step": s, "rank": 0, "numel": 10, "mean": 0.5, "m2": 1.0, "l2": 2.0, "mask": 0}
                for s in range(0, 200, 7)]
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO layer_stat (layer_id, step, rank, numel, mean, m2, l2, nan_mask) "
                              "VALUES (:lid, :step, :rank, :numel, :mean, :m2, :l2, :mask)"), rows)
            conn.execute(text(_rollup_0003()))
        upgrade_to_head(engine, "0007n")
        before = {t: {c["name"] for c in inspect(engine).get_columns(t)}
                  for t in ("layer_stat", "layer_stat_block", "layer_stat_coarse")}
        assert not (new_layer & before["layer_stat"]) and not (new_rollup & before["layer_stat_block"])
        upgrade_to_head(engine, "0008")
        cols = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in before}
        assert cols["layer_stat"] - before["layer_stat"] == new_layer
        assert cols["layer_stat_block"] - before["layer_stat_block"] == new_rollup
        assert cols["layer_stat_coarse"] - before["layer_stat_coarse"] == new_rollup
        with engine.begin() as conn:
            got = conn.execute(text("SELECT zeros, headroom, underflow, mom_cos, nan_mask FROM layer_stat")).all()
            assert [tuple(r) for r in got] == [(None, None, None, None, 0)] * len(rows)
            blk = conn.execute(text("SELECT headroom_min, headroom_cnt, headroom_nan, mom_cos_sum, mom_cos_cnt "
                                    "FROM layer_stat_block")).all()
            assert blk and all(tuple(b) == (None, 0, 0, None, 0) for b in blk)
            conn.execute(text("INSERT INTO layer_stat (layer_id, step, rank, numel, zeros, headroom, underflow, "
                              "mom_cos, nan_mask) VALUES (2, 1, 0, 10, 3, 4.5, 2, -0.25, 0)"))
            assert tuple(conn.execute(text("SELECT zeros, headroom, underflow, mom_cos FROM layer_stat "
                                           "WHERE layer_id = 2")).one()) == (3, 4.5, 2, -0.25)
        downgrade(engine, "0007n")
        assert {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in before} == before
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM layer_stat")).scalar_one() == len(rows) + 1
            assert conn.execute(text("SELECT sum(n) FROM layer_stat_block")).scalar_one() == len(rows)
        upgrade_to_head(engine)
    finally:
        engine.dispose()


def test_0009_backfills_the_count_rollups_of_both_levels_and_downgrades_cleanly(empty_url: str) -> None:
    """A database at 0008 holding rows (non-finite, zero and underflow counts, some not measured:
    NULL), their blocks and coarse blocks: upgrading adds the counts' aggregates to both levels,
    equal to those of the rows; downgrading to 0008 drops exactly those columns, keeping the rows."""
    import random

    from sqlalchemy import text

    new = {f"{s}_{a}" for s in ("nonfinite", "zeros", "underflow") for a in ("min", "max", "sum", "cnt", "nan")}
    engine = make_engine(empty_url)
    try:
        upgrade_to_head(engine, "0005")
        rnd = random.Random(9)
        rows = []
        for lid in (1, 2):
            for rank in (0, 1):
                for step in range(3, 2200, rnd.choice([1, 5])):
                    rows.append({"lid": lid, "step": step, "rank": rank, "numel": 100, "mean": 0.1, "m2": 1.0,
                                 "l2": 1.0, "mask": 0, "nf": rnd.choice([0, 0, 0, 3, 100])})
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO layer_stat (layer_id, step, rank, numel, mean, m2, l2, nonfinite, nan_mask) "
                              "VALUES (:lid, :step, :rank, :numel, :mean, :m2, :l2, :nf, :mask)"), rows)
            conn.execute(text(_rollup_0003()))
        upgrade_to_head(engine, "0008")  # (0006 builds the coarse level from the blocks)
        for r in rows:  # measured by newer agents only: NULL elsewhere
            r["zeros"] = rnd.randrange(0, 50) if r["step"] > 700 else None
            r["underflow"] = rnd.randrange(0, 9) if r["step"] % 3 else None
        with engine.begin() as conn:
            conn.execute(text("UPDATE layer_stat SET zeros = :zeros, underflow = :underflow WHERE layer_id = :lid "
                              "AND step = :step AND rank = :rank"), rows)
        before = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in ("layer_stat_block", "layer_stat_coarse")}
        upgrade_to_head(engine, "0009")
        for table, size in (("layer_stat_block", 64), ("layer_stat_coarse", 1024)):
            assert {c["name"] for c in inspect(engine).get_columns(table)} - before[table] == new
            cols = ", ".join(f"{s}_{a}" for s in ("nonfinite", "zeros", "underflow") for a in ("min", "max", "sum", "cnt",
                                                                                            "nan"))
            with engine.connect() as conn:
                got = conn.execute(text(f"SELECT layer_id, block, rank, {cols} FROM {table} "
                                        "ORDER BY layer_id, block, rank")).all()
            keys = sorted({(r["lid"], r["step"] // size, r["rank"]) for r in rows})
            assert [tuple(g[:3]) for g in got] == keys
            for g in got:
                rs = [r for r in rows if (r["lid"], r["step"] // size, r["rank"]) == tuple(g[:3])]
                want: list[object] = []
                for key in ("nf", "zeros", "underflow"):
                    vals = [r[key] for r in rs if r[key] is not None]
                    want += ([float(min(vals)), float(max(vals)), float(sum(vals))] if vals else [None] * 3) + [len(vals), 0]
                assert [None if v is None else (float(v) if k % 5 < 3 else int(v)) for k, v in enumerate(g[3:])] == want
        downgrade(engine, "0008")
        assert {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in before} == before
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM layer_stat")).scalar_one() == len(rows)
        upgrade_to_head(engine)
    finally:
        engine.dispose()


def test_0010_leaves_room_for_in_place_rollup_updates_on_postgresql(empty_url: str) -> None:
    """PostgreSQL: both rollup tables get ``fillfactor = 50``, and a block rewritten by later
    batches is updated in place (HOT) rather than moved; downgrading resets the setting. SQLite
    has no such setting: the migration changes nothing there and still upgrades and downgrades."""
    from sqlalchemy import text

    from gradwatch.agent import wire
    from gradwatch.server.repo.ingest import store_batch

    engine = make_engine(empty_url)
    pg = engine.dialect.name == "postgresql"

    def options() -> dict[str, list[str] | None]:
        with engine.connect() as conn:
            return {t: conn.execute(text("SELECT reloptions FROM pg_class WHERE relname = :t"), {"t": t}).scalar_one()
                    for t in ("layer_stat_block", "layer_stat_coarse")}

    try:
        upgrade_to_head(engine, "0010")
        if pg:
            assert options() == {"layer_stat_block": ["fillfactor=50"], "layer_stat_coarse": ["fillfactor=50"]}
        upgrade_to_head(engine)  # (the code below writes the head schema)
        # 40 layers: one step past the first coarse block (the coarse level's watermark moves
        # there), then 4 batches of 8 steps into one 64-step block and, below the watermark, into
        # one coarse block per layer
        layers = [wire.LayerInfo(i, f"l{i}", [4], "float32") for i in range(40)]
        pages = []
        for seq, steps_of in enumerate([range(1024, 1025), *(range(k * 8, k * 8 + 8) for k in range(4))]):
            steps = [wire.StepRecord(step=s, time=float(s), layer_ids=list(range(40)), layers={
                "numel": [4] * 40, "mean": [0.5] * 40, "m2": [1.0] * 40, "l2": [float(s)] * 40, "maxabs": [1.0] * 40,
                "nonfinite": [0] * 40}) for s in steps_of]
            with engine.begin() as conn:
                store_batch(conn, wire.Batch(run=wire.RunInfo(run_id="ff"), seq=seq + 1,
                                             layers=layers if seq == 0 else [], steps=steps))
                if pg and seq:  # the heap page of each rollup row of steps 0-31
                    pages.append(conn.execute(text(
                        "SELECT 'b', layer_id, (ctid::text::point)[0] FROM layer_stat_block WHERE block = 0 UNION ALL "
                        "SELECT 'c', layer_id, (ctid::text::point)[0] FROM layer_stat_coarse ORDER BY 1, 2")).all())
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*), sum(n), max(l2_max) FROM layer_stat_block WHERE block = 0")
                                ).one() == (40, 1280, 31.0)
            assert conn.execute(text("SELECT count(*), sum(n), max(l2_max) FROM layer_stat_coarse")).one() == (40, 1280, 31.0)
        if pg:  # rewritten three times (11 rows fill a page), every row stayed on its page: updated in place
            assert len(pages[0]) == 80 and all(p == pages[0] for p in pages[1:]), [
                (a, b) for a, b in zip(pages[0], pages[-1]) if a != b][:5]
        downgrade(engine, "0009")
        if pg:
            assert options() == {"layer_stat_block": None, "layer_stat_coarse": None}
        upgrade_to_head(engine)
    finally:
        engine.dispose()


def test_0011_keeps_coarse_blocks_below_a_watermark_and_downgrades_to_every_block(empty_url: str) -> None:
    """Ingest at 0011 keeps the coarse blocks below each run's watermark only (the block
    holding its last step and later ones come from the 64-step blocks); downgrading computes
    the missing ones from the 64-step blocks, so the coarse level is whole again as 0010 kept
    it; upgrading a whole coarse level starts each watermark past its run's last step, and a
    later batch below it merges into what is there. Checked against the rows each time."""
    from sqlalchemy import text

    from gradwatch.agent import wire
    from gradwatch.server.repo.ingest import store_batch

    engine = make_engine(empty_url)

    def store(run: str, seq: int, steps: range) -> None:
        recs = [wire.StepRecord(step=s, time=float(s), layer_ids=[0, 1, 2], layers={
            "numel": [4] * 3, "mean": [0.5] * 3, "m2": [1.0] * 3, "l2": [float(s + i) for i in range(3)],
            "maxabs": [1.0] * 3, "nonfinite": [0] * 3}) for s in steps]
        layers = [wire.LayerInfo(i, f"l{i}", [4], "float32") for i in range(3)]
        with engine.begin() as conn:
            store_batch(conn, wire.Batch(run=wire.RunInfo(run_id=run), seq=seq, layers=layers, steps=recs))

    def norm(rows: Any) -> list[tuple[float, ...]]:
        return [tuple(float(v) for v in r) for r in rows]

    def coarse() -> list[tuple[float, ...]]:
        with engine.connect() as conn:
            return norm(conn.execute(text("SELECT layer_id, block, rank, n, l2_max, l2_sum, mom_n FROM layer_stat_coarse "
                                          "ORDER BY layer_id, block, rank")))

    def from_rows(skip: set[tuple[str, int]] | None = None) -> list[tuple[float, ...]]:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT s.layer_id, s.step / 1024, s.rank, count(*), max(s.l2), sum(s.l2), sum(s.numel), min(l.run_id) "
                "FROM layer_stat s JOIN layer l ON l.id = s.layer_id GROUP BY s.layer_id, s.step / 1024, s.rank "
                "ORDER BY 1, 2, 3")).all()
        return norm(r[:7] for r in rows if (r[7], r[1]) not in (skip or set()))

    def marks() -> dict[str, int]:
        with engine.connect() as conn:
            return dict(conn.execute(text("SELECT id, coarse_through FROM run")).all())

    try:
        upgrade_to_head(engine)
        store("a", 1, range(0, 2600))
        store("b", 1, range(0, 700))
        assert marks() == {"a": 2048, "b": 0}
        assert coarse() == from_rows({("a", 2), ("b", 0)}) and len(coarse()) == 6
        downgrade(engine, "0010")
        assert "coarse_through" not in {c["name"] for c in inspect(engine).get_columns("run")}
        assert coarse() == from_rows() and len(coarse()) == 12
        upgrade_to_head(engine)
        assert marks() == {"a": 3072, "b": 1024}
        assert coarse() == from_rows()
        store("a", 2, range(2600, 3300))  # 2600-3071 merge into coarse block 2; 3072 on are not kept
        assert marks() == {"a": 3072, "b": 1024}
        assert coarse() == from_rows({("a", 3)}) and len(coarse()) == 12
    finally:
        engine.dispose()
