"""The coarse rollup level (1,024-step blocks) answers exactly what the rows answer (both databases).

Random runs (NaN, ±inf, two ranks, batches unaligned with blocks and shuffled, several batches
per block, a run resumed mid-block that resends steps) and random windows: every heatmap cell and
series bucket read from coarse blocks, 64-step blocks and edge rows equals the same aggregate
over the raw rows; ingest's numpy coarsening equals the SQL recompute from the 64-step blocks;
the statement count of a read does not grow with the layer count.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from gradwatch.server.db.engine import Database, make_engine
from gradwatch.server.db.models import BLOCK_STEPS, COARSE_STEPS
from gradwatch.server.db.raw import run_raw
from gradwatch.server.repo import series
from gradwatch.server.repo.ingest import _COARSE_ROLLUP, _coarse_recompute
from gradwatch.server.repo.runs import resolve_layers

# The 64-step level's test helpers (tests/ is not a package): storing with the overlap retry, API values.
_spec = importlib.util.spec_from_file_location("_gw_test_rollup", Path(__file__).parent / "test_rollup.py")
assert _spec and _spec.loader
_rollup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rollup)
_store, _num = _rollup._store, _rollup._num

STEPS = 4 * COARSE_STEPS + 300
#: Statistics checked: floats, a derived one, and the counts (from blocks since migration 0009).
STATS = ("l2", "mean", "var", "nonfinite", "zeros", "underflow")


def _val(seed: int) -> Any:
    def f(s: int, i: int) -> float:
        r = random.Random(seed * 10_000_019 + s * 1000 + i).random()
        if r < 0.02:
            return math.nan
        if r < 0.025:
            return math.inf
        if r < 0.03:
            return -math.inf
        return r * (100 if s % 397 == 0 else 1) - 0.3
    return f


def _counts(seed: int) -> Any:
    def f(s: int, i: int) -> tuple[int, int | None, int | None]:
        r = random.Random(seed * 7_000_003 + s * 1000 + i)
        return (r.choice([0, 0, 0, 1, 4096]), None if s % 5 == 0 else r.randrange(0, 900),
                None if s < 1500 else r.randrange(0, 30))  # an older agent's steps, a scaler from step 1500
    return f


def _fill(db: Database, mk: Any, seed: int, layers: int = 3) -> None:
    """Two ranks of batches of random lengths (1–700 steps), shuffled; then a resume that resends
    the middle of a coarse block (first write wins) and carries on."""
    rnd = random.Random(seed)
    batches = []
    seq = 0
    for rank in (0, 1):
        s = 1
        while s <= STEPS:
            n = rnd.choice([1, 5, 37, 64, 200, 700])
            seq += 1
            batches.append(mk(seq, range(s, min(s + n, STEPS + 1)), source=rank, values=_val(seed), events=False,
                              layers=layers, counts=_counts(seed)))
            s += n
    rnd.shuffle(batches)
    cut = len(batches) * 9 // 10
    for b in batches[:cut]:
        _store(db, b)
    mid = COARSE_STEPS * 2 + 500  # a restart resends from the middle of a block (other values: ignored)
    _store(db, mk(10_000, range(mid, mid + 90), source=0, values=lambda s, i: 7.0, events=False, layers=layers))
    for b in batches[cut:]:
        _store(db, b)


def _rows(conn: Any, lid: int, stat: str, a: int, b: int, rank: int | None = None) -> list[tuple[int, object]]:
    pts = series.layer_series(conn, lid, stat, start=a, end=b, max_points=None, use_blocks=False, rank=rank)["points"]
    return [(p["step"], p["value"]) for p in pts]


def _check_cell(vals: list[object], got: object, nan: int, agg: str) -> None:
    fin = [_num(v) for v in vals if _num(v) is not None]
    assert nan == sum(v == "NaN" for v in vals)
    g = _num(got)
    if not fin:
        assert g is None
    elif agg == "max":
        assert g == max(fin)
    elif agg == "min":
        assert g == min(fin)
    elif math.inf in fin and -math.inf in fin:
        assert got == "NaN"
    elif math.isfinite(sum(fin)):
        assert g == pytest.approx(sum(fin) / len(fin), rel=1e-9, abs=1e-12)
    else:
        assert g == sum(fin)


@contextmanager
def _count_statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def test_coarse_heatmap_and_series_equal_the_rows(db_url: str, mk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        _fill(db, mk, seed=1)
        rnd = random.Random(2)
        with db.read() as conn:
            layers = resolve_layers(conn, "run1", [])
            raw = {(lid, st): _rows(conn, lid, st, 0, STEPS) for lid, _, _ in layers for st in STATS}
            windows = [(None, None), (0, STEPS), (1, COARSE_STEPS - 1), (COARSE_STEPS, 3 * COARSE_STEPS - 1)]
            windows += [(a, a + rnd.randrange(COARSE_STEPS, STEPS - a)) for a in
                        rnd.sample(range(0, STEPS - COARSE_STEPS), 6)]
            coarse_cells = 0
            for start, end in windows:
                for stat in STATS:
                    for agg in ("max", "min", "mean"):
                        mp = rnd.choice([1, 2, 3])  # wide buckets: whole coarse blocks inside each
                        h = series.heatmap(conn, layers, stat, start=start, end=end, max_points=mp, agg=agg)
                        w = h["bucket_width"]
                        assert w % (COARSE_STEPS if w >= COARSE_STEPS else BLOCK_STEPS) == 0
                        hi = STEPS if end is None else min(end, STEPS)
                        for k, (lid, _, _) in enumerate(layers):
                            for j, s0 in enumerate(h["steps"]):
                                s1 = h["steps"][j + 1] - 1 if j + 1 < len(h["steps"]) else hi
                                vals = [v for s, v in raw[lid, stat] if s0 <= s <= s1]
                                _check_cell(vals, h["values"][k][j], h["nan"][k][j], agg)
                                coarse_cells += s1 - s0 + 1 >= COARSE_STEPS
                    # series of one layer over the same window, coarse buckets, one rank or both
                    lid = layers[rnd.randrange(len(layers))][0]
                    rank = rnd.choice([None, 0, 1])
                    x = series.layer_series(conn, lid, stat, start=start, end=end, max_points=2, rank=rank)
                    w = x["bucket_width"]
                    assert w % (COARSE_STEPS if w >= COARSE_STEPS else BLOCK_STEPS) == 0
                    pts = _rows(conn, lid, stat, start or 0, STEPS if end is None else end, rank)
                    assert sum(b["count"] for b in x["buckets"]) == len(pts)
                    for b in x["buckets"]:
                        vals = [v for s, v in pts if b["step_min"] <= s <= b["step_max"]]
                        assert b["count"] == len(vals)
                        _check_cell(vals, b["max"], b["nan"], "max")
                        _check_cell(vals, b["min"], b["nan"], "min")
                        _check_cell(vals, b["mean"], b["nan"], "mean")
                        if stat == "var":  # pooled moments: the coarse blocks' merged with the edges'
                            y = series.layer_series(conn, lid, stat, start=b["step_min"], end=b["step_max"],
                                                    max_points=1, rank=rank, use_blocks=False)["buckets"][0]
                            for key in ("count", "skipped"):
                                assert b["pooled"][key] == y["pooled"][key]
                            for key in ("mean", "var"):
                                assert b["pooled"][key] == pytest.approx(y["pooled"][key], rel=1e-9)
            assert coarse_cells > 50  # most cells did span coarse blocks
            # a heatmap over more 64-step blocks than the budget is served from the coarse level
            monkeypatch.setattr(series, "RAW_ROWS_BUDGET", 10)
            monkeypatch.setattr(series, "BLOCK_ROWS_BUDGET", 10)
            h = series.heatmap(conn, layers, "l2", start=None, end=None, max_points=1000)
            assert h["bucket_width"] == COARSE_STEPS and len(h["steps"]) == STEPS // COARSE_STEPS + 1
            monkeypatch.setattr(series, "BLOCK_ROWS_BUDGET", 10**9)
            h = series.heatmap(conn, layers, "l2", start=None, end=None, max_points=1000)
            assert h["bucket_width"] == BLOCK_STEPS
    finally:
        engine.dispose()


def _coarse_rows(conn: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM layer_stat_coarse ORDER BY layer_id, block, rank"))]


def _same_coarse(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    assert len(after) == len(before)
    for x, y in zip(before, after):
        for k, v in x.items():
            st = k.removesuffix("_sum")
            if k.endswith("_sum") and x[st + "_min"] == -math.inf and x[st + "_max"] == math.inf:
                continue  # inf + -inf: SQLite's NULL drops out of a merge; reads take NaN from min/max
            if isinstance(v, float) and math.isfinite(v):
                assert y[k] == pytest.approx(v, rel=1e-9, abs=1e-9), (k, x, y)
            elif isinstance(v, float):
                assert y[k] is not None and (y[k] == v or (math.isnan(v) and math.isnan(y[k]))), (k, x, y)
            else:
                assert y[k] == v, (k, x, y)


def _recomputed(db: Database, ids: set[int], below: int) -> list[dict[str, Any]]:
    """The coarse rows as the SQL recompute from the 64-step blocks makes them, below ``below``."""
    with db.write() as conn:
        conn.execute(text("DELETE FROM layer_stat_coarse"))
        conn.execute(text(_COARSE_ROLLUP.replace("{ids}", ",".join(map(str, sorted(ids))))),
                     {"lo": 0, "hi": below // BLOCK_STEPS - 1})
    with db.read() as conn:
        return _coarse_rows(conn)


def test_ingest_coarsening_equals_the_recompute_from_blocks(db_url: str, mk: Any) -> None:
    """Each coarse block made at ingest (merged batch by batch below the run's watermark, numpy
    and Chan's merge in the upsert; computed from the 64-step blocks when a batch moves the
    watermark) equals the SQL recompute from its 64-step blocks; none is kept at or above the
    watermark, which sits at the coarse block holding the run's last step."""
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        _fill(db, mk, seed=3, layers=2)
        with db.read() as conn:
            before = _coarse_rows(conn)
            ids = set(conn.execute(text("SELECT id FROM layer")).scalars())
            mark = conn.execute(text("SELECT coarse_through FROM run WHERE id = 'run1'")).scalar_one()
        assert mark == STEPS // COARSE_STEPS * COARSE_STEPS
        assert len(before) == 2 * 2 * (STEPS // COARSE_STEPS) and max(r["block"] for r in before) == mark // COARSE_STEPS - 1
        after = _recomputed(db, ids, mark)
        _same_coarse(before, after)
        # the overlap path's recompute (also the watermark's) replaces what the coarse rows held
        with db.write() as conn:
            conn.execute(text("UPDATE layer_stat_coarse SET n = -1, l2_max = -1"))
            run_raw(conn, *_coarse_recompute(sorted(ids), 0, mark - 1))
        with db.read() as conn:
            again = _coarse_rows(conn)
        assert [(r["n"], r["l2_max"]) for r in again] == [(r["n"], r["l2_max"]) for r in before]
    finally:
        engine.dispose()


def test_statement_count_of_a_heatmap_does_not_grow_with_layers(db_url: str, mk: Any) -> None:
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        _store(db, mk(1, range(1, 2 * COARSE_STEPS + 150), values=_val(4), events=False, layers=40))
        with db.read() as conn:
            layers = resolve_layers(conn, "run1", [])
            for n in (1, 40):
                with _count_statements(engine) as seen:
                    series.heatmap(conn, layers[:n], "l2", start=30, end=2 * COARSE_STEPS + 100, max_points=1)
                assert len(seen) == 3, seen  # the range probe, the coarse watermark, one statement for every cell
                with _count_statements(engine) as seen:
                    series.layers_series(conn, [lid for lid, _, _ in layers[:n]], "std", start=30,
                                         end=2 * COARSE_STEPS + 100, max_points=1)
                assert len(seen) <= 8, seen  # probe, watermark, cells, pooled moments per segment (≤ 5)
    finally:
        engine.dispose()


def test_concurrent_batches_around_the_watermark_keep_the_coarse_level_exact(db_url: str, mk: Any) -> None:
    """Four writers at once (two ranks, batches of random lengths crossing coarse blocks, the
    ranks apart by up to a coarse block so one rank's batches land below the watermark the other
    moved): every coarse block below the final watermark equals the recompute from its blocks,
    none is kept above it, and a heatmap read through the coarse level equals one from the rows."""
    from concurrent.futures import ThreadPoolExecutor

    engine = make_engine(db_url)
    db = Database(engine)
    try:
        rnd = random.Random(11)
        per_rank: list[list[Any]] = [[], []]
        seq = 1
        for rank in (0, 1):
            s = 1
            while s <= STEPS:
                n = rnd.choice([20, 64, 150, 300])
                seq += 1
                per_rank[rank].append(mk(seq, range(s, min(s + n, STEPS + 1)), source=rank, values=_val(5),
                                         events=False, layers=3, counts=_counts(5)))
                s += n
        # rank 1 trails rank 0 by about a coarse block; in flight four at a time
        order = sorted([(b.steps[0].step + (COARSE_STEPS if r else 0), b) for r in (0, 1) for b in per_rank[r]],
                       key=lambda t: t[0])
        _store(db, order[0][1])  # the run and its layers
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda t: _store(db, t[1]), order[1:]))
        with db.read() as conn:
            before = _coarse_rows(conn)
            ids = set(conn.execute(text("SELECT id FROM layer")).scalars())
            mark = conn.execute(text("SELECT coarse_through FROM run WHERE id = 'run1'")).scalar_one()
            layers = resolve_layers(conn, "run1", [])
            raw = {lid: _rows(conn, lid, "l2", 0, STEPS) for lid, _, _ in layers}
            h = series.heatmap(conn, layers, "l2", start=0, end=STEPS, max_points=2, agg="max")
        assert mark == STEPS // COARSE_STEPS * COARSE_STEPS
        assert {r["rank"] for r in before} == {0, 1} and max(r["block"] for r in before) < mark // COARSE_STEPS
        _same_coarse(before, _recomputed(db, ids, mark))
        assert h["bucket_width"] >= COARSE_STEPS
        for k, (lid, _, _) in enumerate(layers):
            for j, s0 in enumerate(h["steps"]):
                s1 = h["steps"][j + 1] - 1 if j + 1 < len(h["steps"]) else STEPS
                _check_cell([v for st, v in raw[lid] if s0 <= st <= s1], h["values"][k][j], h["nan"][k][j], "max")
    finally:
        engine.dispose()


