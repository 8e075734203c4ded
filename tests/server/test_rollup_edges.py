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
