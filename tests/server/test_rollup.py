"""The per-block rollup answers exactly what the rows answer (both databases, NaN, ranks, overlaps)."""

from __future__ import annotations

import math
import random

import pytest
from sqlalchemy import text

from gradwatch.agent import wire
from gradwatch.server.db.engine import Database, make_engine
from gradwatch.server.repo import series
from gradwatch.server.repo.ingest import RowsOverlap, store_batch
from gradwatch.server.repo.runs import resolve_layers


def _val(s: int, i: int) -> float:
    r = random.Random(s * 1000 + i).random()
    if r < 0.03:
        return math.nan
    if r < 0.04:
        return math.inf
    if r < 0.045:
        return -math.inf
    return r * (100 if s % 97 == 0 else 1)


def _store(db: Database, b: wire.Batch) -> None:
    try:
        with db.write() as conn:
            store_batch(conn, b)
    except RowsOverlap:
        with db.write() as conn:
            store_batch(conn, b, upsert=True)


def _num(v: object) -> float | None:
    """Decode an API value; None for NaN or missing."""
    if v is None or v == "NaN":
        return None
    return wire.decode_float(v, "value")


def _same(x: dict, y: dict) -> None:
    assert x["downsampled"] == y["downsampled"]
    bx, by = x.get("buckets", x.get("points")), y.get("buckets", y.get("points"))
    assert len(bx) == len(by)
    for p, q in zip(bx, by):
        for k in p:
            if isinstance(p[k], float) and isinstance(q[k], float):
                assert p[k] == pytest.approx(q[k], rel=1e-9), (k, p, q)
            else:
                assert p[k] == q[k], (k, p, q)


def test_blocks_match_rows(db_url, mk):
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        # two ranks, batches of 37 steps (not block-aligned), out of order, plus an overlapping resend
        batches = [mk(k + 1, range(1 + 37 * k, 38 + 37 * k), source=rank, values=_val, events=False)
                   for rank in (0, 1) for k in range(12)]
        random.Random(3).shuffle(batches)
        for b in batches:
            _store(db, b)
        _store(db, mk(99, range(30, 80), values=lambda s, i: 5.0, events=False))  # overlaps: first write wins
        with db.read() as conn:
            layers = resolve_layers(conn, "run1", [])
            rng = random.Random(7)
            ranges = [(None, None, 100), (1, 444, 3), (5, 400, 5), (63, 64 * 5, 2), (100, 130, 1)]
            ranges += [(a, a + rng.randrange(64, 400), rng.randrange(1, 6)) for a in rng.sample(range(1, 300), 5)]
            for stat in ("l2", "mean", "l2_post"):
                for start, end, mp in ranges:
                    for rank in (None, 1):
                        lid = layers[2][0]
                        x = series.layer_series(conn, lid, stat, start=start, end=end, max_points=mp, rank=rank)
                        y = series.layer_series(conn, lid, stat, start=start, end=end, max_points=mp, rank=rank,
                                                use_blocks=False)
                        if x.get("bucket_width", 0) >= 64:
                            # the rollup widens buckets to whole blocks; compare with the rows at that width
                            y = series.layer_series(conn, lid, stat, start=start, end=end, rank=rank,
                                                    max_points=None, use_blocks=False)
                            total = sum(b["count"] for b in x["buckets"])
                            assert total == len(y["points"])
                            vals = [_num(p["value"]) for p in y["points"] if _num(p["value"]) is not None]
                            assert max(_num(b["max"]) for b in x["buckets"] if b["max"] is not None) == max(vals)
                            assert min(_num(b["min"]) for b in x["buckets"] if b["min"] is not None) == min(vals)
                            assert sum(b["nan"] for b in x["buckets"]) == sum(p["value"] == "NaN" for p in y["points"])
                        else:
                            _same(x, y)
                for agg in ("max", "min", "mean"):
                    h = series.heatmap(conn, layers, stat, start=10, end=440, max_points=3, agg=agg)
                    assert h["bucket_width"] % 64 == 0
                    for k, (lid, _, _) in enumerate(layers):
                        rows = series.layer_series(conn, lid, stat, start=10, end=440, max_points=None,
                                                   use_blocks=False)["points"]
                        for j, s0 in enumerate(h["steps"]):
                            s1 = (h["steps"][j + 1] - 1) if j + 1 < len(h["steps"]) else 440
                            vals = [p["value"] for p in rows if s0 <= p["step"] <= s1]
                            fin = [_num(v) for v in vals if _num(v) is not None]
                            got = _num(h["values"][k][j])
                            assert h["nan"][k][j] == vals.count("NaN")
                            if agg == "max":
                                assert got == max(fin)
                            elif agg == "min":
                                assert got == min(fin)
                            elif math.isfinite(sum(fin)):
                                assert got == pytest.approx(sum(fin) / len(fin), rel=1e-9)
            # the overlapping resend did not overwrite: first write wins in rows and blocks alike
            x = series.layer_series(conn, layers[0][0], "l2", start=30, end=80, max_points=None, rank=0,
                                    use_blocks=False)
            assert all(p["value"] != 5.0 for p in x["points"])
    finally:
        engine.dispose()