def _one_batch(seq: int, steps: range, source: int, idxs: list[int]) -> Any:
    from gradwatch.agent import wire

    recs = [wire.StepRecord(step=s, time=float(s), rank=source, layer_ids=idxs, layers={
        "numel": [4] * len(idxs), "mean": [0.5] * len(idxs), "m2": [1.0] * len(idxs),
        "l2": [float(s)] * len(idxs), "maxabs": [1.0] * len(idxs), "nonfinite": [0] * len(idxs)}) for s in steps]
    return wire.Batch(run=wire.RunInfo(run_id="r"), seq=seq, source=source,
                      layers=[wire.LayerInfo(i, f"l{i}", [4], "float32") for i in idxs], steps=recs)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # (SQLite: one writer at a time)
def test_a_layer_another_batch_creates_meanwhile_is_in_the_coarse_blocks_the_watermark_passes(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch B (rank 0) reads the run's layers; batch C (rank 1, a new layer, steps below 1,024)
    then stores and commits whole; B moves the watermark past 1,024. The coarse block B computes
    holds C's layer too (B's own layer read is older than C), and reads through it see C's rows."""
    import threading

    from gradwatch.server.repo import ingest
    from gradwatch.server.repo.ingest import store_batch

    engine = make_engine(db_url)
    db = Database(engine)
    try:
        with db.write() as conn:
            store_batch(conn, _one_batch(1, range(0, 10), 0, [0, 1, 2]))
        c = _one_batch(1, range(10, 900), 1, [3])
        b = _one_batch(2, range(1000, 1100), 0, [0, 1, 2])
        orig, ran = ingest._insert_layer_rows, []

        def then_c(conn: Any, frame: Any) -> bool:
            if not ran:  # B has read the run's layers: C runs whole now, in another transaction
                ran.append(threading.Thread(target=lambda: _store(db, c)))
                ran[0].start()
                ran[0].join(60)
                assert not ran[0].is_alive()
            return bool(orig(conn, frame))

        monkeypatch.setattr(ingest, "_insert_layer_rows", then_c)
        _store(db, b)
        with db.read() as conn:
            assert conn.execute(text("SELECT coarse_through FROM run")).scalar_one() == COARSE_STEPS
            got = conn.execute(text("SELECT l.idx, c.rank, c.n FROM layer_stat_coarse c JOIN layer l ON l.id = "
                                    "c.layer_id ORDER BY 1, 2")).all()
            assert [tuple(r) for r in got] == [(0, 0, 34), (1, 0, 34), (2, 0, 34), (3, 1, 890)]
            layers = resolve_layers(conn, "r", [])
            h = series.heatmap(conn, layers, "l2", start=0, end=2047, max_points=1, agg="max")
            assert h["bucket_width"] == 2 * COARSE_STEPS and h["values"] == [[1099.0]] * 3 + [[899.0]]
    finally:
        engine.dispose()


