"""PostgreSQL's rollup upsert takes a column that is all NULL, all 0 or equal to ``n`` in a batch
as that expression instead of an array (``server/repo/ingest.py`` ``_merge_pg``): it must store
exactly what the all-arrays statement stores, when blocks are inserted and when a second batch
merges into them."""

from __future__ import annotations

from typing import Any

import pytest

from gradwatch.agent import wire
from gradwatch.server.db.engine import make_engine
from gradwatch.server.db.models import COARSE_FACTOR
from gradwatch.server.repo.frame import LayerFrame
from gradwatch.server.repo.ingest import _BLOCK_COLS, _merge_blocks, _merge_unnest_sql, merge_args, pg_arrays

_TABLES = ("layer_stat_block", "layer_stat_coarse")


def _frame(steps: range) -> LayerFrame:
    """Three layers: ``l2_post`` never measured (all NULL), ``headroom`` measured on some steps,
    ``mean`` NaN now and then (NULL + a NaN count), the rest always there (count = n)."""
    recs = []
    for s in steps:
        v = [s + i / 4 for i in range(3)]
        recs.append(wire.StepRecord(step=s, time=float(s), layer_ids=[0, 1, 2], layers={
            "numel": [10, 20, 30], "mean": [float("nan") if (s + i) % 7 == 0 else x for i, x in enumerate(v)],
            "m2": v, "l2": v, "maxabs": v, "nonfinite": [0, 0, 0], "wnorm": v,
            "headroom": [x if s % 5 == 0 else None for x in v]}))
    batch = wire.Batch(run=wire.RunInfo(run_id="r"), seq=1, steps=recs)
    return LayerFrame.from_batch(batch, {0: 101, 1: 102, 2: 103})


def _all_arrays(frame: LayerFrame) -> list[tuple[str, Any]]:
    blocks = frame.blocks()
    return [(_merge_unnest_sql(t), pg_arrays(cols.columns))
            for t, cols in zip(_TABLES, (blocks, blocks.coarsen(COARSE_FACTOR)))]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # the shortcut is PostgreSQL's
def test_expression_columns_store_what_the_arrays_store(db_url: str) -> None:
    engine = make_engine(db_url)
    # the second batch merges into the first's 64-step block and both coarse blocks' rows
    frames = [_frame(range(1, 40)), _frame(range(40, 1100))]
    stored = []
    try:
        for shaped in (True, False):
            with engine.begin() as conn:
                for fr in frames:
                    args = (merge_args(fr.blocks(), True) + merge_args(fr.blocks().coarsen(COARSE_FACTOR), True,
                                                                       "layer_stat_coarse")) if shaped else _all_arrays(fr)
                    if shaped:  # the shortcut really applies (else this compares a thing to itself)
                        assert all(len(params) < len(_BLOCK_COLS) - 10 for _, params in args)
                    _merge_blocks(conn, args)
                stored.append({t: sorted(conn.exec_driver_sql(f"SELECT {', '.join(_BLOCK_COLS)} FROM {t}").all())
                               for t in _TABLES})
                for t in _TABLES:
                    conn.exec_driver_sql(f"DELETE FROM {t}")
    finally:
        engine.dispose()
    assert stored[0] == stored[1]
    assert len(stored[0]["layer_stat_block"]) == 3 * 18 and len(stored[0]["layer_stat_coarse"]) == 3 * 2
    for t in _TABLES:
        rows = [dict(zip(_BLOCK_COLS, r)) for r in stored[0][t]]
        assert all(r["l2_post_min"] is None and r["l2_post_sum"] is None and r["l2_post_cnt"] == 0 for r in rows)
        assert all(r["l2_cnt"] == r["n"] and r["l2_nan"] == 0 for r in rows)
        assert all(0 < r["headroom_cnt"] < r["n"] for r in rows if r["n"] >= 5)
        assert sum(r["mean_nan"] for r in rows) > 0 and all(r["mean_cnt"] + r["mean_nan"] == r["n"] for r in rows)
