"""Series queries with server-side downsampling.

A range wider than ``max_points`` steps is cut into ``max_points`` buckets of equal step width;
each bucket reports min, max and mean (so a one-step spike stays visible as a bucket's max),
the row count and how many values were NaN (NaN is stored as NULL + a mask bit, so SQL min/max
ignore it and the count says it was there). Queries are plain SQL over the clustered key
(layer_id, step, rank), identical on SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Connection, text

from gradwatch.agent.spec import ROLLUP_STATS, SERIES_LAYER_STATS, Moments, merge_moments, std_of
from gradwatch.server.db.models import BLOCK_STEPS, COARSE_STEPS, ROLLUP_LEVELS, STEP_FLOAT_COLUMNS
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


def _unit(w: int) -> int:
    """Steps of the coarsest rollup level a bucket of ``w`` steps (``w`` >= 64) is built on."""
    return max(steps for steps, _ in ROLLUP_LEVELS if steps <= w)


def _aligned(w: int) -> int:
    """``w`` rounded up to whole blocks of its level (fewer buckets, never more)."""
    u = _unit(w)
    return -(-w // u) * u


def _segments(a: int, b: int, levels: tuple[tuple[int, str], ...], coarse_below: int | None = None
              ) -> list[tuple[int, str, int, int]]:
    """[a, b] cut into (steps per block, table, lo, hi): whole blocks of the coarsest level,
    what remains at either edge from the finer levels, the partial 64-step blocks at the very
    edges from the rows (steps 1, ``layer_stat``). Coarse blocks are taken only below
    ``coarse_below`` (the runs' watermark, :func:`coarse_watermark`; None: none at all)."""
    if a > b:
        return []
    if not levels:
        return [(1, "layer_stat", a, b)]
    size, table = levels[-1]
    first, last = -(-a // size) * size, (b + 1) // size * size - 1
    if size == COARSE_STEPS:
        last = min(last, -1 if coarse_below is None else coarse_below // size * size - 1)
    if first > last:
        return _segments(a, b, levels[:-1], coarse_below)
    return [*_segments(a, first - 1, levels[:-1], coarse_below), (size, table, first, last),
            *_segments(last + 1, b, levels[:-1], coarse_below)]


def coarse_watermark(conn: Connection, layer_ids: list[int], w: int) -> int | None:
    """Steps below which the coarse level holds the runs of ``layer_ids`` (``run.coarse_through``,
    the lowest of their runs'); None without a query where buckets of ``w`` steps read no coarse
    block anyway."""
    if w % COARSE_STEPS or not layer_ids:
        return None
    ids = ",".join(str(int(i)) for i in layer_ids)
    v = conn.execute(text(f"SELECT min(coarse_through) FROM run WHERE id IN (SELECT DISTINCT run_id FROM layer "
                          f"WHERE id IN ({ids}))")).scalar()
    return None if v is None else int(v)


def _levels(w: int) -> tuple[tuple[int, str], ...]:
    """The rollup levels whose blocks tile buckets of ``w`` steps."""
    return tuple(lv for lv in ROLLUP_LEVELS if w % lv[0] == 0)


def _parts_sql(layer_ids: list[int], stat: str, a: int, b: int, w: int, rank: int | None, coarse_below: int | None,
               cols: tuple[str, ...] = ("smin", "smax", "mn", "mx", "sm", "cnt", "n", "nan"), ordered: bool = True) -> str:
    """One statement: per (layer, bucket ``(step − :k0) // w``) the aggregates ``cols`` of
    ``stat`` over [a, b], whole blocks of each rollup level and the edge rows pooled in SQL
    (``UNION ALL`` of the segments, one ``GROUP BY``), ordered by layer and bucket if ``ordered``
    (sorting 78k heatmap cells cost PostgreSQL a third of the statement)."""
    ids = ",".join(str(int(i)) for i in layer_ids)
    rk = "" if rank is None else f" AND rank = {int(rank)}"
    col, nan = stat_sql(stat)
    subs = []
    for size, table, lo, hi in _segments(a, b, _levels(w), coarse_below):
        if size == 1:
            subs.append(f"SELECT layer_id, (step - :k0) / :w AS bk, step AS smin, step AS smax, {col} AS mn, {col} AS mx, "
                        f"{col} AS sm, CASE WHEN {col} IS NULL THEN 0 ELSE 1 END AS cnt, 1 AS n, {nan} AS nan "
                        f"FROM layer_stat WHERE layer_id IN ({ids}) AND step BETWEEN {lo} AND {hi}{rk}")
        else:
            subs.append(f"SELECT layer_id, (block * {size} - :k0) / :w AS bk, step_min AS smin, step_max AS smax, "
                        f"{stat}_min AS mn, {stat}_max AS mx, {stat}_sum AS sm, {stat}_cnt AS cnt, n, "
                        f"{stat}_nan AS nan FROM {table} WHERE layer_id IN ({ids}) "
                        f"AND block BETWEEN {lo // size} AND {hi // size}{rk}")
    agg = {"smin": "min(smin)", "smax": "max(smax)", "mn": "min(mn)", "mx": "max(mx)", "sm": "sum(sm)",
           "cnt": "sum(cnt)", "n": "sum(n)", "nan": "sum(nan)"}
    return (f"SELECT layer_id, bk, {', '.join(agg[c] for c in cols)} FROM ({' UNION ALL '.join(subs)}) p "
            f"GROUP BY layer_id, bk{' ORDER BY layer_id, bk' if ordered else ''}")


#: Statistics whose buckets also carry ``pooled``: the moments of all gradient elements of the
#: bucket's steps and ranks, as if concatenated (``docs/statistics.md``).
POOLED_STATS: tuple[str, ...] = ("mean", "var", "std")


def _pooled(conn: Connection, layer_ids: list[int], a: int, b: int, w: int, key0: int, rank: int | None,
            blocks: bool, coarse_below: int | None) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (layer, bucket ``(start − key0) // w``): Chan's merge (:func:`merge_moments`) over the
    pooled moments of the whole rollup blocks inside [a, b] (coarsest level first) and over the
    rows outside them. Rows with a non-finite mean or M2 are left out and counted in ``skipped``.
    One statement per segment (at most five)."""
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

    for size, table, lo, hi in _segments(a, b, _levels(w) if blocks else (), coarse_below):
        if size > 1:
            for lid, blk, n, mean, m2, skip in conn.execute(text(
                    f"SELECT layer_id, block, mom_n, mom_mean, mom_m2, mom_skip FROM {table} WHERE layer_id "
                    f"IN ({ids}) AND block BETWEEN :blo AND :bhi{rk} ORDER BY layer_id, block, rank"),
                    {**params, "blo": lo // size, "bhi": hi // size}):
                add((lid, (blk * size - key0) // w), n, mean, m2, skip)
            continue
        for lid, step, n, mean, m2 in conn.execute(text(
                f"SELECT layer_id, step, numel, mean, m2 FROM layer_stat WHERE layer_id IN ({ids}) AND step "
                f"BETWEEN {int(lo)} AND {int(hi)}{rk} ORDER BY layer_id, step, rank"), params):
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
    coarse = None
    if blocks:
        w = _aligned(w)  # whole blocks per bucket (at most max_points buckets)
        key0 = a // _unit(w) * _unit(w)
        coarse = coarse_watermark(conn, layer_ids, w)
        for lid, bk, smin, smax, mn, mx, sm, cnt, n, nn in conn.execute(
                text(_parts_sql(layer_ids, stat, a, b, w, rank, coarse)), {"k0": key0, "w": w}):
            buckets[lid].append(_bucket(smin, smax, mn, mx, None if not cnt or sm is None else sm / cnt, n, nn))
            buckets[lid][-1]["_key"] = (lid, bk)
    else:
        key0 = a
        for r in conn.execute(text(
                f"SELECT layer_id, (step - :a) / :w AS bk, min(step), max(step), min({col}), max({col}), avg({col}), "
                f"count(*), sum({nan}) {where} GROUP BY layer_id, bk ORDER BY layer_id, bk"), {**p, "w": w}):
            buckets[r[0]].append(_bucket(*r[2:]))
            buckets[r[0]][-1]["_key"] = (r[0], r[1])
    pooled = _pooled(conn, layer_ids, a, b, w, key0, rank, blocks, coarse) if stat in POOLED_STATS else None
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
#: 64-step blocks a heatmap reads at most: a wider request is served from the coarse level
#: (1,024-step blocks; 500 layers × 100,000 steps: ~49k coarse rows instead of ~780k blocks).
BLOCK_ROWS_BUDGET = 100_000


def heatmap_width(n_layers: int, a: int, b: int, max_points: int) -> int:
    """Bucket width of a heatmap of ``n_layers`` over [a, b]: ``max_points`` buckets, widened to
    whole 64-step blocks over more than :data:`RAW_ROWS_BUDGET` rows and to whole coarse blocks
    over more than :data:`BLOCK_ROWS_BUDGET` blocks."""
    w = _width(a, b, max_points)
    rows = n_layers * (b - a + 1)
    if w < BLOCK_STEPS and rows > RAW_ROWS_BUDGET:
        w = BLOCK_STEPS
    if w < COARSE_STEPS and rows // BLOCK_STEPS > BLOCK_ROWS_BUDGET:
        w = COARSE_STEPS
    return w


def heatmap(conn: Connection, layers: list[tuple[int, int, str]], stat: str, *, start: int | None,
            end: int | None, max_points: int, agg: str = "max", use_blocks: bool = True,
            max_cells: int | None = None) -> dict[str, Any]:
    """Many layers at once: a (layers × buckets) matrix of ``agg`` (max, min or mean) of ``stat``.

    Buckets may be wider than ``max_points`` asks for (:func:`heatmap_width`): whole rollup
    blocks of the coarsest level that keeps the read small. The buckets span the steps the
    layers hold within [start, end] (the matrix is allocated whole, so an empty stretch of the
    requested range would cost memory for nothing); more than ``max_cells`` values in all is
    refused (Invalid) before any is read. One statement returns the finished cells (blocks of
    every level and the edge rows aggregated together in SQL), after one range probe."""
    if stat not in LAYER_STATS:
        raise Invalid(f"unknown stat {stat!r}; expected one of {list(LAYER_STATS)}")
    if agg not in ("max", "min", "mean"):
        raise Invalid(f"unknown agg {agg!r}; expected max, min or mean")
    out: dict[str, Any] = {"layers": [{"index": i, "name": n} for _, i, n in layers], "stat": stat, "agg": agg,
                           "steps": [], "values": [[] for _ in layers], "nan": [[] for _ in layers]}
    if not layers:
        return out
    ids = ",".join(str(int(lid)) for lid, _, _ in layers)
    rng = _range(conn, _probe(ids, ""), {}, start, end, clamp=True)
    if rng is None:
        return out
    a, b = rng
    w = heatmap_width(len(layers), a, b, max_points)
    pos = {lid: k for k, (lid, _, _) in enumerate(layers)}
    blocks = _blocks_apply(stat, w, use_blocks)
    if blocks:
        w = _aligned(w)
        key0 = a // _unit(w) * _unit(w)
    else:
        key0 = a
    nb = (b - key0) // w + 1
    if max_cells is not None and len(layers) * nb > max_cells:
        raise Invalid(f"heatmap: {len(layers)} layers × {nb} buckets = {len(layers) * nb:,} values, more than "
                      f"the {max_cells:,} one response holds; ask for fewer layers, a smaller max_points or a "
                      "narrower start/end")
    cols = ("mn", "mx", "sm", "cnt", "nan") if agg == "mean" else ("mx" if agg == "max" else "mn", "nan")
    params = {"k0": key0, "w": w}
    if blocks:
        lids = [lid for lid, _, _ in layers]
        sql = _parts_sql(lids, stat, a, b, w, None, coarse_watermark(conn, lids, w), cols, ordered=False)
    else:
        col, nan = stat_sql(stat)
        fn = {"max": f"max({col})", "min": f"min({col})"}.get(agg, f"min({col}), max({col}), sum({col}), count({col})")
        sql = (f"SELECT layer_id, (step - :k0) / :w AS bk, {fn}, sum({nan}) FROM layer_stat WHERE layer_id "
               f"IN ({ids}) AND step BETWEEN :a AND :b GROUP BY layer_id, bk")
        params.update(a=a, b=b)
    values: list[list[Any]] = [[None] * nb for _ in layers]
    nans: list[list[int]] = [[0] * nb for _ in layers]
    for r in conn.execute(text(sql), params):
        k, bk = pos[r[0]], r[1]
        if agg == "mean":
            _, _, mn, mx, sm, cnt, n = r
            v = _mean(mn, mx, None if not cnt or sm is None else sm / cnt)
        else:
            _, _, v, n = r
        values[k][bk] = "NaN" if v is None and n else enc(None if v is None else float(v))
        nans[k][bk] = int(n or 0)
    out.update(steps=[max(a, key0 + k * w) for k in range(nb)], bucket_width=w, values=values, nan=nans)
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