def test_blocks_match_rows_when_layers_come_and_go_within_a_block(db_url, mk):
    """A layer absent from some steps of a block (its grad was None) shows up in two groups of one
    batch: the block upsert must not try to update one block row twice in one statement."""
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        b = mk(1, range(1, 41), values=_val, events=False)
        steps = []
        for s in b.steps:  # layer 1 present only on even steps
            keep = [i for i in s.layer_ids if i != 1 or s.step % 2 == 0]
            cols = {k: [v[s.layer_ids.index(i)] for i in keep] for k, v in s.layers.items()}
            steps.append(wire.StepRecord(step=s.step, time=s.time, rank=s.rank, layer_ids=keep, layers=cols))
        _store(db, wire.Batch(run=b.run, seq=1, layers=b.layers, steps=steps))
        with db.read() as conn:
            layers = resolve_layers(conn, "run1", [])
            for k in (0, 1):
                lid = layers[k][0]
                x = series.layer_series(conn, lid, "l2", start=1, end=40, max_points=1)
                rows = series.layer_series(conn, lid, "l2", start=1, end=40, max_points=None, use_blocks=False)["points"]
                assert sum(bk["count"] for bk in x["buckets"]) == len(rows) == (20 if k == 1 else 40)
                fin = [_num(p["value"]) for p in rows if _num(p["value"]) is not None]
                assert max(_num(bk["max"]) for bk in x["buckets"] if bk["max"] is not None) == max(fin)
                # the block row itself holds every step of the layer exactly once
                n, l2_max = conn.execute(text("SELECT n, l2_max FROM layer_stat_block WHERE layer_id = :l"),
                                         {"l": lid}).one()
                assert n == len(rows)
                assert l2_max == max(fin)
    finally:
        engine.dispose()


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


def test_pooled_bucket_moments_equal_the_concatenated_steps(db_url, mk):
    """A bucket's ``pooled`` count/mean/var equal a float64 two-pass over the gradient values of
    all its steps and ranks concatenated: through the ingest rollup (batches unaligned with
    blocks, merged into stored blocks), whole blocks plus edge rows, and the row path. A step
    whose moments are not finite is left out and counted."""
    import dataclasses

    import numpy as np

    rnd = np.random.default_rng(11)
    values: dict[tuple[int, int, int], np.ndarray] = {}
    for step in range(1, 301):
        for rank in (0, 1):
            for layer in range(2):
                std = 10.0 ** rnd.uniform(-2, 1)
                values[step, rank, layer] = rnd.normal(1e4 * std, std, int(rnd.integers(1, 40)))
    nan_step = 150  # rank 0, layer 0: a NaN gradient

    def batch(seq: int, steps: range, rank: int) -> wire.Batch:
        b = mk(seq, steps, source=rank, events=False, layers=2)
        recs = []
        for s in b.steps:
            xs = [values[s.step, rank, i] for i in range(2)]
            mean = [float(x.mean()) for x in xs]
            m2 = [float(((x - x.mean()) ** 2).sum()) for x in xs]
            if s.step == nan_step and rank == 0:
                mean[0], m2[0] = math.nan, math.nan
            recs.append(dataclasses.replace(s, layers={**s.layers, "numel": [len(x) for x in xs], "mean": mean,
                                                       "m2": m2}))
        return dataclasses.replace(b, steps=recs)

    engine = make_engine(db_url)
    db = Database(engine)
    try:
        batches = [batch(k + 1 + 100 * rank, range(1 + 37 * k, min(38 + 37 * k, 301)), rank)
                   for rank in (0, 1) for k in range(9)]
        random.Random(5).shuffle(batches)
        for b in batches:
            _store(db, b)
        with db.read() as conn:
            layers = resolve_layers(conn, "run1", [])
            for (lid, idx, _), (start, end, mp, rank) in [(la, c) for la in layers for c in (
                    (None, None, 3, None), (5, 290, 2, None), (1, 300, 30, None), (70, 260, 2, 1), (10, 80, 20, 0))]:
                out = series.layer_series(conn, lid, "var", start=start, end=end, max_points=mp, rank=rank)
                assert out["downsampled"] and out["buckets"]
                for bkt in out["buckets"]:
                    keys = [(s, r) for s in range(bkt["step_min"], bkt["step_max"] + 1) for r in (0, 1)
                            if rank in (None, r)]
                    bad = [k for k in keys if k == (nan_step, 0) and idx == 0]
                    xs = np.concatenate([values[s, r, idx] for s, r in keys if (s, r) not in bad])
                    p = bkt["pooled"]
                    assert p["count"] == len(xs) and p["skipped"] == len(bad), (start, end, mp, bkt)
                    assert p["mean"] == pytest.approx(xs.mean(), rel=1e-12)
                    assert p["var"] == pytest.approx(((xs - xs.mean()) ** 2).mean(), rel=1e-9), (start, end, mp)
    finally:
        engine.dispose()


