"""Storing one wire batch: one bulk insert per table, inside the caller's transaction.

The layer-stat rows (hundreds per step) bypass SQLAlchemy's executemany and go through the raw
driver in the same transaction: ``sqlite3.executemany`` or psycopg binary ``COPY``, which is
1.6-5x faster (``docs/storage.md``). Rows are built column-wise with ``zip`` from the wire's
columnar layout. Idempotency: ``ingest_batch`` is keyed on (run, source, seq); a batch seen
before changes nothing. The per-(run, source) ``ingest_cursor`` row is locked first, so batches
of one source are serialised and the contiguous ``acked`` value is always right.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import numpy as np
from sqlalchemy import Connection, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from gradwatch.agent.spec import DERIVED_LAYER_FIELDS, ROLLUP_COUNTS, ROLLUP_STATS
from gradwatch.agent.wire import Batch
from gradwatch.server.db.models import (
    BLOCK_STEPS,
    COARSE_FACTOR,
    COARSE_STEPS,
    LAYER_FLOAT_COLUMNS,
    LAYER_STAT_COLUMNS,
    STEP_FLOAT_COLUMNS,
    Event,
    IngestCursor,
    Layer,
    Run,
    Scalar,
    TransformValue,
)
from gradwatch.server.db.raw import run_raw as _raw
from gradwatch.server.db.raw import run_raw_all as _raw_all
from gradwatch.server.detect import store as detect_store
from gradwatch.server.encoding import enc_value
from gradwatch.server.errors import Conflict
from gradwatch.server.repo.events import agent_event_fields
from gradwatch.server.repo.frame import PG_TYPES, BlockColumns, LayerFrame, pg_binary_array
from gradwatch.server.repo.runs import record_lost

#: Channel for cross-process live notifications on PostgreSQL.
NOTIFY_CHANNEL = "gradwatch_ingest"

_LAYER_STAT_COLUMNS = LAYER_STAT_COLUMNS
_PG_TYPES = PG_TYPES
_DERIVED = {d.name: d for d in DERIVED_LAYER_FIELDS}


def stat_sql(stat: str) -> tuple[str, str]:
    """(value expression, NaN-flag expression) of a per-layer statistic over ``layer_stat`` rows:
    a stored column, or a derived one computed from them (NaN where its input was NaN)."""
    d = _DERIVED.get(stat)
    col = stat if d is None else d.sql
    bit = LAYER_FLOAT_COLUMNS.index(stat if d is None else d.nan_from) if (d or stat in LAYER_FLOAT_COLUMNS) else None
    return col, "0" if bit is None else f"((nan_mask / {1 << bit}) % 2)"
_SQLITE_INSERT = (f"INSERT INTO layer_stat ({', '.join(_LAYER_STAT_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(_LAYER_STAT_COLUMNS))}) ON CONFLICT DO NOTHING")
_PG_COPY = f"COPY layer_stat ({', '.join(_LAYER_STAT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"


#: A ``layer_stat`` row whose moments enter the pooled block moments (finite mean and m2).
_FINITE = "(mean IS NOT NULL AND m2 IS NOT NULL AND mean BETWEEN -1.7e308 AND 1.7e308 AND m2 <= 1.7e308)"
_POOLED_COLS = ["mom_n", "mom_mean", "mom_m2", "mom_skip"]


def _recompute_sql(target: str, source: str, key: str, where: str, sel: list[str],
                   mean_of: tuple[str, str, str]) -> str:
    """Recompute rollup rows of ``target`` grouped by (layer_id, ``key``, rank) over ``source``
    rows matching ``where``, upserted. ``sel`` is every column after the key but ``mom_mean``
    (which is ``max(g.mu)``); ``mean_of`` is (n·mean, n, condition) of the source rows that
    enter the pooled moments: two passes around each group's weighted mean ``g.mu``, the n-way
    form of Chan's merge."""
    cols = ["layer_id", "block", "rank", "step_min", "step_max", "n", *_POOLED_COLS]
    for st in ROLLUP_STATS:
        cols += [f"{st}_{agg}" for agg in ("min", "max", "sum", "cnt", "nan")]
    sel = ["layer_id", key, "rank", *sel[:4], "max(g.mu)", *sel[4:]]
    means = (f"SELECT layer_id AS g_lid, {key} AS g_blk, rank AS g_rank, sum({mean_of[0]}) / "
             f"CAST(sum({mean_of[1]}) AS DOUBLE PRECISION) AS mu FROM {source} {where} AND {mean_of[2]} "
             f"GROUP BY layer_id, {key}, rank")
    update = ", ".join(f"{c} = excluded.{c}" for c in cols[3:])
    return (f"INSERT INTO {target} ({', '.join(cols)}) SELECT {', '.join(sel)} FROM {source} "
            f"LEFT JOIN ({means}) g ON g.g_lid = layer_id AND g.g_blk = {key} AND g.g_rank = rank "
            f"{where} GROUP BY layer_id, {key}, rank "
            f"ON CONFLICT (layer_id, block, rank) DO UPDATE SET {update}")


def _rollup_sql() -> str:
    """Recompute 64-step blocks from stored rows."""
    sel = ["min(step)", "max(step)", "count(*)", f"sum(CASE WHEN {_FINITE} THEN numel ELSE 0 END)",
           f"CASE WHEN max(g.mu) IS NULL THEN NULL ELSE sum(CASE WHEN {_FINITE} THEN m2 + numel * (mean - g.mu) * "
           "(mean - g.mu) ELSE 0.0 END) END", f"sum(CASE WHEN {_FINITE} THEN 0 ELSE 1 END)"]
    for st in ROLLUP_STATS:
        v, nan = stat_sql(st)
        sel += [f"min({v})", f"max({v})", f"sum({v})", f"count({v})", f"sum({nan})"]
    return _recompute_sql("layer_stat_block", "layer_stat", f"step / {BLOCK_STEPS}",
                          "WHERE layer_id IN ({ids}) AND step BETWEEN :lo AND :hi", sel,
                          ("numel * mean", "numel", f"{_FINITE} AND numel > 0"))