def test_a_range_past_the_data_reads_the_steps_above_the_watermark(db_url: str, mk: Any) -> None:
    """Steps 1-1,499 (watermark 1,024), read over 0-2,047 in coarse-wide buckets (an end past the
    data is not clamped): the steps above the watermark come from the 64-step blocks and rows,
    none is lost to a coarse block that does not exist."""
    engine = make_engine(db_url)
    db = Database(engine)
    try:
        _store(db, mk(1, range(1, 1500), values=_val(6), events=False, layers=2))
        with db.read() as conn:
            lid = resolve_layers(conn, "run1", [])[0][0]
            s = series.layer_series(conn, lid, "l2", start=0, end=2 * COARSE_STEPS - 1, max_points=2)
            assert s["bucket_width"] == COARSE_STEPS
            assert [(x["step_min"], x["step_max"], x["count"]) for x in s["buckets"]] == [(1, 1023, 1023),
                                                                                         (1024, 1499, 476)]
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # (SQLite: one writer at a time)
def test_deleting_a_run_while_one_of_its_batches_is_being_stored(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of rank 1 below the watermark holds the run row's lock and is about to merge into
    an existing coarse block when the run is deleted: the delete waits for the batch (no
    deadlock: it used to take that coarse block and the cursor first, then wait for the run
    row), then removes everything, the batch's rows included (nothing orphaned)."""
    import threading

    from gradwatch.server.repo import ingest
    from gradwatch.server.repo.runs import delete_run

    engine = make_engine(db_url)
    db = Database(engine)
    try:
        _store(db, _one_batch(1, range(0, 2100), 0, [0, 1, 2]))  # watermark 2048
        _store(db, _one_batch(1, range(0, 20), 1, [0, 1, 2]))  # rank 1's coarse block 0 exists
        held, go = threading.Event(), threading.Event()
        orig = ingest._coarse_work

        def pause(*a: Any, **k: Any) -> Any:
            held.set()  # the run row is locked by now
            assert go.wait(60)
            return orig(*a, **k)

        monkeypatch.setattr(ingest, "_coarse_work", pause)
        errors: list[BaseException] = []

        def run(fn: Any) -> threading.Thread:
            def body() -> None:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001  (reported below)
                    errors.append(e)
            t = threading.Thread(target=body)
            t.start()
            return t

        def drop() -> None:
            with db.write() as conn:
                delete_run(conn, "r")

        storing = run(lambda: _store(db, _one_batch(2, range(64, 80), 1, [0, 1, 2])))
        assert held.wait(60)
        deleting = run(drop)
        with db.read() as conn:  # the delete waits on a lock (whichever it reached)
            for _ in range(600):
                if conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND wait_event_type = 'Lock'")).scalar_one():
                    break
                conn.rollback()
                threading.Event().wait(0.05)
            else:
                raise AssertionError("the delete never waited on a lock")
        go.set()
        storing.join(60)
        deleting.join(60)
        assert not storing.is_alive() and not deleting.is_alive()
        assert not errors, errors
        with db.read() as conn:
            left = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("run", "layer", "layer_stat", "layer_stat_block", "layer_stat_coarse", "ingest_batch",
                              "ingest_cursor", "step_record")}
        assert left == dict.fromkeys(left, 0), left
    finally:
        engine.dispose()
