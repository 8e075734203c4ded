"""The columnar ingest path (server/repo/frame.py) against a plain per-row reference.

Rows, rollup aggregates, the PostgreSQL binary COPY stream and binary array parameters are
checked on random batches with NaN, ±inf, unmeasured (null) values, layers missing from some
steps, several ranks and both wire column forms (packed arrays and JSON lists).
"""

from __future__ import annotations

import json
import math
import random
import struct
from array import array
from typing import Any

import numpy as np
import pytest

from gradwatch.agent import wire
from gradwatch.agent.spec import LAYER_FIELDS, ROLLUP_STATS, Moments, merge_all
from gradwatch.server.db.models import BLOCK_STEPS, LAYER_FLOAT_COLUMNS
from gradwatch.server.repo.frame import LayerFrame, pg_binary_array
from gradwatch.server.repo.ingest import _LAYER_STAT_COLUMNS


def _value(rnd: random.Random) -> float:
    r = rnd.random()
    if r < 0.08:
        return math.nan
    if r < 0.11:
        return math.inf
    if r < 0.13:
        return -math.inf
    return rnd.uniform(-5, 5) * 10 ** rnd.randint(-30, 30)


#: nullable fields of the spec (not measured by some agents or steps)
_NULLABLE = {f.name for f in LAYER_FIELDS if f.nullable}
_NULLABLE_INTS = [f.name for f in LAYER_FIELDS if f.nullable and not f.is_float]


def random_batch(seed: int, packed: bool) -> wire.Batch:
    rnd = random.Random(seed)
    n_layers = rnd.randint(1, 12)
    steps = []
    step = rnd.randint(0, 300)
    for _ in range(rnd.randint(1, 90)):
        step += rnd.randint(1, 40 if rnd.random() < 0.2 else 3)
        for rank in rnd.sample(range(3), rnd.randint(1, 3)):
            ids = sorted(rnd.sample(range(n_layers), rnd.randint(0, n_layers)))
            cols: dict[str, Any] = {"numel": [rnd.randint(0, 1 << 40) for _ in ids],
                                    "nonfinite": [rnd.randint(0, 9) for _ in ids]}
            for name in _NULLABLE_INTS:  # counts of later agents: absent, partly or fully measured
                mode = rnd.random()
                cols[name] = ([None] * len(ids) if mode < 0.3 else
                              [None if mode < 0.45 and rnd.random() < 0.5 else rnd.randint(0, 1 << 40) for _ in ids])
            for name in LAYER_FLOAT_COLUMNS:
                mode = rnd.random()
                if name in _NULLABLE and mode < 0.3:
                    cols[name] = [None] * len(ids)  # not measured this step
                elif name in _NULLABLE and mode < 0.45:
                    cols[name] = [None if rnd.random() < 0.5 else _value(rnd) for _ in ids]
                elif mode < 0.15:
                    cols[name] = [math.nan] * len(ids)
                else:
                    cols[name] = [_value(rnd) for _ in ids]
                if name == "m2":  # never negative (the wire refuses it)
                    cols[name] = [abs(v) for v in cols[name]]
            steps.append(wire.StepRecord(step=step, time=1.0, rank=rank, layer_ids=ids, layers=cols))
    b = wire.Batch(run=wire.RunInfo(run_id="r"), seq=1,
                   layers=[wire.LayerInfo(i, f"l{i}") for i in range(n_layers)], steps=steps)
    if packed:  # through the wire as the agent sends it, decoded as the server decodes it
        b = wire.batch_from_dict(json.loads(wire.encode_batch(b)), packed_as_array=True)
        assert any(isinstance(c, array) for s in b.steps for c in s.layers.values()) or not b.row_count
    return b


def reference_rows(b: wire.Batch, ids: dict[int, int]) -> list[tuple[Any, ...]]:
    out = []
    for s in b.steps:
        for j, idx in enumerate(s.layer_ids):
            mask = 0
            vals = {}
            for bit, name in enumerate(LAYER_FLOAT_COLUMNS):
                v = s.layers[name][j]
                if v is not None and v != v:
                    mask |= 1 << bit
                    v = None
                vals[name] = v
            out.append((ids[idx], s.step, s.rank,
                        *(vals[f.name] if f.is_float else s.layers[f.name][j] for f in LAYER_FIELDS), mask))
    return out