_ROLLUP = _rollup_sql()
_BLOCK_COLS = ["layer_id", "block", "rank", "step_min", "step_max", "n", *_POOLED_COLS] + [
    f"{st}_{agg}" for st in ROLLUP_STATS for agg in ("min", "max", "sum", "cnt", "nan")]


def _pooled_merge_sql(t: str) -> list[str]:
    """Chan's pairwise merge (:func:`gradwatch.agent.spec.merge_moments`) of a block's stored
    pooled moments with a batch's, as SET clauses (one dialect-neutral form)."""
    a_n, b_n = f"{t}.mom_n", "excluded.mom_n"
    delta = f"(excluded.mom_mean - {t}.mom_mean)"
    frac = f"(CAST({b_n} AS DOUBLE PRECISION) / ({a_n} + {b_n}))"
    w = f"(CAST({a_n} AS DOUBLE PRECISION) * {b_n} / ({a_n} + {b_n}))"

    def pick(merged: str, col: str) -> str:
        return (f"CASE WHEN {b_n} = 0 THEN {t}.{col} WHEN {a_n} = 0 THEN excluded.{col} ELSE {merged} END")

    return [f"mom_mean = {pick(f'{t}.mom_mean + {delta} * {frac}', 'mom_mean')}",
            f"mom_m2 = {pick(f'{t}.mom_m2 + excluded.mom_m2 + {delta} * {delta} * {w}', 'mom_m2')}",
            f"mom_n = {a_n} + {b_n}", f"mom_skip = {t}.mom_skip + excluded.mom_skip"]


def _merge_sql(pg: bool, t: str = "layer_stat_block") -> str:
    """Upsert of batch-local block aggregates into the rollup table ``t``, merged with what the
    block already holds."""
    lo, hi = ("LEAST", "GREATEST") if pg else ("min", "max")  # SQLite's 2-arg min/max return NULL on NULL

    def nn(fn: str, c: str) -> str:
        if pg:  # PostgreSQL's LEAST/GREATEST skip NULLs already (NULL only when both are)
            return f"{fn}({t}.{c}, excluded.{c})"
        return f"coalesce({fn}({t}.{c}, excluded.{c}), {t}.{c}, excluded.{c})"

    sets = [f"step_min = {lo}({t}.step_min, excluded.step_min)", f"step_max = {hi}({t}.step_max, excluded.step_max)",
            f"n = {t}.n + excluded.n", *_pooled_merge_sql(t)]
    for st in ROLLUP_STATS:
        sets += [f"{st}_min = {nn(lo, st + '_min')}", f"{st}_max = {nn(hi, st + '_max')}",
                 f"{st}_sum = coalesce({t}.{st}_sum + excluded.{st}_sum, {t}.{st}_sum, excluded.{st}_sum)",
                 f"{st}_cnt = {t}.{st}_cnt + excluded.{st}_cnt", f"{st}_nan = {t}.{st}_nan + excluded.{st}_nan"]
    ph = "%s" if pg else "?"
    return (f"INSERT INTO {t} ({', '.join(_BLOCK_COLS)}) VALUES ({', '.join([ph] * len(_BLOCK_COLS))}) "
            f"ON CONFLICT (layer_id, block, rank) DO UPDATE SET {', '.join(sets)}")


_TABLES = ("layer_stat_block", "layer_stat_coarse")
_MERGE = {(pg, t): _merge_sql(pg, t) for pg in (True, False) for t in _TABLES}


_INT_BLOCK_COLS = frozenset(c for c in _BLOCK_COLS if c in ("layer_id", "block", "rank", "step_min", "step_max", "n",
                                                             "mom_n", "mom_skip") or c.endswith(("_cnt", "_nan")))
#: Columns a batch whose values are all exactly 0 writes as the expression 0: the integer ones and
#: the (float) min/max/sum of the counts (a healthy run has no non-finite element).
_ZERO_OK = _INT_BLOCK_COLS | {f"{st}_{agg}" for st in ROLLUP_COUNTS for agg in ("min", "max", "sum")}
#: How a rollup column's values reach the upsert: an array parameter, or (PostgreSQL) an expression.
_ARRAY, _SAME_AS_N, _ZERO, _NULL = "a", "n", "0", "-"


def _merge_unnest_sql(t: str, shape: tuple[str, ...] | None = None) -> str:
    """PostgreSQL: the same upsert as one statement over column arrays (one round trip per batch
    instead of one per block row, which dominated ingest time over TCP).

    ``shape`` (per column of ``_BLOCK_COLS``, default all arrays): a column whose batch values
    are all equal to ``n`` (a statistic's count where it was never NULL), all 0 or all NULL (a
    statistic not measured in these blocks) is written as that expression instead of an array:
    the stored values are the same, and the server decodes a third to half fewer array elements."""
    shape = shape or (_ARRAY,) * len(_BLOCK_COLS)
    head, tail = _MERGE[True, t].split(" VALUES ", 1)
    arrays, sel = [], []
    for k, (c, how) in enumerate(zip(_BLOCK_COLS, shape)):
        typ = "int8" if c in _INT_BLOCK_COLS else "float8"
        if how == _ARRAY:
            arrays.append(f"%b::{typ}[]")  # %b: binary parameters (no per-element text dumping)
        sel.append({_ARRAY: f"u.c{k}", _SAME_AS_N: "u.c5", _ZERO: "0", _NULL: f"NULL::{typ}"}[how])
    names = ", ".join(f"c{k}" for k, how in enumerate(shape) if how == _ARRAY)
    return (f"{head} SELECT {', '.join(sel)} FROM unnest({', '.join(arrays)}) AS u({names}) "
            f"{tail[tail.index('ON CONFLICT'):]}")


