"""Streamed exports: rows come from a server-side cursor in chunks, never a whole run in memory.

CSV writes non-finite values as "NaN"/"Infinity"/"-Infinity" (the wire spelling); Parquet stores
real IEEE NaN/±inf doubles. Parquet row groups of :data:`ROW_GROUP` rows (whatever size of chunks
the database driver hands over: SQLite's are one row) are written to a spooled temporary file
(spills to disk past a few MiB) that is then streamed out. The per-layer columns are the spec's
(:mod:`gradwatch.agent.spec`): the stored fields, then the derived ``var`` and ``std``.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, text

from gradwatch.agent.spec import DERIVED_LAYER_FIELDS, LAYER_FIELDS
from gradwatch.server.db.models import LAYER_FLOAT_COLUMNS, STEP_FLOAT_COLUMNS
from gradwatch.server.encoding import enc

_NAN = float("nan")
#: Rows per Parquet row group.
ROW_GROUP = 50_000

_LAYER_OUT = [f.name for f in LAYER_FIELDS if "export" in f.expose] + [
    d.name for d in DERIVED_LAYER_FIELDS if "export" in d.expose]
_LAYER_SQL = [f"s.{f.name}" for f in LAYER_FIELDS if "export" in f.expose] + [
    "(" + d.sql.replace("numel", "s.numel").replace("m2", "s.m2") + ")" for d in DERIVED_LAYER_FIELDS
    if "export" in d.expose]
#: Output columns restored to NaN from ``nan_mask`` bits, per table: (column, bit).
_NAN_BITS: dict[str, list[tuple[str, int]]] = {
    "layer_stats": [(f, LAYER_FLOAT_COLUMNS.index(f)) for f in _LAYER_OUT if f in LAYER_FLOAT_COLUMNS] + [
        (d.name, LAYER_FLOAT_COLUMNS.index(d.nan_from)) for d in DERIVED_LAYER_FIELDS if d.name in _LAYER_OUT],
    "steps": [(f, b) for b, f in enumerate(STEP_FLOAT_COLUMNS)],
}

#: Position of ``skipped`` in a ``steps`` row (after step, rank, time and the float fields).
_SKIPPED_AT = 3 + len(STEP_FLOAT_COLUMNS)

TABLES: dict[str, tuple[str, list[str], list[str]]] = {
    # name: (SQL, output columns, float columns restored from nan_mask / is_nan)
    "layer_stats": (
        f"SELECT l.idx, l.name, s.step, s.rank, {', '.join(_LAYER_SQL)}, s.nan_mask FROM layer l "
        "JOIN layer_stat s ON s.layer_id = l.id WHERE l.run_id = :r ORDER BY l.idx, s.step, s.rank",
        ["layer", "layer_name", "step", "rank", *_LAYER_OUT],
        [f for f, _ in _NAN_BITS["layer_stats"]],
    ),
    "steps": (
        f"SELECT step, rank, time, {', '.join(STEP_FLOAT_COLUMNS)}, skipped, nan_mask "
        "FROM step_record WHERE run_id = :r ORDER BY step, rank",
        ["step", "rank", "time", *STEP_FLOAT_COLUMNS, "skipped"],
        list(STEP_FLOAT_COLUMNS),
    ),
    "scalars": (
        "SELECT step, rank, key, time, value, is_nan FROM scalar WHERE run_id = :r ORDER BY key, step, rank",
        ["step", "rank", "key", "time", "value"],
        ["value"],
    ),
    "transforms": (
        "SELECT step, rank, transform, field, value, is_nan FROM transform_value WHERE run_id = :r "
        "ORDER BY transform, field, step, rank",
        ["step", "rank", "transform", "field", "value"],
        ["value"],
    ),
    "events": (
        "SELECT id, step, rank, kind, time, data FROM event WHERE run_id = :r ORDER BY step, id",
        ["id", "step", "rank", "kind", "time", "data"],
        [],
    ),
}


def _rows(engine: Engine, table: str, run_id: str, chunk: int) -> Iterator[list[tuple[Any, ...]]]:
    """Chunks of output rows with NaN restored (a real float NaN)."""
    sql, cols, _ = TABLES[table]
    pos = [(cols.index(f), b) for f, b in _NAN_BITS.get(table, [])]
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(text(sql), {"r": run_id})
        for part in result.partitions():
            out = []
            for row in part:
                r = list(row)
                if table in ("scalars", "transforms"):
                    if r[5]:
                        r[4] = _NAN
                    del r[5:]
                elif table == "events":
                    if not isinstance(r[5], str):
                        r[5] = json.dumps(r[5] or {}, separators=(",", ":"))
                elif r[-1]:
                    mask = r[-1]
                    for p, bit in pos:
                        if mask & (1 << bit):
                            r[p] = _NAN
                    del r[-1]
                else:
                    del r[-1]
                if table == "steps":
                    r[_SKIPPED_AT] = bool(r[_SKIPPED_AT])
                out.append(tuple(r))
            yield out


def _fmt(v: Any) -> Any:
    return enc(v) if type(v) is float else v


def stream_csv(engine: Engine, table: str, run_id: str, chunk: int) -> Iterator[bytes]:
    cols = TABLES[table][1]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    yield buf.getvalue().encode()
    for part in _rows(engine, table, run_id, chunk):
        buf.seek(0)
        buf.truncate()
        w.writerows([[_fmt(v) for v in r] for r in part])
        yield buf.getvalue().encode()


def _schema(table: str) -> Any:
    import pyarrow as pa

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    kinds = {f.name: f.dtype for f in LAYER_FIELDS}
    types = {
        "layer_stats": [i64, s, i64, i64, *(i64 if kinds.get(c) == "i8" else f64 for c in _LAYER_OUT)],
        "steps": [i64, i64, f64, *(f64 for _ in STEP_FLOAT_COLUMNS), pa.bool_()],
        "scalars": [i64, i64, s, f64, f64],
        "transforms": [i64, i64, s, s, f64],
        "events": [i64, i64, i64, s, f64, s],
    }[table]
    return pa.schema(list(zip(TABLES[table][1], types)))


def stream_parquet(engine: Engine, table: str, run_id: str, chunk: int) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(table)

    def write(writer: Any, rows: list[tuple[Any, ...]]) -> None:
        cols = list(zip(*rows))
        writer.write_table(pa.Table.from_arrays([pa.array(c, type=t) for c, t in zip(cols, schema.types)],
                                                schema=schema), row_group_size=ROW_GROUP)

    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as f:
        with pq.ParquetWriter(f, schema) as writer:
            pending: list[tuple[Any, ...]] = []
            for part in _rows(engine, table, run_id, chunk):
                pending += part
                if len(pending) >= ROW_GROUP:
                    write(writer, pending[:ROW_GROUP])
                    del pending[:ROW_GROUP]
            if pending:
                write(writer, pending)
        f.seek(0)
        while True:
            block = f.read(1 << 20)
            if not block:
                return
            yield block
