"""Rollup edge cases: keys repeated within one batch."""

from __future__ import annotations

from sqlalchemy import text

from gradwatch.agent import wire
from gradwatch.server.db.engine import Database, make_engine
from gradwatch.server.repo import series
from gradwatch.server.repo.ingest import RowsOverlap, store_batch
from gradwatch.server.repo.runs import resolve_layers


def _store(db: Database, b: wire.Batch) -> None:
    try:
        with db.write() as conn:
            store_batch(conn, b)
    except RowsOverlap:
        with db.write() as conn:
            store_batch(conn, b, upsert=True)


def test_a_step_twice_in_one_batch_is_stored_and_counted_once(db_url, mk):
    """The wire accepts two records of one (step, rank) in a batch; the first is stored (first
    write wins, as for resends) and the rollup counts it once, on both databases."""
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        b = mk(1, range(1, 11), values=lambda s, i: float(s), events=False)
        dup = b.steps[4]
        again = wire.StepRecord(step=dup.step, time=dup.time, rank=dup.rank, layer_ids=dup.layer_ids,
                                layers={k: [1000.0 if isinstance(x, float) else x for x in v]
                                        for k, v in dup.layers.items()})
        _store(db, wire.Batch(run=b.run, seq=1, layers=b.layers, steps=[*b.steps, again]))
        with db.read() as conn:
            lid = resolve_layers(conn, "run1", [])[0][0]
            pts = series.layer_series(conn, lid, "mean", start=1, end=10, max_points=None, use_blocks=False)["points"]
            assert [p["step"] for p in pts] == list(range(1, 11)) and pts[4]["value"] == 5.0
            n, s = conn.execute(text("SELECT n, mean_sum FROM layer_stat_block WHERE layer_id = :l"), {"l": lid}).one()
            assert n == 10 and s == sum(range(1, 11))
            bk = series.layer_series(conn, lid, "mean", start=0, end=127, max_points=1)["buckets"][0]
            assert bk["count"] == 10 and bk["max"] == 10.0 and bk["mean"] == 5.5
    finally:
        engine.dispose()


def test_plus_and_minus_inf_in_one_bucket_make_its_mean_nan_on_both_databases(db_url, mk):
    """inf + -inf is NaN: PostgreSQL keeps it, SQLite turns it into NULL (and a NULL block sum was
    dropped when the block merged with a later batch: mean 0.526 instead of NaN). Every path
    (rows, blocks, heatmap, after a later batch merged into the block) answers NaN alike."""
    inf = float("inf")
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        first = {3: inf, 7: -inf}
        _store(db, mk(1, range(1, 10), values=lambda s, i: first.get(s, 1.0), events=False))
        _store(db, mk(2, range(10, 20), values=lambda s, i: 1.0, events=False))
        _store(db, mk(3, range(64, 70), values=lambda s, i: 2.0, events=False))  # another block: finite
        with db.read() as conn:
            layers = resolve_layers(conn, "run1", [])
            lid = layers[0][0]
            for use_blocks in (True, False):
                b = series.layer_series(conn, lid, "mean", start=0, end=127, max_points=1 if use_blocks else 2,
                                        use_blocks=use_blocks)["buckets"]
                assert b[0]["min"] == "-Infinity" and b[0]["max"] == "Infinity" and b[0]["mean"] == "NaN", b
                if not use_blocks:
                    assert b[1]["mean"] == 2.0  # the finite bucket keeps its mean
                    assert b[0]["count"] == 19 and b[0]["nan"] == 0
            x = series.layer_series(conn, lid, "mean", start=0, end=127, max_points=2, use_blocks=True)
            assert [k["mean"] for k in x["buckets"]] == ["NaN", 2.0]
            for blocks in (True, False):
                h = series.heatmap(conn, layers, "mean", start=0, end=127, max_points=2, agg="mean", use_blocks=blocks)
                assert h["values"][0][0] == "NaN" and h["values"][0][-1] == 2.0, (blocks, h)
    finally:
        engine.dispose()