_MERGE_UNNEST: dict[tuple[str, tuple[str, ...]], str] = {}


def _merge_pg(t: str, cols: BlockColumns) -> tuple[str, list[_PgArray]]:
    """The upsert of ``cols`` into ``t`` and its array parameters (see :func:`_merge_unnest_sql`)."""
    n = cols.columns[5][0]
    shape = []
    for k, (c, (v, z)) in enumerate(zip(_BLOCK_COLS, cols.columns)):
        how = _ARRAY
        if k > 5:  # the key, step range and n are always arrays
            if z is not None and z.all():
                how = _NULL
            elif z is None and c in _ZERO_OK:
                if not v.any():
                    how = _ZERO
                elif c.endswith("_cnt") and np.array_equal(v, n):
                    how = _SAME_AS_N
        shape.append(how)
    key = (t, tuple(shape))
    sql = _MERGE_UNNEST.get(key)
    if sql is None:
        sql = _merge_unnest_sql(t, key[1])
        if len(_MERGE_UNNEST) < 256:  # a few shapes per kind of run in practice; bounded anyway
            _MERGE_UNNEST[key] = sql
    return sql, pg_arrays([c for c, how in zip(cols.columns, shape) if how == _ARRAY])


def _coarse_rollup_sql() -> str:
    """Recompute coarse blocks from the 64-step blocks they hold (a batch moving its run's
    watermark, the overlap path, the migrations), as :meth:`BlockColumns.coarsen` merges them
    at ingest."""
    sel = ["min(step_min)", "max(step_max)", "sum(n)", "sum(mom_n)",
           "CASE WHEN max(g.mu) IS NULL THEN NULL ELSE sum(CASE WHEN mom_n > 0 THEN mom_m2 + mom_n * "
           "(mom_mean - g.mu) * (mom_mean - g.mu) ELSE 0.0 END) END", "sum(mom_skip)"]
    for st in ROLLUP_STATS:
        sel += [f"min({st}_min)", f"max({st}_max)", f"sum({st}_sum)", f"sum({st}_cnt)", f"sum({st}_nan)"]
    return _recompute_sql("layer_stat_coarse", "layer_stat_block", f"block / {COARSE_FACTOR}",
                          "WHERE layer_id IN ({ids}) AND block BETWEEN :lo AND :hi", sel,
                          ("mom_n * mom_mean", "mom_n", "mom_n > 0"))


_COARSE_ROLLUP = _coarse_rollup_sql()
_COARSE_ROLLUP_Q = _COARSE_ROLLUP.replace(":lo", "?").replace(":hi", "?")


class _PgArray(bytes):
    """A parameter already in PostgreSQL's binary array format (see ``frame.pg_binary_array``)."""

    oid = 0


class _Int8Array(_PgArray):
    oid = 1016


class _Float8Array(_PgArray):
    oid = 1022


_DUMPERS: list[tuple[type, type]] = []


def _register_dumpers(cur: Any) -> None:
    """Make ``cur`` (a cursor, or a connection and the cursors it opens next) pass
    :class:`_PgArray` parameters through untouched (binary int8[]/float8[])."""
    if not _DUMPERS:
        from psycopg.adapt import Dumper
        from psycopg.pq import Format

        for array_cls in (_Int8Array, _Float8Array):
            _DUMPERS.append((array_cls, type(f"{array_cls.__name__}Dumper", (Dumper,), {
                "format": Format.BINARY, "oid": array_cls.oid, "dump": lambda self, obj: obj})))
    for cls, dumper in _DUMPERS:
        cur.adapters.register_dumper(cls, dumper)


def pg_arrays(columns: list[tuple[np.ndarray, np.ndarray | None]]) -> list[_PgArray]:
    """``columns`` ((values, NULL mask or None) each) as binary int8[]/float8[] parameters (needs
    no connection: built before the write transaction)."""
    return [(_Int8Array if c.dtype.kind == "i" else _Float8Array)(pg_binary_array(c, z)) for c, z in columns]


def pg_array_params(cur: Any, columns: list[tuple[np.ndarray, np.ndarray | None]]) -> list[_PgArray]:
    """``columns`` as binary array parameters for ``cur``, whose dumpers pass them through."""
    _register_dumpers(cur)
    return pg_arrays(columns)


#: The rollup upserts of one batch, finest level first: (statement, parameters) each; PostgreSQL:
#: one statement's binary array parameters; SQLite: ``executemany`` rows.
MergeArgs = list[tuple[str, Any]]


def merge_args(blocks: BlockColumns, pg: bool, table: str = "layer_stat_block") -> MergeArgs:
    """The arguments of :func:`_merge_blocks` for a batch's 64-step blocks (or, ``table``
    ``layer_stat_coarse``, the coarse blocks made of them), in the form the database takes. Pure
    numpy and Python, so the websocket path builds them in a worker thread before the write
    transaction (they are written last in it, under the rollup rows' locks that batches of a
    run wait for). The coarse level is not in them: see :func:`_coarse_work`."""
    if not len(blocks):
        return []
    return [_merge_pg(table, blocks) if pg else (_MERGE[False, table], blocks.rows())]


def _run_merges(conn: Connection, args: MergeArgs) -> None:
    """SQLite: the rollup upserts of ``args`` (``executemany`` rows each)."""
    raw: Any = conn.connection.driver_connection
    cur = raw.cursor()
    try:
        for sql, rows in args:
            cur.executemany(sql, rows)
    finally:
        cur.close()


