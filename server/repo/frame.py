"""A batch's layer rows as columns (numpy), and the bulk forms the databases take.

Ingest is most of the server's work, and per-row Python (building tuples, finding NaN, folding
rollup aggregates) cost more than the database itself. Here a batch's per-layer columns become
one float64/int64 array per field, NaN and null are found with vector ops, the 64-step rollup
aggregates are segment reductions, and PostgreSQL gets its binary COPY stream assembled in
numpy: no Python object per value on that path. SQLite still needs one tuple per row
(``executemany`` is its only bulk path).

Storage semantics are those of the ``layer_stat`` table: NaN is stored as NULL with its bit set in
``nan_mask`` (bit k for ``LAYER_FLOAT_COLUMNS[k]``); a value that was not measured (``null`` on
the wire) is NULL with the bit clear; ±inf are stored as they are.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from gradwatch.agent.spec import DERIVED_LAYER_FIELDS, LAYER_FIELDS, ROLLUP_STATS
from gradwatch.agent.wire import Batch
from gradwatch.server.db.models import BLOCK_STEPS, LAYER_FLOAT_COLUMNS

_F8 = np.dtype("<f8")
_I8 = np.dtype("<i8")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
#: Integer per-layer fields of the spec, in spec order.
_INT_FIELDS = tuple(f.name for f in LAYER_FIELDS if not f.is_float)
#: Binary COPY types of the ``layer_stat`` columns, in table order (that of :meth:`LayerFrame.columns`).
_COPY_TYPES = (">i8", ">i8", ">i4", *(">f8" if f.is_float else ">i8" for f in LAYER_FIELDS), ">i4")
#: PostgreSQL array types of the same columns (the ``unnest`` insert path).
PG_TYPES = ["int8", "int8", "int4", *("float8" if f.is_float else "int8" for f in LAYER_FIELDS), "int4"]
_DERIVED = {d.name for d in DERIVED_LAYER_FIELDS}
#: Rows turned into Python tuples (SQLite) or COPY records (PostgreSQL) at a time: large enough
#: that the per-piece overhead vanishes, small enough that a piece is a few MB at most.
ROW_CHUNK = 16384


def _column(pieces: Sequence[Any], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate one field over the steps; returns (values, null mask or None).

    A piece is an ``array.array`` (a packed wire column: zero-copy view) or a list (a JSON
    column, which may hold None = not measured; NaN stands in for it in the values).
    """
    if pieces and all(type(p) is array for p in pieces):
        codes = {p.typecode for p in pieces}
        if len(codes) == 1:  # packed columns only (the agent's form): one copy, no per-step arrays
            raw = np.frombuffer(b"".join(pieces), dtype=np.float64 if codes == {"d"} else np.int64)
            return raw.astype(dtype, copy=False), None
    parts: list[np.ndarray] = []
    nulls: list[np.ndarray] | None = None
    for i, p in enumerate(pieces):
        if isinstance(p, array):
            parts.append(np.frombuffer(p, dtype=np.float64 if p.typecode == "d" else np.int64).astype(dtype, copy=False))
            if nulls is not None:
                nulls.append(np.zeros(len(p), bool))
            continue
        if None in p:
            if nulls is None:
                nulls = [np.zeros(len(q), bool) for q in pieces[:i]]
            fill = np.nan if dtype.kind == "f" else 0  # an integer column's NULLs are in the mask only
            if p.count(None) == len(p):  # not measured this step (a sampled signal): no per-value loop
                nulls.append(np.ones(len(p), bool))
                parts.append(np.full(len(p), fill, dtype=dtype))
                continue
            isnull = np.fromiter((v is None for v in p), bool, len(p))
            nulls.append(isnull)
            parts.append(np.array([fill if v is None else v for v in p], dtype=dtype))
        else:
            parts.append(np.array(p, dtype=dtype))
            if nulls is not None:
                nulls.append(np.zeros(len(p), bool))
    if not parts:
        return np.empty(0, dtype), None
    vals = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return vals, (None if nulls is None else np.concatenate(nulls))