def _derived(r: tuple[Any, ...], name: str) -> tuple[Any, int]:
    """(value, nan_mask bit) of a rollup statistic of a reference row: var/std from m2 and numel;
    a count (no NaN bit: None) as the float its rollup columns hold."""
    if name not in LAYER_FLOAT_COLUMNS and name not in ("var", "std"):
        v = r[_LAYER_STAT_COLUMNS.index(name)]
        return (None if v is None else float(v)), None
    if name not in ("var", "std"):
        return r[_LAYER_STAT_COLUMNS.index(name)], LAYER_FLOAT_COLUMNS.index(name)
    n, m2 = r[_LAYER_STAT_COLUMNS.index("numel")], r[_LAYER_STAT_COLUMNS.index("m2")]
    bit = LAYER_FLOAT_COLUMNS.index("m2")
    if m2 is None:
        return None, bit
    var = m2 / n if n > 0 else 0.0
    return (var if name == "var" else math.sqrt(var)), bit


def reference_blocks(rows: list[tuple[Any, ...]]) -> dict[tuple[int, int, int], list[Any]]:
    groups: dict[tuple[int, int, int], list[tuple[Any, ...]]] = {}
    for r in rows:
        groups.setdefault((r[0], r[1] // BLOCK_STEPS, r[2]), []).append(r)
    out = {}
    for key, rs in groups.items():
        steps = [r[1] for r in rs]
        agg: list[Any] = [min(steps), max(steps), len(rs)]
        col = {c: _LAYER_STAT_COLUMNS.index(c) for c in ("numel", "mean", "m2")}
        fin = [r for r in rs if r[col["mean"]] is not None and r[col["m2"]] is not None
               and math.isfinite(r[col["mean"]]) and math.isfinite(r[col["m2"]])]
        mom = merge_all(Moments(r[col["numel"]], r[col["mean"]], r[col["m2"]]) for r in fin)
        # the vectorised form centres on the weighted mean, whose rounding adds up to n·(ε·mean)² to m2
        slack = 64 * mom.n * (2.3e-16 * mom.mean) ** 2 if mom.n and math.isfinite(mom.mean) else 0.0
        agg += [mom.n, ("pooled", mom.mean if mom.n else None, 0.0), ("pooled", mom.m2 if mom.n else None, slack),
                len(rs) - len(fin)]
        for name in ROLLUP_STATS:
            bit = _derived(rs[0], name)[1]
            vals = [v for v in (_derived(r, name)[0] for r in rs) if v is not None]
            total = (sum(vals), sum(abs(v) for v in vals)) if vals else None  # (sum, scale of its rounding)
            agg += [min(vals) if vals else None, max(vals) if vals else None, total,
                    len(vals), 0 if bit is None else sum(1 for r in rs if r[-1] >> bit & 1)]
        out[key] = agg
    return out


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (x != x and y != y)
    return bool(x == y) and type(x) is type(y)


@pytest.mark.parametrize("packed", [True, False])
def test_rows_and_blocks_match_the_reference(packed):
    for seed in range(60):
        b = random_batch(seed, packed)
        ids = {la.index: 1000 + 7 * la.index for la in b.layers}
        frame = LayerFrame.from_batch(b, ids)
        want = reference_rows(b, ids)
        got = list(frame.rows())
        assert len(got) == len(want) == len(frame) == b.row_count
        for g, w in zip(got, want):
            assert all(_same(x, y) for x, y in zip(g, w)), (seed, g, w)

        ref = reference_blocks(want)
        blocks = frame.blocks().rows()
        assert len(blocks) == len(ref)
        for row in blocks:
            key, agg = row[:3], list(row[3:])
            exp = ref[key]
            assert len(agg) == len(exp)
            for k, (x, y) in enumerate(zip(agg, exp)):
                if isinstance(y, tuple) and y[0] == "pooled":  # Chan's fold vs the vectorised n-way form
                    want, slack = y[1], y[2]
                    assert (x is None) == (want is None), (seed, key, k, x, want)
                    if want is not None and x is not None and math.isfinite(want):
                        assert abs(x - want) <= 1e-9 * abs(want) + slack, (seed, key, k, x, want)
                    elif want is not None:
                        assert _same(x, want) or not math.isfinite(x), (seed, key, k, x, want)
                elif k >= 7 and (k - 7) % 5 == 2 and y is not None:  # a sum: the order of additions may differ
                    total, scale = y
                    if math.isfinite(total):
                        assert x is not None and abs(x - total) <= 1e-12 * scale, (seed, key, k, x, total)
                    else:
                        assert _same(x, total), (seed, key, k, x, total)
                else:
                    assert _same(x, y), (seed, key, k, x, y)


def test_subset_and_columns_follow_the_rows():
    b = random_batch(5, packed=True)
    ids = {la.index: la.index + 1 for la in b.layers}
    frame = LayerFrame.from_batch(b, ids)
    keep = np.arange(len(frame)) % 3 == 1
    rows = list(frame.rows())
    sub = list(frame.subset(keep).rows())
    want = [r for r, k in zip(rows, keep) if k]
    assert len(sub) == len(want) > 0
    assert all(all(_same(x, y) for x, y in zip(g, w)) for g, w in zip(sub, want))
    cols = frame.columns()
    assert len(cols) == len(_LAYER_STAT_COLUMNS)
    for j, (vals, null) in enumerate(cols):
        for i, r in enumerate(rows):
            if null is not None and null[i]:
                assert r[j] is None
            else:
                assert _same(vals[i].item(), r[j])


def test_empty_batch_has_no_rows_or_blocks():
    b = wire.Batch(run=wire.RunInfo(run_id="r"), seq=1,
                   steps=[wire.StepRecord(step=1, time=0.0, layer_ids=[], layers={k: [] for k in wire.LAYER_FIELDS})])
    frame = LayerFrame.from_batch(b, {})
    assert len(frame) == 0 and list(frame.rows()) == [] and len(frame.blocks()) == 0


def _decode_pg_array(data: bytes) -> list[Any]:
    ndim, has_null, oid, n, lb = struct.unpack_from(">iiIii", data)
    assert ndim == 1 and lb == 1
    fmt = ">d" if oid == 701 else ">q"
    out, off = [], 20
    for _ in range(n):
        (size,) = struct.unpack_from(">i", data, off)
        off += 4
        if size < 0:
            out.append(None)
            continue
        out.append(struct.unpack_from(fmt, data, off)[0])
        off += size
    assert off == len(data) and bool(has_null) == (None in out)
    return out


@pytest.mark.parametrize("kind", ["none", "all", "mixed"])
def test_binary_arrays_decode_to_the_values(kind):
    rnd = random.Random(len(kind))
    vals = np.array([_value(rnd) for _ in range(300)])
    null = {"none": None, "all": np.ones(300, bool), "mixed": np.array([rnd.random() < 0.3 for _ in range(300)])}[kind]
    got = _decode_pg_array(pg_binary_array(vals, null))
    for i, g in enumerate(got):
        if null is not None and null[i]:
            assert g is None
        else:
            assert _same(g, vals[i].item())
    ints = np.array([rnd.randint(-(1 << 62), 1 << 62) for _ in range(50)], np.int64)
    assert _decode_pg_array(pg_binary_array(ints, None)) == ints.tolist()


def test_copy_stream_and_arrays_round_trip_through_postgresql(fresh_pg):
    """PostgreSQL itself reads the COPY stream and the array parameters back to the same values."""
    import psycopg

    from gradwatch.server.repo.frame import PG_TYPES
    from gradwatch.server.repo.ingest import pg_array_params

    cols = ", ".join(f"{c} {t}" for c, t in zip(_LAYER_STAT_COLUMNS, PG_TYPES))
    with psycopg.connect(fresh_pg.replace("postgresql+psycopg://", "postgresql://", 1)) as con:
        con.execute(f"CREATE TABLE t (seq int4, {cols})")
        for seed in range(12):
            b = random_batch(100 + seed, packed=seed % 2 == 0)
            frame = LayerFrame.from_batch(b, {la.index: la.index + 1 for la in b.layers})
            with con.cursor() as cur, cur.copy(f"COPY t ({', '.join(_LAYER_STAT_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as cp:
                cp.write(frame.copy_binary())
            got = con.execute(f"SELECT {', '.join(_LAYER_STAT_COLUMNS)} FROM t").fetchall()
            con.execute("DELETE FROM t")
            want = list(frame.rows())
            key = lambda r: (r[0], r[1], r[2])  # noqa: E731
            assert len(got) == len(want)
            for g, w in zip(sorted(got, key=key), sorted(want, key=key)):
                assert all(_same(x, y) for x, y in zip(g, w)), (seed, g, w)
            # the same columns as binary array parameters
            with con.cursor() as cur:
                for vals, null in frame.columns():
                    (p,) = pg_array_params(cur, [(vals, null)])
                    back = cur.execute("SELECT %b::" + ("int8[]" if vals.dtype.kind == "i" else "float8[]"), [p]).fetchone()[0]
                    exp = [None if (null is not None and z) else v for v, z in
                           zip(vals.tolist(), null.tolist() if null is not None else [False] * len(vals))]
                    assert len(back) == len(exp) and all(_same(x, y) for x, y in zip(back, exp))