def _merge_blocks(conn: Connection, args: MergeArgs, then: Sequence[tuple[str, tuple[Any, ...]]] = ()
                  ) -> list[list[tuple[Any, ...]]]:
    """Merge a batch's rollup blocks (``args``, :func:`merge_args`); then run ``then``
    (``?``-placeholder statements) and return their rows. PostgreSQL: all in one round trip
    (pipeline mode), which shortens the part of the transaction that holds rows other batches
    wait for."""
    if conn.dialect.name == "postgresql":
        if args:  # (on the connection: the pipeline's cursors pass the arrays through)
            _register_dumpers(conn.connection.driver_connection)
        return _raw_all(conn, list(then), driver_first=args)
    _run_merges(conn, args)
    return _raw_all(conn, list(then))


def _update_blocks(conn: Connection, layer_ids: set[int], step_min: int, step_max: int) -> None:
    """Recompute the touched 64-step blocks from the stored rows (the overlap path: exact
    whatever was there); the coarse blocks holding them follow in :func:`_coarse_work`."""
    if not layer_ids:
        return
    ids = ",".join(str(int(i)) for i in sorted(layer_ids))
    conn.execute(text(_ROLLUP.replace("{ids}", ids)), {"lo": step_min // BLOCK_STEPS * BLOCK_STEPS,
                                                       "hi": step_max // BLOCK_STEPS * BLOCK_STEPS + BLOCK_STEPS - 1})


#: The run row, locked (the first statement of a batch's tail to touch it), and the coarse
#: level's watermark it holds. The lock the UPDATE after it takes anyway: FOR UPDATE would also
#: wait for the key-share locks every batch's foreign keys hold on the run row until commit
#: (two batches of a run would deadlock).
_WATERMARK = {True: "SELECT coarse_through FROM run WHERE id = ? FOR NO KEY UPDATE",
              False: "SELECT coarse_through FROM run WHERE id = ?"}


def _coarse_recompute(layer_ids: Sequence[int], lo: int, hi: int) -> tuple[str, tuple[Any, ...]]:
    """The statement that recomputes the coarse blocks over steps [lo, hi] (whole coarse blocks)
    of ``layer_ids`` from their 64-step blocks, replacing what they held. (The ids are written
    out: with ``layer_id IN (SELECT id FROM layer WHERE run_id = ...)`` PostgreSQL planned a
    join that read the whole rollup table, 600 ms instead of 16 ms at 500k rows.)"""
    ids = ",".join(str(int(i)) for i in sorted(layer_ids))
    return _COARSE_ROLLUP_Q.replace("{ids}", ids), (lo // BLOCK_STEPS, hi // BLOCK_STEPS) * _COARSE_ROLLUP.count(":lo")


def _coarse_work(frame: LayerFrame, merged: bool, old: int, new: int, run_layers: Sequence[int], pg: bool
                 ) -> tuple[MergeArgs, list[tuple[str, tuple[Any, ...]]]]:
    """What a stored batch owes the coarse level, under its run row's lock, given the run's
    watermark before (``old``) and after (``new``) it: (merges, recomputes).

    Coarse blocks exist below the watermark only, exact (``docs/storage.md``). The batch's rows
    below ``old`` are merged into them (a late batch, a lagging rank); ``merged`` False (the
    overlap path, whose 64-step blocks were recomputed) recomputes the coarse blocks holding its
    rows instead. Moving the watermark from ``old`` to ``new`` computes the coarse blocks between
    from the 64-step blocks, all of the run's layers (``run_layers``, read under the lock, not
    before it: a layer another batch created meanwhile is one of them): every batch committed before
    this one is in them, and every batch after it sees ``new`` and merges what it holds below.
    The two step ranges are disjoint, so the order of the statements does not matter."""
    merges: MergeArgs = []
    recompute: list[tuple[str, tuple[Any, ...]]] = []
    if len(frame) and int(frame.step.min()) < old:
        if merged:
            below = frame.subset(frame.step < old)
            merges = merge_args(below.blocks().coarsen(COARSE_FACTOR), pg, "layer_stat_coarse")
        else:
            lo = int(frame.step.min()) // COARSE_STEPS * COARSE_STEPS
            hi = min(int(frame.step.max()) // COARSE_STEPS * COARSE_STEPS + COARSE_STEPS, old) - 1
            recompute.append(_coarse_recompute(np.unique(frame.layer_id).tolist(), lo, hi))
    if new > old and run_layers:
        recompute.append(_coarse_recompute(run_layers, old, new - 1))
    return merges, recompute


@dataclass(frozen=True, slots=True)
class IngestResult:
    run_id: str
    source: int
    seq: int
    acked: int
    duplicate: bool
    rows: int
    step_min: int | None = None
    step_max: int | None = None
    #: the run's layer mapping as this write left it (:class:`KnownLayers`, once committed)
    layers: dict[int, tuple[int, str]] | None = dc_field(default=None, compare=False)


def remember_layers(db: str, res: IngestResult) -> None:
    """Once the batch's transaction has committed: its run's layers become this process's hint
    (``db``: the database URL). Not before: a hint for layers still uncommitted would let the
    next batch of the run be written beside the one creating them, and wait on, then fail
    against, their unique key."""
    if res.layers is not None:
        KNOWN_LAYERS.put(db, res.run_id, res.layers)


def _dialect_insert(conn: Connection, table: Any) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def ensure_run(conn: Connection, batch: Batch, now: float) -> None:
    """Create the run the batch names if it does not exist; 409 if it exists in another project."""
    r = batch.run
    found = _raw(conn, "SELECT project FROM run WHERE id = ?", (r.run_id,))
    project = found[0][0] if found else None
    if project is None:
        stmt = _dialect_insert(conn, Run).values(
            id=r.run_id, project=r.project, name=r.name, status="running", config=enc_value(r.config),
            tags=list(r.tags), world_size=r.world_size, started_at=r.started_at, created_at=now, updated_at=now,
        ).on_conflict_do_nothing().returning(Run.project)
        if conn.execute(stmt).first() is not None:  # (rowcount is unreliable for ON CONFLICT on psycopg)
            return
        project = conn.execute(select(Run.project).where(Run.id == r.run_id)).scalar_one()  # a concurrent insert
    if project != r.project:
        raise Conflict(f"run {r.run_id} belongs to project {project!r}, the batch says {r.project!r}")


_LOCK_CURSOR = ("INSERT INTO ingest_cursor (run_id, source, acked) VALUES (?, ?, 0) ON CONFLICT "
                "(run_id, source) DO UPDATE SET acked = ingest_cursor.acked RETURNING acked")
#: Stored seqs after ``acked`` read a page at a time.
_SEQ_PAGE = 1000
_NEXT_SEQS = (f"SELECT seq FROM ingest_batch WHERE run_id = ? AND source = ? AND seq > ? ORDER BY seq LIMIT {_SEQ_PAGE}")
#: The same after the cursor's own ``acked`` (read in the statement after the one that locks it).
_NEXT_SEQS_LOCKED = _NEXT_SEQS.replace("seq > ?", "seq > (SELECT acked FROM ingest_cursor WHERE run_id = ? AND "
                                                  "source = ?)")


def _lock_cursor(conn: Connection, run_id: str, source: int, before: Sequence[tuple[str, tuple[Any, ...]]] = (),
                 merges: MergeArgs | None = None) -> tuple[int, list[int] | None]:
    """Create-or-lock the (run, source) cursor row, after running ``merges`` (rollup upserts,
    :func:`merge_args`) and ``before`` (statements whose rows are not needed), in the same round
    trip; returns ``acked`` and, on PostgreSQL, the first page of stored seqs after it (None: not
    read).

    ``ON CONFLICT DO UPDATE`` takes the row lock on PostgreSQL, which serialises concurrent
    batches of one source until commit (SQLite has a single writer anyway). There the seqs are
    read by the next statement in the same round trip (pipeline mode): a statement of its own,
    so its snapshot is taken after the lock is granted and holds every seq committed before.
    """
    if conn.dialect.name != "postgresql":
        _merge_blocks(conn, merges or [], before)
        return int(_raw(conn, _LOCK_CURSOR, (run_id, source))[0][0]), None
    *_, lock, nxt = _merge_blocks(conn, merges or [], [*before, (_LOCK_CURSOR, (run_id, source)),
                                                       (_NEXT_SEQS_LOCKED, (run_id, source, run_id, source))])
    return int(lock[0][0]), [r[0] for r in nxt]


def _walk(acked: int, seqs: list[int]) -> tuple[int, bool]:
    """``acked`` moved over the contiguous ``seqs`` after it; and whether a full page was all
    contiguous (read on)."""
    for s in seqs:
        if s != acked + 1:
            return acked, False
        acked = s
    return acked, len(seqs) == _SEQ_PAGE


def _advance_cursor(conn: Connection, run_id: str, source: int, acked: int, seqs: list[int] | None = None) -> int:
    """``acked`` moved over every contiguous stored seq after it (``seqs``: the first page, if
    read already). Writes nothing: the caller updates the cursor row."""
    more = True
    if seqs is not None:
        acked, more = _walk(acked, seqs)
    while more:
        acked, more = _walk(acked, [r[0] for r in _raw(conn, _NEXT_SEQS, (run_id, source, acked))])
    return acked


def read_acked(conn: Connection, run_id: str, source: int) -> int:
    v = conn.execute(select(IngestCursor.acked).where(IngestCursor.run_id == run_id,
                                                      IngestCursor.source == source)).scalar_one_or_none()
    return int(v or 0)


_LAYERS_OF_RUN = "SELECT id, idx, name FROM layer WHERE run_id = ?"
_LAYER_IDS_OF_RUN = "SELECT id FROM layer WHERE run_id = ?"
_RECORD_BATCH = ("INSERT INTO ingest_batch (run_id, source, seq, received_at, rows, step_min, step_max) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq")
#: The same, written only if the run (``?``) exists in the project (``?``) the batch names.
_RECORD_BATCH_IF_RUN = _RECORD_BATCH.replace(" VALUES (?, ?, ?, ?, ?, ?, ?) ", " SELECT ?, ?, ?, ?, ?, ?, ? WHERE "
                                             "EXISTS (SELECT 1 FROM run WHERE id = ? AND project = ?) ")


class KnownLayers:
    """Per process: the layer mapping (``idx`` → ``layer.id``, name) of recently written runs,
    as their last write saw it. A hint for the work done before the write transaction (which
    then needs no read connection: a pool check-out, a query and a rollback per batch); the
    write re-reads the mapping and rebuilds what was prepared if it changed (a run deleted and
    recreated, possibly by another process)."""

    def __init__(self, size: int = 512) -> None:
        self._size = size
        self._runs: OrderedDict[tuple[str, str], dict[int, tuple[int, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, db: str, run_id: str) -> dict[int, tuple[int, str]] | None:
        with self._lock:
            return self._runs.get((db, run_id))

    def put(self, db: str, run_id: str, layers: dict[int, tuple[int, str]]) -> None:
        with self._lock:
            self._runs[db, run_id] = layers
            self._runs.move_to_end((db, run_id))
            while len(self._runs) > self._size:
                self._runs.popitem(last=False)


KNOWN_LAYERS = KnownLayers()


def _layer_ids(conn: Connection, batch: Batch, rows: list[tuple[Any, ...]] | None = None
               ) -> tuple[dict[int, int], dict[int, tuple[int, str]]]:
    """Map the batch's layer indices to ``layer.id``, creating or renaming layers as needed; and
    the run's whole mapping (``idx`` → id, name) as it stands after that.
    ``rows``: the run's layers (:data:`_LAYERS_OF_RUN`), if the caller read them already."""
    run_id = batch.run.run_id
    existing = {idx: (lid, name) for lid, idx, name in (rows if rows is not None else
                                                         _raw(conn, _LAYERS_OF_RUN, (run_id,)))}
    known = dict(existing)
    declared = {la.index: la for la in batch.layers}
    needed = set(declared)
    for s in batch.steps:
        needed.update(s.layer_ids)
    new = []
    for idx in sorted(needed - existing.keys()):
        la = declared.get(idx)
        new.append({"run_id": run_id, "idx": idx, "name": la.name if la else f"#{idx}",
                    "shape": list(la.shape) if la else None, "dtype": la.dtype if la else "",
                    "sparse": la.sparse if la else False})
    for idx, la in declared.items():
        if idx in existing and existing[idx][1] != la.name:
            conn.execute(update(Layer).where(Layer.id == existing[idx][0])
                         .values(name=la.name, shape=list(la.shape), dtype=la.dtype, sparse=la.sparse))
            known[idx] = (existing[idx][0], la.name)
    out = {idx: lid for idx, (lid, _) in existing.items()}
    if new:
        conn.execute(insert(Layer), new)
        names = {n["idx"]: n["name"] for n in new}
        for lid, idx in conn.execute(select(Layer.id, Layer.idx).where(Layer.run_id == run_id,
                                                                         Layer.idx.in_([n["idx"] for n in new]))):
            out[idx] = lid
            known[idx] = (lid, names[idx])
    return out, known


class RowsOverlap(Exception):
    """Binary COPY hit rows already stored by another batch; retry the batch with ``upsert=True``."""


def _insert_layer_rows(conn: Connection, frame: LayerFrame) -> bool:
    """Bulk insert through the raw driver; rows already stored (same layer, step, rank) are kept.

    First write wins, so an agent that restarts and resends overlapping steps under new seqs is
    not stuck behind a rejected batch. PostgreSQL: one binary COPY stream built in numpy piece
    by piece as it is sent (no conflict handling: a key violation raises RowsOverlap and the
    batch is retried with ``upsert=True``); SQLite: ``executemany`` over tuples made a chunk at a
    time. Either way the rows in flight cost a few MB, not a multiple of the batch. Returns
    whether every row was new.
    """
    raw: Any = conn.connection.driver_connection
    if conn.dialect.name == "postgresql":
        try:
            with raw.cursor() as cur, cur.copy(_PG_COPY) as cp:
                for piece in frame.copy_chunks():
                    cp.write(piece)
        except Exception as e:
            if _is_integrity_error(e):
                raise RowsOverlap(str(e)) from None
            raise
        return True
    cur = raw.cursor()
    try:
        cur.executemany(_SQLITE_INSERT, frame.rows())
        return bool(cur.rowcount == len(frame))
    finally:
        cur.close()


_PG_INSERT_RETURNING = (
    f"INSERT INTO layer_stat ({', '.join(_LAYER_STAT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"%b::{t}[]" for t in _PG_TYPES) + ") ON CONFLICT DO NOTHING RETURNING layer_id, step, rank")


def _insert_returning_pg(conn: Connection, frame: LayerFrame) -> np.ndarray:
    """Insert ``frame`` with ON CONFLICT DO NOTHING; a mask of the rows that were new.

    A key the batch itself holds twice (the wire allows two records of one step and rank) is
    inserted once, from its first row (the second conflicts with the first within the
    statement): only that first row is marked new, so the rollup counts it once."""
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cur:
        cur.execute(_PG_INSERT_RETURNING, pg_array_params(cur, frame.columns()))
        new = set(cur.fetchall())
    mask = np.zeros(len(frame), bool)
    for j, k in enumerate(zip(frame.layer_id.tolist(), frame.step.tolist(), frame.rank.tolist())):
        if k in new:
            mask[j] = True
            new.discard(k)
    return mask


def _insert_values(conn: Connection, stmt: Any, rows: list[dict[str, Any]], chunk: int = 500) -> None:
    """One multi-row VALUES statement per chunk (one round trip instead of one per row)."""
    for i in range(0, len(rows), chunk):
        conn.execute(stmt.values(rows[i:i + chunk]))


_STEP_COLUMNS = ("run_id", "step", "rank", "time", *STEP_FLOAT_COLUMNS, "skipped", "nan_mask", "transforms")


def _step_rows(batch: Batch, pg: bool) -> list[tuple[Any, ...]]:
    out = []
    run_id = batch.run.run_id
    for s in batch.steps:
        mask = 0
        vals = []
        for bit, name in enumerate(STEP_FLOAT_COLUMNS):
            v = getattr(s, name)
            if v is not None and v != v:
                mask |= 1 << bit
                v = None
            vals.append(v)
        tr = json.dumps(enc_value(s.transforms), separators=(",", ":")) if s.transforms else None
        out.append((run_id, s.step, s.rank, s.time, *vals, s.skipped if pg else int(s.skipped), mask, tr))
    return out


def _step_unnest_sql() -> str:
    """PostgreSQL: the step rows as one statement over column arrays (a dozen parameters however
    many steps: psycopg caches its conversion and the server its plan; a multi-row VALUES list
    had 13 parameters a step, re-parsed by the driver on every batch)."""
    types = {"step": "int8", "rank": "int8", "time": "float8", "skipped": "bool", "nan_mask": "int8",
             "transforms": "text", **{c: "float8" for c in STEP_FLOAT_COLUMNS}}
    cols = _STEP_COLUMNS[1:]
    sel = [f"u.{c}::json" if c == "transforms" else f"u.{c}" for c in cols]
    return (f"INSERT INTO step_record ({', '.join(_STEP_COLUMNS)}) SELECT %s, {', '.join(sel)} FROM unnest("
            f"{', '.join(f'%s::{types[c]}[]' for c in cols)}) AS u({', '.join(cols)}) ON CONFLICT DO NOTHING")


_STEP_UNNEST = _step_unnest_sql()
_STEP_KINDS = {"step": int, "rank": int, "nan_mask": int, "skipped": bool, "time": float,
               **{c: float for c in STEP_FLOAT_COLUMNS}}


def _array_list(column: str, values: tuple[Any, ...]) -> list[Any]:
    """One step column as a list psycopg dumps as one array (one Python type throughout: a record
    built in process may hold an int where a float goes)."""
    kind = _STEP_KINDS.get(column)
    return [v if (v is None or kind is None) else kind(v) for v in values]


def _insert_step_rows(conn: Connection, batch: Batch) -> None:
    """Step records through the raw driver too."""
    pg = conn.dialect.name == "postgresql"
    raw: Any = conn.connection.driver_connection
    rows = _step_rows(batch, pg)
    if not rows:
        return
    cur = raw.cursor()
    try:
        if pg:  # columns after run_id, in step order (a key twice: the first row is stored, as before)
            cur.execute(_STEP_UNNEST, [batch.run.run_id, *(_array_list(c, col) for c, col in
                                                            zip(_STEP_COLUMNS[1:], list(zip(*rows))[1:]))])
        else:
            cur.executemany(f"INSERT INTO step_record ({', '.join(_STEP_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(_STEP_COLUMNS))}) ON CONFLICT DO NOTHING", rows)
    finally:
        cur.close()


def scalar_reports(tr: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each transform's scalar values of one step (numbers; per-layer lists and integers too big
    for a float are left to the step record's JSON)."""
    out: dict[str, dict[str, float]] = {}
    for name, vals in tr.items():
        for field, v in vals.items():
            if type(v) is float or (type(v) is int and abs(v) < 2**1000):
                out.setdefault(name, {})[field] = float(v)
    return out


def _transform_rows(batch: Batch) -> list[dict[str, Any]]:
    """Rows of ``transform_value`` for the batch's steps."""
    run_id = batch.run.run_id
    return [{"run_id": run_id, "transform": name, "field": field, "step": s.step, "rank": s.rank,
             "value": None if v != v else v, "is_nan": v != v}
            for s in batch.steps for name, vals in scalar_reports(s.transforms).items() for field, v in vals.items()]


@dataclass(slots=True)
class Prepared:
    """A decoded batch with the work that needs no write transaction already done.

    The websocket handler prepares the next batches in worker threads while the current one is
    being written, so building columns, rollup aggregates and their statement parameters
    (:func:`merge_args`) overlaps the database's own work.
    (The COPY stream is not built here: it is as big as the frame again, and is cheaper to make
    piece by piece as it is sent.) ``ids`` is the layer mapping read before the transaction; the
    write re-reads it and rebuilds if it changed (a run deleted and recreated meanwhile).
    """

    batch: Batch
    ids: dict[int, int] | None = None
    frame: LayerFrame | None = None
    merge: MergeArgs | None = None

    @property
    def layers_known(self) -> bool:
        """Whether every layer of the batch existed already (no layer rows to create)."""
        return self.ids is not None


def _needed_layers(batch: Batch) -> set[int]:
    needed = {la.index for la in batch.layers}
    for s in batch.steps:
        needed.update(s.layer_ids)
    return needed


def prepare_batch(conn: Connection | None, batch: Batch) -> Prepared:
    """Do a batch's pre-transaction work; ``conn`` is a read connection (None: decode only)."""
    if conn is None or not batch.steps:
        return Prepared(batch)
    existing = {idx: (lid, name) for lid, idx, name in _raw(conn, _LAYERS_OF_RUN, (batch.run.run_id,))}
    return _prepared(batch, existing, conn.dialect.name == "postgresql") or Prepared(batch)


def prepare_known(db: str, batch: Batch, pg: bool) -> Prepared | None:
    """:func:`prepare_batch` from the layers this process last wrote for the run
    (:class:`KnownLayers`; ``db`` is the database URL), without a connection; None when they do
    not cover the batch (then ask the database)."""
    known = KNOWN_LAYERS.get(db, batch.run.run_id) if batch.steps else None
    return None if known is None else _prepared(batch, known, pg)


def _prepared(batch: Batch, existing: dict[int, tuple[int, str]], pg: bool) -> Prepared | None:
    if not _needed_layers(batch) <= existing.keys() or any(existing[la.index][1] != la.name for la in batch.layers):
        return None
    ids = {idx: lid for idx, (lid, _) in existing.items()}
    frame = LayerFrame.from_batch(batch, ids)
    return Prepared(batch, ids, frame, merge_args(frame.blocks(), pg))


def store_batch(conn: Connection, batch: Batch, now: float | None = None, origin: str = "",
                upsert: bool = False, prepared: Prepared | None = None, detect: bool = True) -> IngestResult:
    """Store ``batch`` in the caller's transaction; a batch stored before changes nothing.

    Locks are taken in one order by every writer (64-step rollup blocks by key, the run row,
    the detector state, coarse blocks, then the (run, source) cursor row last), so on PostgreSQL several batches of one stream can be in
    flight at once without deadlocks, and the cursor's ``acked`` stays exact: whoever takes
    the cursor last sees every seq committed before it.

    ``detect``: run the detectors over the batch's new steps (``server/detect/store.py``), in
    this transaction.

    Raises:
        Conflict: the run exists in another project.
        RowsOverlap: (PostgreSQL) some rows exist already; roll back and call again with ``upsert=True``.
    """
    now = time.time() if now is None else now
    run_id, source, seq = batch.run.run_id, batch.source, batch.seq
    steps = [s.step for s in batch.steps] + [e.step for e in batch.events] + [s.step for s in batch.scalars]
    step_min, step_max = (min(steps), max(steps)) if steps else (None, None)
    entry = (run_id, source, seq, now, batch.row_count, step_min, step_max)
    # the common case in one round trip: the run exists in the batch's project; record the batch
    # (only then) and read the run's layers
    found, recorded, layers = _raw_all(conn, [
        ("SELECT project FROM run WHERE id = ?", (run_id,)),
        (_RECORD_BATCH_IF_RUN, (*entry, run_id, batch.run.project)),
        (_LAYERS_OF_RUN, (run_id,))])
    if not found or found[0][0] != batch.run.project:  # a new run (or a conflict, which raises)
        ensure_run(conn, batch, now)
        if not recorded:  # (the run may have committed between the two statements: then it is recorded)
            recorded = _raw(conn, _RECORD_BATCH, entry)
    if not recorded:
        return IngestResult(run_id, source, seq, read_acked(conn, run_id, source), True, 0, step_min, step_max)

    pg = conn.dialect.name == "postgresql"
    ids, known = _layer_ids(conn, batch, layers if found else None)
    if prepared is not None and prepared.ids == ids and prepared.frame is not None:
        frame, prepared_merge = prepared.frame, prepared.merge
    else:
        frame, prepared_merge = LayerFrame.from_batch(batch, ids), None
    merge: MergeArgs | None = None
    merged = True  # the batch's new rows are merged into the rollup (not recomputed from the rows)
    if len(frame):
        if pg and upsert:
            # Merge only what this batch really added (exact, and safe beside concurrent writers,
            # unlike recomputing blocks from a snapshot of the rows).
            frame = frame.subset(_insert_returning_pg(conn, frame))
            merge = merge_args(frame.blocks(), pg) if len(frame) else None
        elif _insert_layer_rows(conn, frame):
            merge = prepared_merge if prepared_merge is not None else merge_args(frame.blocks(), pg)
        else:  # SQLite, some rows existed: recompute the touched blocks (one writer: no race)
            merged = False
            _update_blocks(conn, set(np.unique(frame.layer_id).tolist()), int(frame.step.min()),
                           int(frame.step.max()))
    if batch.steps:
        _insert_step_rows(conn, batch)
    scalars = [{"run_id": run_id, "key": k, "step": s.step, "rank": s.rank, "time": s.time,
                "value": None if (v is not None and v != v) else v, "is_nan": v is not None and v != v}
               for s in batch.scalars for k, v in s.values.items()]
    if scalars:
        _insert_values(conn, _dialect_insert(conn, Scalar).on_conflict_do_nothing(), scalars)
    tvals = _transform_rows(batch)
    if tvals:
        _insert_values(conn, _dialect_insert(conn, TransformValue).on_conflict_do_nothing(), tvals)
    if batch.events:
        _insert_values(conn, insert(Event), [{"run_id": run_id, "kind": e.kind, "step": e.step, "rank": e.rank,
                                              "time": e.time, "data": enc_value(e.data),
                                              **agent_event_fields(e.kind, e.data)} for e in batch.events])
    # Rows that other writers also update come last (blocks, run, coarse blocks, cursor, in that order): a
    # concurrent batch of the same stream waits only for this short tail.
    sets, params = ["updated_at = ?"], [now]
    if batch.status:
        sets.append("status = ?")
        params.append(batch.status)
    if step_max is not None:
        sets.append("last_step = CASE WHEN last_step IS NULL OR last_step < ? THEN ? ELSE last_step END")
        params += [step_max, step_max]
    mark = int(frame.step.max()) // COARSE_STEPS * COARSE_STEPS if len(frame) else 0
    if mark > 0:  # the coarse level's watermark moves to the coarse block holding the batch's last step
        sets.append("coarse_through = CASE WHEN coarse_through < ? THEN ? ELSE coarse_through END")
        params += [mark, mark]
    tail = [(_WATERMARK[pg], (run_id,)), (f"UPDATE run SET {', '.join(sets)} WHERE id = ?", (*params, run_id))]
    # the detector state is locked under the run row's lock, so batches of a run meet it in order
    detecting = detect and detect_store.detects(batch)
    if detecting:
        tail += detect_store.lock_statements(batch, now)
    locked = _merge_blocks(conn, merge or [], then=tail)
    old_mark = int(locked[0][0][0]) if locked[0] else 0
    new_mark = max(old_mark, mark)
    # the run's layers as they stand under its row's lock (a statement of its own, once per
    # 1,024 steps): the batch's own read of them came before the lock
    run_layers = [r[0] for r in _raw(conn, _LAYER_IDS_OF_RUN, (run_id,))] if new_mark > old_mark else []
    coarse, recompute = _coarse_work(frame, merged, old_mark, new_mark, run_layers, pg)
    save = detect_store.on_batch(conn, batch, frame, now, locked[2:]) if detecting else None
    if batch.lost:
        record_lost(conn, run_id, source, batch.lost)
    acked, seqs = _lock_cursor(conn, run_id, source, before=[*recompute, *([save] if save else [])], merges=coarse)
    last: list[tuple[str, tuple[Any, ...]]] = []
    if seq == acked + 1:
        moved = _advance_cursor(conn, run_id, source, acked, seqs)
        if moved != acked:
            last.append(("UPDATE ingest_cursor SET acked = ? WHERE run_id = ? AND source = ?", (moved, run_id, source)))
            acked = moved
    if pg:
        last.append(("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, json.dumps(
            {"origin": origin, "run_id": run_id, "source": source, "seq": seq, "ranks": _ranks(batch)}))))
    _raw_all(conn, last)
    return IngestResult(run_id, source, seq, acked, False, len(frame), step_min, step_max, known)


def _ranks(batch: Batch) -> list[int]:
    """The ranks a batch holds rows for (``source`` is not always the rank), for live readers."""
    ranks = {s.rank for s in batch.steps} | {e.rank for e in batch.events} | {s.rank for s in batch.scalars}
    return sorted(ranks)[:64]


def _is_integrity_error(e: BaseException) -> bool:
    """True for a key violation from SQLAlchemy, sqlite3 or psycopg (raw COPY is not wrapped)."""
    return isinstance(e, (IntegrityError, sqlite3.IntegrityError)) or any(
        c.__name__ == "IntegrityError" for c in type(e).__mro__)