def _field(s: Any, name: str) -> Any:
    """One step's column; a nullable field the record does not hold (built in process by code
    that predates it) is not measured: all NULL."""
    col = s.layers.get(name)
    return [None] * len(s.layer_ids) if col is None else col


@dataclass(slots=True)
class LayerFrame:
    """The layer rows of one batch, column-wise, in wire order (step by step)."""

    layer_id: np.ndarray  # int64, the layer table's ids
    step: np.ndarray  # int64
    rank: np.ndarray  # int64
    ints: list[np.ndarray]  # int64 per integer spec field (numel, nonfinite)
    floats: list[np.ndarray]  # float64 per LAYER_FLOAT_COLUMNS, NaN where stored NULL
    stored_null: list[np.ndarray | None]  # per float column: stored as NULL (NaN or not measured); None = none
    nan: list[np.ndarray | None]  # per float column: was NaN; None = none
    nan_mask: np.ndarray  # int64
    # per integer field: stored as NULL (not measured: a nullable count such as zeros); None = none
    int_null: list[np.ndarray | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.step)

    @classmethod
    def from_batch(cls, batch: Batch, ids: dict[int, int]) -> LayerFrame:
        steps = [s for s in batch.steps if s.layer_ids]
        counts = np.fromiter((len(s.layer_ids) for s in steps), np.int64, len(steps))
        n = int(counts.sum())
        idx = np.fromiter(chain.from_iterable(s.layer_ids for s in steps), np.int64, n)
        lut = np.zeros(max(ids) + 1 if ids else 1, np.int64)
        lut[np.fromiter(ids.keys(), np.int64, len(ids))] = np.fromiter(ids.values(), np.int64, len(ids))
        layer_id = lut[idx] if n else idx
        step = np.repeat(np.fromiter((s.step for s in steps), np.int64, len(steps)), counts)
        rank = np.repeat(np.fromiter((s.rank for s in steps), np.int64, len(steps)), counts)
        int_cols = [_column([_field(s, k) for s in steps], _I8) for k in _INT_FIELDS]
        ints = [v for v, _ in int_cols]
        floats: list[np.ndarray] = []
        stored_null: list[np.ndarray | None] = []
        nans: list[np.ndarray | None] = []
        nan_mask = np.zeros(n, np.int64)
        for bit, name in enumerate(LAYER_FLOAT_COLUMNS):
            vals, null = _column([_field(s, name) for s in steps], _F8)
            isnan = np.isnan(vals)
            if not isnan.any():
                floats.append(vals)
                stored_null.append(None)
                nans.append(None)
                continue
            nan = isnan if null is None else isnan & ~null
            floats.append(vals)
            stored_null.append(isnan)
            if nan.any():
                nans.append(nan)
                nan_mask |= nan.astype(np.int64) << bit
            else:
                nans.append(None)
        return cls(layer_id, step, rank, ints, floats, stored_null, nans, nan_mask, [z for _, z in int_cols])

    @property
    def numel(self) -> np.ndarray:
        return self.ints[_INT_FIELDS.index("numel")]

    def subset(self, keep: np.ndarray) -> LayerFrame:
        """The rows where ``keep`` is true."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return LayerFrame(self.layer_id[keep], self.step[keep], self.rank[keep], [v[keep] for v in self.ints],
                          [v[keep] for v in self.floats], [pick(z) for z in self.stored_null],
                          [pick(z) for z in self.nan], self.nan_mask[keep], [pick(z) for z in self.int_null])

    def columns(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(values, NULL mask or None) per ``layer_stat`` column, in table order."""
        f = dict(zip(LAYER_FLOAT_COLUMNS, zip(self.floats, self.stored_null)))
        nulls = self.int_null or [None] * len(self.ints)
        f.update((k, (v, z)) for k, v, z in zip(_INT_FIELDS, self.ints, nulls))
        return [(self.layer_id, None), (self.step, None), (self.rank, None), *(f[x.name] for x in LAYER_FIELDS),
                (self.nan_mask, None)]

    def _pooled(self, order: np.ndarray, starts: np.ndarray, size: np.ndarray
                ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(mom_n, mom_mean, mom_m2, mom_skip) per segment: the moments of the segment's rows
        pooled, finite rows only; the n-way form of :func:`gradwatch.agent.spec.merge_moments`,
        ``M2 = Σ m2_i + Σ n_i (mean_i − mean)²`` around the weighted mean (two passes, exact).
        Computed in place on sorted copies (a few row-length temporaries, not a dozen)."""
        mean = self._stat("mean")[0][order]
        m2 = self._stat("m2")[0][order]
        skip = ~(np.isfinite(mean) & np.isfinite(m2))
        n = self.numel[order]
        n[skip] = 0
        mean[skip] = 0.0
        m2[skip] = 0.0
        big_n = np.add.reduceat(n, starts)
        empty = big_n == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            w = n * mean
            mu = np.add.reduceat(w, starts) / np.where(empty, 1, big_n)
            np.subtract(mean, np.repeat(mu, size), out=mean)  # the deviation from the pooled mean
            mean[skip] = 0.0
            np.multiply(n, mean, out=w)
            w *= mean
            m2 += w
            q = np.add.reduceat(m2, starts)
        none = empty if empty.any() else None
        return [(big_n, None), (mu, none), (q, none), (np.add.reduceat(skip, starts, dtype=np.int64), None)]

    def _stat(self, name: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(values, stored-NULL mask, NaN mask) of a stored field (a count as float64: exact up
        to 2^53) or a derived one."""
        if name in _INT_FIELDS:
            k = _INT_FIELDS.index(name)
            return self.ints[k].astype(np.float64), (self.int_null[k] if self.int_null else None), None
        if name not in _DERIVED:
            k = LAYER_FLOAT_COLUMNS.index(name)
            return self.floats[k], self.stored_null[k], self.nan[k]
        k = LAYER_FLOAT_COLUMNS.index("m2")
        n = self.numel.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.divide(self.floats[k], n, out=np.zeros(len(n)), where=n > 0)
            del n
            if name != "var":
                np.sqrt(var, out=var)
        return var, self.stored_null[k], self.nan[k]

    # ------------------------------------------------------------------ SQLite

    def rows(self, chunk: int = ROW_CHUNK) -> Iterator[tuple[Any, ...]]:
        """Row tuples in ``layer_stat`` column order (NULL as None), for ``executemany``.

        Python objects are made for ``chunk`` rows at a time: a whole large batch as lists of
        Python numbers would cost several times the batch (about 32 bytes a value)."""
        cols = self.columns()
        for i in range(0, len(self), chunk):
            yield from zip(*(_with_nulls(v[i:i + chunk], None if z is None else z[i:i + chunk]) for v, z in cols))

    # ------------------------------------------------------------------ PostgreSQL

    def copy_chunks(self, chunk: int = ROW_CHUNK) -> Iterator[memoryview | bytes]:
        """The ``COPY layer_stat (...) FROM STDIN (FORMAT BINARY)`` stream, ``chunk`` rows a piece
        (built as the driver sends them, so at most one piece exists besides the frame).

        Binary COPY frames every field with its length (-1 for NULL), so rows differ in size with
        their NULL pattern; within a piece rows are grouped by pattern (usually one or two per
        batch: COPY does not care about order) and each group is one packed record array.
        """
        cols = self.columns()
        n = len(self)
        yield _COPY_HEADER
        for i in range(0, n, chunk):
            part = [(v[i:i + chunk], None if z is None else z[i:i + chunk]) for v, z in cols]
            yield from _copy_records(part, min(chunk, n - i))
        yield _COPY_TRAILER

    def copy_binary(self) -> bytes:
        """The whole COPY stream as one bytes object (tests and benchmarks)."""
        return b"".join(self.copy_chunks())

    # ------------------------------------------------------------------ rollup

    def blocks(self) -> BlockColumns:
        """Per (layer, block, rank) aggregates of these rows, one entry per key, columns in the
        order of ``layer_stat_block`` (``ingest._BLOCK_COLS``); an aggregate over no value is NULL."""
        with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as Python's sum makes it
            return self._blocks(len(self))

    def _blocks(self, n: int) -> BlockColumns:
        # Temporaries are one row-length column at a time where it matters: on a large batch
        # each costs 8 bytes a row, and several alive at once would outgrow the frame itself.
        if not n:
            return BlockColumns([])
        block = self.step // BLOCK_STEPS
        order = np.lexsort((self.step, self.rank, block, self.layer_id))
        change = np.empty(n, bool)
        change[0] = True
        change[1:] = False
        for key in (self.layer_id, block, self.rank):
            k = key[order]
            change[1:] |= k[1:] != k[:-1]
            del k
        starts = np.flatnonzero(change)
        del change
        ends = np.append(starts[1:], n) - 1
        size = np.diff(np.append(starts, n))
        first, last = order[starts], order[ends]
        zero = np.zeros(len(starts), np.int64)
        cols: list[tuple[np.ndarray, np.ndarray | None]] = [
            (self.layer_id[first], None), (block[first], None), (self.rank[first], None),
            (self.step[first], None), (self.step[last], None), (size, None)]
        del block
        cols += self._pooled(order, starts, size)
        for vals, null, nan in map(self._stat, ROLLUP_STATS):
            v = vals[order]
            del vals
            if null is None:
                cols += [(np.minimum.reduceat(v, starts), None), (np.maximum.reduceat(v, starts), None),
                         (np.add.reduceat(v, starts), None), (size, None), (zero, None)]
                continue
            ok = ~null[order]
            cnt = np.add.reduceat(ok, starts, dtype=np.int64)
            empty = cnt == 0
            empty_or_none = empty if empty.any() else None
            v[~ok] = np.inf
            lo = np.minimum.reduceat(v, starts)
            v[~ok] = -np.inf
            hi = np.maximum.reduceat(v, starts)
            v[~ok] = 0.0
            cols += [(lo, empty_or_none), (hi, empty_or_none), (np.add.reduceat(v, starts), empty_or_none),
                     (cnt, None),
                     (np.add.reduceat(nan[order], starts, dtype=np.int64) if nan is not None else zero, None)]
        return BlockColumns(cols)


def _copy_records(cols: list[tuple[np.ndarray, np.ndarray | None]], n: int) -> Iterator[memoryview]:
    """The binary COPY records of ``n`` rows, one packed record array per NULL pattern."""
    pattern = np.zeros(n, np.int64)
    for k, (_, null) in enumerate(cols):
        if null is not None:
            pattern |= null.astype(np.int64) << k
    groups: list[int] = np.unique(pattern).tolist() if n else []
    for p in groups:
        sel = None if len(groups) == 1 else np.flatnonzero(pattern == p)
        fields: list[tuple[str, str]] = [("nf", ">i2")]
        values: list[tuple[int, int, np.ndarray | None]] = []
        for k, ((vals, _), typ) in enumerate(zip(cols, _COPY_TYPES)):
            fields.append((f"len{k}", ">i4"))
            if (p >> k) & 1:
                values.append((k, -1, None))
                continue
            fields.append((f"v{k}", typ))
            values.append((k, np.dtype(typ).itemsize, vals if sel is None else vals[sel]))
        rec = np.empty(n if sel is None else len(sel), np.dtype(fields))
        rec["nf"] = len(cols)
        for k, size, val in values:
            rec[f"len{k}"] = size
            if val is not None:
                rec[f"v{k}"] = val
        yield memoryview(rec.view(np.uint8).data)  # the record array's bytes, not a copy of them


def _with_nulls(col: np.ndarray, null: np.ndarray | None) -> list[Any]:
    out = col.tolist()
    if null is not None:
        for j in np.flatnonzero(null).tolist():
            out[j] = None
    return out


_PG_ARRAY_OID = {"i": (20, ">i8"), "f": (701, ">f8")}  # element oid (int8, float8), binary type
_PG_ELEM = {"i": struct.Struct(">iq"), "f": struct.Struct(">id")}  # length prefix + value
_NULL_ELEM = struct.pack(">i", -1)


def pg_binary_array(col: np.ndarray, null: np.ndarray | None) -> bytes:
    """A one-dimensional int8[]/float8[] in PostgreSQL's binary array format (NULL where ``null``).

    psycopg dumps a Python list element by element (~0.6 us a value); this is one numpy pass.
    """
    oid, typ = _PG_ARRAY_OID[col.dtype.kind]
    n = len(col)
    has_null = null is not None and bool(null.any())
    head = struct.pack(">iiIii", 1, int(has_null), oid, n, 1)
    if not has_null:
        rec = np.empty(n, np.dtype([("len", ">i4"), ("v", typ)]))
        rec["len"] = 8
        rec["v"] = col
        return head + rec.tobytes()
    if null is not None and bool(null.all()):
        return head + _NULL_ELEM * n
    pack = _PG_ELEM[col.dtype.kind].pack
    return head + b"".join(_NULL_ELEM if z else pack(8, v) for v, z in zip(col.tolist(), null.tolist()))  # type: ignore[union-attr]


@dataclass(slots=True)
class BlockColumns:
    """Rollup rows of one batch, column-wise: (values, NULL mask or None) per column."""

    columns: list[tuple[np.ndarray, np.ndarray | None]]

    def __len__(self) -> int:
        return len(self.columns[0][0]) if self.columns else 0

    def rows(self) -> list[tuple[Any, ...]]:
        return list(zip(*(_with_nulls(c, z) for c, z in self.columns)))

    def coarsen(self, factor: int) -> BlockColumns:
        """The same aggregates over blocks ``factor`` times wider (the next rollup level, block
        ``block // factor``): min of the mins, max of the maxes, sums of sums and counts, an
        aggregate NULL where all its parts were, the pooled moments merged n-way (Chan's
        formula around the weighted mean, as :meth:`LayerFrame._pooled`). Costs a pass over the
        batch's blocks, not its rows."""
        if not len(self):
            return self
        cols = self.columns
        layer, block, rank = cols[0][0], cols[1][0] // factor, cols[2][0]
        order = np.lexsort((cols[1][0], rank, block, layer))
        n = len(order)
        change = np.zeros(n, bool)
        change[0] = True
        for key in (layer, block, rank):
            k = key[order]
            change[1:] |= k[1:] != k[:-1]
        starts = np.flatnonzero(change)
        size = np.diff(np.append(starts, n))
        first = order[starts]
        out: list[tuple[np.ndarray, np.ndarray | None]] = [
            (layer[first], None), (block[first], None), (rank[first], None),
            (np.minimum.reduceat(cols[3][0][order], starts), None), (np.maximum.reduceat(cols[4][0][order], starts), None),
            (np.add.reduceat(cols[5][0][order], starts), None)]
        mom_n = cols[6][0][order]
        has = mom_n > 0
        mean = np.where(has, cols[7][0][order], 0.0)
        m2 = np.where(has, cols[8][0][order], 0.0)
        big_n = np.add.reduceat(mom_n, starts)
        empty = big_n == 0
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            mu = np.add.reduceat(mom_n * mean, starts) / np.where(empty, 1, big_n)
            dev = np.where(has, mean - np.repeat(mu, size), 0.0)
            q = np.add.reduceat(m2 + mom_n * dev * dev, starts)
            none = empty if empty.any() else None
            out += [(big_n, None), (mu, none), (q, none), (np.add.reduceat(cols[9][0][order], starts), None)]
            for j in range(10, len(cols), 5):
                null = cols[j][1]
                ok = None if null is None else ~null[order]
                all_null = None if ok is None else np.add.reduceat(ok, starts) == 0
                z = all_null if all_null is not None and all_null.any() else None
                for c, (fn, fill) in enumerate(((np.minimum, np.inf), (np.maximum, -np.inf), (np.add, 0.0))):
                    v = cols[j + c][0][order]
                    if ok is not None:
                        v = np.where(ok, v, fill)
                    out.append((fn.reduceat(v, starts), z))
                out += [(np.add.reduceat(cols[j + 3][0][order], starts), None),
                        (np.add.reduceat(cols[j + 4][0][order], starts), None)]
        return BlockColumns(out)