def test_layers_prepared_from_this_process_memory_stay_right_after_the_run_is_deleted_and_recreated(db_url, mk):
    """The pre-transaction work uses the layer ids this process last wrote (no read connection);
    a run deleted and recreated meanwhile (new layer ids) is caught by the write, which rebuilds."""
    from gradwatch.server.repo.ingest import prepare_known, remember_layers
    from gradwatch.server.repo.runs import delete_run

    engine = make_engine(db_url)
    db = Database(engine)
    pg = engine.dialect.name == "postgresql"
    try:
        assert prepare_known(str(engine.url), mk(1, range(1, 3)), pg) is None  # nothing written yet
        with db.write() as conn:
            res = store_batch(conn, mk(1, range(1, 3)))
            remember_layers(str(engine.url), res)  # (before the commit: the store does this after it)
        assert prepare_known(str(engine.url), mk(2, range(3, 5)), pg) is not None
        with db.read() as conn:
            first_ids = sorted(lid for lid, _ in conn.execute(text("SELECT id, idx FROM layer")))
        stale = prepare_known(str(engine.url), mk(2, range(3, 5)), pg)
        assert stale is not None and stale.frame is not None and sorted(stale.ids.values()) == first_ids
        renamed = mk(2, range(3, 5))
        renamed.layers[0] = wire.LayerInfo(0, "renamed.0", [1, 2], "float32")
        assert prepare_known(str(engine.url), renamed, pg) is None  # a rename is left to the database
        assert prepare_known(str(engine.url), mk(2, range(3, 5), layers=5), pg) is None  # unknown layers too
        with db.write() as conn:
            delete_run(conn, "run1")
        _store(db, mk(1, range(1, 3), run_id="pad"))  # (takes the freed ids where a database reuses them)
        _store(db, mk(1, range(1, 3)))  # recreated: new layer ids
        with db.read() as conn:
            ids = dict(conn.execute(text("SELECT idx, id FROM layer WHERE run_id = 'run1'")).all())
        assert sorted(ids.values()) != first_ids
        with db.write() as conn:
            res = store_batch(conn, stale.batch, prepared=stale)
        assert res.rows == 2 * 4 and not res.duplicate
        with db.read() as conn:
            rows = conn.execute(text("SELECT layer_id, step, l2 FROM layer_stat WHERE layer_id IN (SELECT id FROM layer "
                                     "WHERE run_id = 'run1') ORDER BY step, layer_id")).all()
            blocks = conn.execute(text("SELECT layer_id, n FROM layer_stat_block WHERE layer_id IN (SELECT id FROM "
                                       "layer WHERE run_id = 'run1') ORDER BY layer_id")).all()
        assert {lid for lid, _, _ in rows} == set(ids.values()) and len(rows) == 4 * 4
        assert [(s, v) for lid, s, v in rows if lid == ids[1]] == [(s, s + 0.1) for s in range(1, 5)]
        assert blocks == [(lid, 4) for lid in sorted(ids.values())]  # rollup: all four steps, once
    finally:
        engine.dispose()


def test_a_run_committed_between_the_first_statements_of_a_batch_stores_the_batch(db_url, mk, monkeypatch):
    """Two batches of a new run in flight: the second's first statement does not see the run (the
    first batch's transaction has not committed), its next one does and records the batch. The
    batch must be stored, not taken for a duplicate of itself (its rows and live notification
    would be lost while the agent is told it was stored)."""
    from gradwatch.server.repo import ingest

    engine = make_engine(db_url)
    db = Database(engine)
    real = ingest._raw_all
    try:
        _store(db, mk(1, range(1, 3)))
        calls = []

        def run_not_seen_yet(conn, statements, **kw):
            rows = real(conn, statements, **kw)
            if statements and statements[0][0].startswith("SELECT project FROM run") and not calls:
                calls.append(1)
                rows[0] = []  # the first statement ran before the run's creator committed
            return rows

        monkeypatch.setattr(ingest, "_raw_all", run_not_seen_yet)
        with db.write() as conn:
            res = store_batch(conn, mk(2, range(3, 5)))
        assert calls and not res.duplicate and res.rows == 2 * 4
        with db.read() as conn:
            steps = [s for (s,) in conn.execute(text("SELECT step FROM step_record ORDER BY step"))]
            seqs = [q for (q,) in conn.execute(text("SELECT seq FROM ingest_batch ORDER BY seq"))]
            n = conn.execute(text("SELECT count(*) FROM layer_stat")).scalar_one()
        assert steps == [1, 2, 3, 4] and seqs == [1, 2] and n == 4 * 4
    finally:
        engine.dispose()
