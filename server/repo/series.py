"""Series queries with server-side downsampling.

A range wider than ``max_points`` steps is cut into ``max_points`` buckets of equal step width;
each bucket reports min, max and mean (so a one-step spike stays visible as a bucket's max),
the row count and how many values were NaN (NaN is stored as NULL + a mask bit, so SQL min/max
ignore it and the count says it was there). Queries are plain SQL over the clustered key
(layer_id, step, rank), identical on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy import Connection, text

from gradwatch.agent.spec import ROLLUP_STATS, SERIES_LAYER_STATS, Moments, merge_moments, std_of
from gradwatch.server.db.models import BLOCK_STEPS, STEP_FLOAT_COLUMNS
from gradwatch.server.encoding import enc, enc_nan
from gradwatch.server.errors import Invalid
from gradwatch.server.repo.ingest import stat_sql

#: Per-layer statistics a series can be asked for (stored and derived; from the spec).
LAYER_STATS: tuple[str, ...] = SERIES_LAYER_STATS
STEP_FIELDS: tuple[str, ...] = STEP_FLOAT_COLUMNS


def _width(start: int, end: int, max_points: int | None) -> int:
    if max_points is None:
        return 1
    return max(1, -(-(end - start + 1) // max_points))


def _blocks_apply(stat: str, w: int, use_blocks: bool) -> bool:
    return use_blocks and stat in ROLLUP_STATS and w >= BLOCK_STEPS


def _combine(parts: list[tuple[Any, ...]]) -> dict[Any, list[Any]]:
    """Merge partial aggregates keyed by their first element(s): (key, smin, smax, min, max, sum, cnt, n, nan)."""
    out: dict[Any, list[Any]] = {}
    for key, smin, smax, mn, mx, sm, cnt, n, nan in parts:
        cur = out.get(key)
        if cur is None:
            out[key] = [smin, smax, mn, mx, sm, int(cnt or 0), int(n or 0), int(nan or 0)]
            continue
        cur[0] = min(cur[0], smin)
        cur[1] = max(cur[1], smax)
        cur[2] = mn if cur[2] is None else (cur[2] if mn is None else min(cur[2], mn))
        cur[3] = mx if cur[3] is None else (cur[3] if mx is None else max(cur[3], mx))
        cur[4] = sm if cur[4] is None else (cur[4] if sm is None else cur[4] + sm)
        cur[5] += int(cnt or 0)
        cur[6] += int(n or 0)
        cur[7] += int(nan or 0)
    return out


def _block_parts(conn: Connection, layer_ids: list[int], stat: str, a: int, b: int, w: int,
                 rank: int | None) -> list[tuple[Any, ...]]:
    """Partial aggregates keyed by (layer_id, bucket): whole blocks from the rollup, the partial
    blocks at either edge of [a, b] from the rows. Buckets are aligned to blocks (w % BLOCK == 0)."""
    B = BLOCK_STEPS
    a0 = a // B * B
    ids = ",".join(str(int(i)) for i in layer_ids)
    params: dict[str, Any] = {"a0": a0, "w": w}
    rk = ""
    if rank is not None:
        rk = " AND rank = :rank"
        params["rank"] = rank
    first_full = a if a % B == 0 else a0 + B
    last_full = b if (b + 1) % B == 0 else b // B * B - 1
    parts: list[tuple[Any, ...]] = []
    if first_full <= last_full:
        rows = conn.execute(text(
            f"SELECT layer_id, (block * {B} - :a0) / :w AS bk, min(step_min), max(step_max), min({stat}_min), "
            f"max({stat}_max), sum({stat}_sum), sum({stat}_cnt), sum(n), sum({stat}_nan) FROM layer_stat_block "
            f"WHERE layer_id IN ({ids}) AND block BETWEEN :blo AND :bhi{rk} GROUP BY layer_id, bk"),
            {**params, "blo": first_full // B, "bhi": last_full // B}).all()
        parts += [((lid, bk), *rest) for lid, bk, *rest in rows]  # unpacked: slicing a Row is slow
        edges = [(a, first_full - 1), (last_full + 1, b)]
    else:
        edges = [(a, b)]
    col, nan = stat_sql(stat)
    for lo, hi in edges:
        if lo > hi:
            continue
        rows = conn.execute(text(
            f"SELECT layer_id, (step - :a0) / :w AS bk, min(step), max(step), min({col}), max({col}), sum({col}), "
            f"count({col}), count(*), sum({nan}) FROM layer_stat WHERE layer_id IN ({ids}) "
            f"AND step BETWEEN :lo AND :hi{rk} GROUP BY layer_id, bk"), {**params, "lo": lo, "hi": hi}).all()
        parts += [((lid, bk), *rest) for lid, bk, *rest in rows]
    return parts


#: Statistics whose buckets also carry ``pooled``: the moments of all gradient elements of the
#: bucket's steps and ranks, as if concatenated (``docs/statistics.md``).
POOLED_STATS: tuple[str, ...] = ("mean", "var", "std")


def _pooled(conn: Connection, layer_ids: list[int], a: int, b: int, w: int, key0: int, rank: int | None,
            blocks: bool) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (layer, bucket ``(start − key0) // w``): Chan's merge (:func:`merge_moments`) over the
    pooled moments of the whole blocks inside [a, b] and over the rows outside them. Rows with a
    non-finite mean or M2 are left out and counted in ``skipped``. Two statements at most."""
    B = BLOCK_STEPS
    ids = ",".join(str(int(i)) for i in layer_ids)
    params: dict[str, Any] = {}
    rk = ""
    if rank is not None:
        rk = " AND rank = :rank"
        params["rank"] = rank
    acc: dict[tuple[int, int], list[Any]] = {}

    def add(key: tuple[int, int], n: Any, mean: Any, m2: Any, skip: int) -> None:
        cur = acc.setdefault(key, [Moments(0, 0.0, 0.0), 0])
        if n and mean is not None and m2 is not None and math.isfinite(mean) and math.isfinite(m2):
            cur[0] = merge_moments(cur[0], Moments(int(n), float(mean), float(m2)))
        cur[1] += int(skip or 0)

    edges = [(a, b)]
    if blocks:
        first_full = a if a % B == 0 else a // B * B + B
        last_full = b if (b + 1) % B == 0 else b // B * B - 1
        if first_full <= last_full:
            for lid, blk, n, mean, m2, skip in conn.execute(text(
                    f"SELECT layer_id, block, mom_n, mom_mean, mom_m2, mom_skip FROM layer_stat_block WHERE layer_id "
                    f"IN ({ids}) AND block BETWEEN :blo AND :bhi{rk} ORDER BY layer_id, block, rank"),
                    {**params, "blo": first_full // B, "bhi": last_full // B}):
                add((lid, (blk * B - key0) // w), n, mean, m2, skip)
            edges = [(a, first_full - 1), (last_full + 1, b)]
    edges = [(lo, hi) for lo, hi in edges if lo <= hi]
    if edges:
        cond = " OR ".join(f"step BETWEEN {int(lo)} AND {int(hi)}" for lo, hi in edges)
        for lid, step, n, mean, m2 in conn.execute(text(
                f"SELECT layer_id, step, numel, mean, m2 FROM layer_stat WHERE layer_id IN ({ids}) AND ({cond}){rk} "
                "ORDER BY layer_id, step, rank"), params):
            fin = mean is not None and m2 is not None and math.isfinite(mean) and math.isfinite(m2)
            add((lid, (step - key0) // w), n if fin else 0, mean, m2, 0 if fin else 1)
    out = {}
    for key, (mom, skip) in acc.items():
        var = mom.var
        out[key] = {"count": mom.n, "mean": enc(mom.mean) if mom.n else None, "var": enc(var) if mom.n else None,
                    "std": enc(std_of(var)) if mom.n else None, "skipped": skip}
    return out


def _mean(mn: Any, mx: Any, mean: Any) -> float | None:
    """A bucket's mean, NaN when it holds both +inf and -inf (their sum is NaN). Read off min and
    max, so it holds whatever the sum became on the way: PostgreSQL keeps NaN, SQLite turns it
    into NULL (a NULL block sum is then dropped when blocks merge), and ``avg`` follows each."""
    if mn == -math.inf and mx == math.inf:
        return math.nan
    return None if mean is None else float(mean)


def _bucket(step_min: int, step_max: int, mn: Any, mx: Any, mean: Any, count: int, nan: int) -> dict[str, Any]:
    return {"step_min": step_min, "step_max": step_max, "min": enc(mn), "max": enc(mx),
            "mean": enc(_mean(mn, mx, mean)), "count": int(count), "nan": int(nan or 0)}


def _range(conn: Connection, sql_from: str, params: dict[str, Any], start: int | None,
           end: int | None, *, clamp: bool = False) -> tuple[int, int] | None:
    """The step range to read: [start, end], a missing end taken from the data. ``clamp``: also
    cut a given range down to the data's (buckets then only span steps that exist)."""
    if start is not None and end is not None and not clamp:
        return (start, end) if start <= end else None
    lo, hi = conn.execute(text(f"SELECT min(step), max(step) {sql_from}"), params).one()
    if lo is None:
        return None
    s = lo if start is None else max(start, lo) if clamp else start
    e = hi if end is None else min(end, hi) if clamp else end
    return (s, e) if s <= e else None


def _probe(ids: str, rank_filter: str) -> str:
    """FROM clause of the first and last step of the layers ``ids``: min/max(step) over an IN list
    would scan every row of those layers (seconds at 20M rows), so one index probe per layer and end."""
    return ("FROM (SELECT (SELECT min(s.step) FROM layer_stat s WHERE s.layer_id = l.id" + rank_filter + ") AS step "
            f"FROM layer l WHERE l.id IN ({ids}) UNION ALL SELECT (SELECT max(s.step) FROM layer_stat s "
            f"WHERE s.layer_id = l.id{rank_filter}) FROM layer l WHERE l.id IN ({ids})) x")


def layer_series(conn: Connection, layer_id: int, stat: str, *, start: int | None, end: int | None,
                 max_points: int | None, rank: int | None = None, use_blocks: bool = True) -> dict[str, Any]:
    """One layer's ``stat`` over a step range: raw points or min/max/mean buckets."""
    return layers_series(conn, [layer_id], stat, start=start, end=end, max_points=max_points, rank=rank,
                         use_blocks=use_blocks)[0]


def layers_series(conn: Connection, layer_ids: list[int], stat: str, *, start: int | None, end: int | None,
                  max_points: int | None, rank: int | None = None, use_blocks: bool = True) -> list[dict[str, Any]]:
    """Several layers' ``stat`` over one step range (a missing end: the layers' own), on one
    bucket grid: raw points or min/max/mean buckets, in a bounded number of statements whatever
    the layer count (range probe, one aggregate pass or blocks plus edges, pooled moments)."""
    if stat not in LAYER_STATS:
        raise Invalid(f"unknown stat {stat!r}; expected one of {list(LAYER_STATS)}")
    if not layer_ids:
        return []
    ids = ",".join(str(int(i)) for i in layer_ids)
    params: dict[str, Any] = {}
    rk = rk_s = ""
    if rank is not None:
        rk, rk_s = " AND rank = :rank", " AND s.rank = :rank"
        params["rank"] = rank
    rng = _range(conn, _probe(ids, rk_s), params, start, end)
    if rng is None:
        return [{"downsampled": False, "points": []} for _ in layer_ids]
    a, b = rng
    p = {**params, "a": a, "b": b}
    where = f"FROM layer_stat WHERE layer_id IN ({ids}) AND step BETWEEN :a AND :b{rk}"
    w = _width(a, b, max_points)
    col, nan = stat_sql(stat)
    if w == 1:
        pts: dict[int, list[dict[str, Any]]] = {lid: [] for lid in layer_ids}
        for lid, s, r, v, n in conn.execute(text(f"SELECT layer_id, step, rank, {col}, {nan} {where} "
                                                 "ORDER BY layer_id, step, rank"), p):
            pts[lid].append({"step": s, "rank": r, "value": enc_nan(v, bool(n))})
        return [{"downsampled": False, "points": pts[lid]} for lid in layer_ids]
    buckets: dict[int, list[dict[str, Any]]] = {lid: [] for lid in layer_ids}
    blocks = _blocks_apply(stat, w, use_blocks)
    if blocks:
        w = -(-w // BLOCK_STEPS) * BLOCK_STEPS  # whole blocks per bucket (at most max_points buckets)
        key0 = a // BLOCK_STEPS * BLOCK_STEPS
        merged = _combine(_block_parts(conn, layer_ids, stat, a, b, w, rank))
        for key in sorted(merged):
            smin, smax, mn, mx, sm, cnt, n, nn = merged[key]
            buckets[key[0]].append(_bucket(smin, smax, mn, mx, None if not cnt or sm is None else sm / cnt, n, nn))
            buckets[key[0]][-1]["_key"] = key
    else:
        key0 = a
        for r in conn.execute(text(
                f"SELECT layer_id, (step - :a) / :w AS bk, min(step), max(step), min({col}), max({col}), avg({col}), "
                f"count(*), sum({nan}) {where} GROUP BY layer_id, bk ORDER BY layer_id, bk"), {**p, "w": w}):
            buckets[r[0]].append(_bucket(*r[2:]))
            buckets[r[0]][-1]["_key"] = (r[0], r[1])
    pooled = _pooled(conn, layer_ids, a, b, w, key0, rank, blocks) if stat in POOLED_STATS else None
    for bs in buckets.values():
        for bkt in bs:
            key = bkt.pop("_key")
            if pooled is not None:
                bkt["pooled"] = pooled.get(key)
    return [{"downsampled": True, "bucket_width": w, "buckets": buckets[lid]} for lid in layer_ids]


#: Raw rows (layers × steps) a heatmap aggregates at most: a wider request is served from the
#: 64-step rollup blocks, whole blocks per bucket, even when ``max_points`` asked for narrower
#: buckets (500 layers × 10,000 steps at 1,000 buckets: 5M rows, 4.7 s on PostgreSQL; from the
#: blocks, 78k rows). A zoom into a narrower range gets raw rows again.
RAW_ROWS_BUDGET = 500_000


def heatmap(conn: Connection, layers: list[tuple[int, int, str]], stat: str, *, start: int | None,
            end: int | None, max_points: int, agg: str = "max", use_blocks: bool = True,
            max_cells: int | None = None) -> dict[str, Any]:
    """Many layers at once: a (layers × buckets) matrix of ``agg`` (max, min or mean) of ``stat``.

    Over more than :data:`RAW_ROWS_BUDGET` rows, buckets are whole rollup blocks (at least 64
    steps wide, so possibly fewer than ``max_points``). The buckets span the steps the layers hold
    within [start, end] (the matrix is allocated whole,
    so an empty stretch of the requested range would cost memory for nothing); more than
    ``max_cells`` values in all is refused (Invalid) before any is read."""
    if stat not in LAYER_STATS:
        raise Invalid(f"unknown stat {stat!r}; expected one of {list(LAYER_STATS)}")
    fn = {"max": "max", "min": "min", "mean": "avg"}.get(agg)
    if fn is None:
        raise Invalid(f"unknown agg {agg!r}; expected max, min or mean")
    out: dict[str, Any] = {"layers": [{"index": i, "name": n} for _, i, n in layers], "stat": stat, "agg": agg,
                           "steps": [], "values": [[] for _ in layers], "nan": [[] for _ in layers]}
    if not layers:
        return out
    ids = ",".join(str(int(lid)) for lid, _, _ in layers)
    where = f"FROM layer_stat WHERE layer_id IN ({ids})"
    rng = _range(conn, _probe(ids, ""), {}, start, end, clamp=True)
    if rng is None:
        return out
    w = _width(rng[0], rng[1], max_points)
    if w < BLOCK_STEPS and len(layers) * (rng[1] - rng[0] + 1) > RAW_ROWS_BUDGET:
        w = BLOCK_STEPS  # an overview of many rows: whole rollup blocks (fewer buckets than asked for)
    pos = {lid: k for k, (lid, _, _) in enumerate(layers)}
    blocks = _blocks_apply(stat, w, use_blocks)
    if blocks:
        w = -(-w // BLOCK_STEPS) * BLOCK_STEPS
        a0 = rng[0] // BLOCK_STEPS * BLOCK_STEPS
        nb = (rng[1] - a0) // w + 1
    else:
        nb = (rng[1] - rng[0]) // w + 1
    if max_cells is not None and len(layers) * nb > max_cells:
        raise Invalid(f"heatmap: {len(layers)} layers × {nb} buckets = {len(layers) * nb:,} values, more than "
                      f"the {max_cells:,} one response holds; ask for fewer layers, a smaller max_points or a "
                      "narrower start/end")
    if blocks:
        merged = _combine(_block_parts(conn, [lid for lid, _, _ in layers], stat, rng[0], rng[1], w, None))
        values_b: list[list[Any]] = [[None] * nb for _ in layers]
        nans_b: list[list[int]] = [[0] * nb for _ in layers]
        for (lid, bk), (_, _, mn, mx, sm, cnt, _, nn) in merged.items():
            v = mx if agg == "max" else mn if agg == "min" else _mean(mn, mx, None if not cnt or sm is None
                                                                      else sm / cnt)
            values_b[pos[lid]][bk] = "NaN" if v is None and nn else enc(v)
            nans_b[pos[lid]][bk] = nn
        out.update(steps=[max(rng[0], a0 + k * w) for k in range(nb)], bucket_width=w, values=values_b, nan=nans_b)
        return out
    col, nan = stat_sql(stat)
    rows = conn.execute(text(
        f"SELECT layer_id, (step - :a) / :w AS bk, {fn}({col}), sum({nan}), min({col}), max({col}) {where} "
        f"AND step BETWEEN :a AND :b GROUP BY layer_id, bk"), {"a": rng[0], "b": rng[1], "w": w}).all()
    values: list[list[Any]] = [[None] * nb for _ in layers]
    nans: list[list[int]] = [[0] * nb for _ in layers]
    for lid, bk, v, n, mn, mx in rows:
        k = pos[lid]
        if agg == "mean":
            v = _mean(mn, mx, v)
        values[k][bk] = "NaN" if v is None and n else enc(None if v is None else float(v))
        nans[k][bk] = int(n or 0)
    out.update(steps=[rng[0] + b * w for b in range(nb)], bucket_width=w, values=values, nan=nans)
    return out


def step_series(conn: Connection, run_id: str, fields: list[str], *, start: int | None, end: int | None,
                max_points: int | None, skipped: bool | None = None) -> dict[str, Any]:
    """Step-level fields (total norm, clip coefficient, loss scale...), raw or bucketed."""
    bad = [f for f in fields if f not in STEP_FIELDS]
    if bad:
        raise Invalid(f"unknown field(s) {bad}; expected some of {list(STEP_FIELDS)}")
    fields = fields or list(STEP_FIELDS)
    params: dict[str, Any] = {"r": run_id}
    where = "FROM step_record WHERE run_id = :r"
    if skipped is not None:
        where += " AND skipped = :sk"
        params["sk"] = skipped
    rng = _range(conn, where, params, start, end)
    if rng is None:
        return {"downsampled": False, "points": []}
    params.update(a=rng[0], b=rng[1])
    where += " AND step BETWEEN :a AND :b"
    w = _width(rng[0], rng[1], max_points)
    if w == 1:
        rows = conn.execute(text(f"SELECT step, rank, time, skipped, nan_mask, {', '.join(fields)} {where} "
                                 "ORDER BY step, rank"), params).all()
        bits = [1 << STEP_FLOAT_COLUMNS.index(f) for f in fields]
        pts = []
        for r in rows:
            p: dict[str, Any] = {"step": r[0], "rank": r[1], "time": r[2], "skipped": bool(r[3])}
            for f, bit, v in zip(fields, bits, r[5:]):
                p[f] = enc_nan(v, bool(r[4] & bit))
            pts.append(p)
        return {"downsampled": False, "points": pts}
    params["w"] = w
    cols = []
    for f in fields:
        nan = f"((nan_mask / {1 << STEP_FLOAT_COLUMNS.index(f)}) % 2)"
        cols += [f"min({f})", f"max({f})", f"avg({f})", f"sum({nan})"]
    rows = conn.execute(text(
        f"SELECT (step - :a) / :w AS bk, min(step), max(step), count(*), "
        f"sum(CASE WHEN skipped THEN 1 ELSE 0 END), {', '.join(cols)} {where} GROUP BY bk ORDER BY bk"),
        params).all()
    buckets = []
    for r in rows:
        b: dict[str, Any] = {"step_min": r[1], "step_max": r[2], "count": int(r[3]), "skipped": int(r[4] or 0)}
        for k, f in enumerate(fields):
            mn, mx, mean, n = r[5 + 4 * k: 9 + 4 * k]
            b[f] = {"min": enc(mn), "max": enc(mx), "mean": enc(_mean(mn, mx, mean)),
                    "nan": int(n or 0)}
        buckets.append(b)
    return {"downsampled": True, "bucket_width": w, "buckets": buckets}


def _value_series(conn: Connection, where: str, params: dict[str, Any], *, start: int | None, end: int | None,
                  max_points: int | None) -> dict[str, Any]:
    """A (value, is_nan) series of a long table (user scalars, transform values), raw or bucketed."""
    rng = _range(conn, where, params, start, end)
    if rng is None:
        return {"downsampled": False, "points": []}
    params = {**params, "a": rng[0], "b": rng[1]}
    where += " AND step BETWEEN :a AND :b"
    w = _width(rng[0], rng[1], max_points)
    nan = "(CASE WHEN is_nan THEN 1 ELSE 0 END)"
    if w == 1:
        rows = conn.execute(text(f"SELECT step, rank, value, is_nan {where} ORDER BY step, rank"), params).all()
        return {"downsampled": False, "points": [{"step": s, "rank": r, "value": enc_nan(v, bool(n))}
                                                 for s, r, v, n in rows]}
    params["w"] = w
    rows = conn.execute(text(
        f"SELECT (step - :a) / :w AS bk, min(step), max(step), min(value), max(value), avg(value), count(*), "
        f"sum({nan}) {where} GROUP BY bk ORDER BY bk"), params).all()
    return {"downsampled": True, "bucket_width": w, "buckets": [_bucket(*r[1:]) for r in rows]}


def scalar_series(conn: Connection, run_id: str, key: str, *, start: int | None, end: int | None,
                  max_points: int | None) -> dict[str, Any]:
    """One user scalar (``Watcher.log``) over a step range, raw or bucketed."""
    return _value_series(conn, "FROM scalar WHERE run_id = :r AND key = :k", {"r": run_id, "k": key},
                         start=start, end=end, max_points=max_points)


def transform_series(conn: Connection, run_id: str, transform: str, field: str, *, start: int | None,
                     end: int | None, max_points: int | None) -> dict[str, Any]:
    """One value a transform reported (``agent.spec.TRANSFORM_VALUES``), raw or bucketed like /steps."""
    return _value_series(conn, "FROM transform_value WHERE run_id = :r AND transform = :t AND field = :f",
                         {"r": run_id, "t": transform, "f": field}, start=start, end=end, max_points=max_points)


def transform_fields(conn: Connection, run_id: str) -> dict[str, list[str]]:
    """The transforms of a run and the scalar values each reported."""
    out: dict[str, list[str]] = {}
    for t, f in conn.execute(text("SELECT DISTINCT transform, field FROM transform_value WHERE run_id = :r "
                                  "ORDER BY transform, field"), {"r": run_id}):
        out.setdefault(t, []).append(f)
    return out


def scalar_keys(conn: Connection, run_id: str) -> list[str]:
    return list(conn.execute(text("SELECT DISTINCT key FROM scalar WHERE run_id = :r ORDER BY key"),
                             {"r": run_id}).scalars())


def list_events(conn: Connection, run_id: str, *, kinds: list[str], start: int | None, end: int | None,
                limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    where = "FROM event WHERE run_id = :r"
    params: dict[str, Any] = {"r": run_id, "lim": limit, "off": offset}
    if kinds:
        names = []
        for i, k in enumerate(kinds):
            params[f"k{i}"] = k
            names.append(f":k{i}")
        where += f" AND kind IN ({', '.join(names)})"
    if start is not None:
        where += " AND step >= :a"
        params["a"] = start
    if end is not None:
        where += " AND step <= :b"
        params["b"] = end
    count = conn.execute(text(f"SELECT count(*) {where}"), params).scalar_one()
    rows = conn.execute(text(f"SELECT id, kind, step, rank, time, data {where} ORDER BY step, id "
                             "LIMIT :lim OFFSET :off"), params).all()
    out = []
    for i, kind, step, rank, t, data in rows:
        if isinstance(data, str):  # SQLite text() results are not JSON-decoded
            data = json.loads(data)
        out.append({"id": i, "kind": kind, "step": step, "rank": rank, "time": t, "data": data or {}})
    return out, int(count)
