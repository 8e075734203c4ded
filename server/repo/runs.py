"""Runs and layers: create, read, list, update, delete (caller owns the transaction)."""

from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from gradwatch.server.db.models import (
    Event,
    IngestBatch,
    IngestCursor,
    Layer,
    LayerStat,
    Run,
    Scalar,
    StepRecord,
    layer_stat_block,
    layer_stat_coarse,
)
from gradwatch.server.encoding import enc, enc_value
from gradwatch.server.errors import Conflict, Invalid, NotFound

#: A layer spec that is not a layer's name may be its index.
_INDEX = re.compile(r"-?[0-9]+")

_RUN_COLUMNS = (Run.id, Run.project, Run.name, Run.status, Run.config, Run.tags, Run.notes, Run.world_size,
                Run.started_at, Run.created_at, Run.updated_at, Run.last_step)


#: The key of ``run.config`` under which the agents' loss accounting is kept (per source), so
#: that it needs no column of its own; it is taken out of ``config`` when a run is read.
LOST_KEY = "_gradwatch_lost"


def _run_dict(row: Any) -> dict[str, Any]:
    config = dict(row.config or {})
    lost = lost_totals(config.pop(LOST_KEY, None))
    return {
        "run_id": row.id, "project": row.project, "name": row.name, "status": row.status,
        "config": config, "tags": row.tags or [], "notes": row.notes, "world_size": row.world_size,
        "started_at": enc(row.started_at), "created_at": row.created_at, "updated_at": row.updated_at,
        "last_step": row.last_step, "lost_records": sum(lost.values()), "lost_reasons": lost,
    }


def lost_totals(per_source: Any) -> dict[str, int]:
    """Records lost by reason, summed over the sources that reported (``{source: {reason: n}}``)."""
    out: dict[str, int] = {}
    if isinstance(per_source, dict):
        for by_reason in per_source.values():
            if isinstance(by_reason, dict):
                for r, n in by_reason.items():
                    if type(n) is int:
                        out[r] = out.get(r, 0) + n
    return out


def record_lost(conn: Connection, run_id: str, source: int, lost: dict[str, int]) -> None:
    """Keep what one source (rank) reported lost at the end of its run. A source reports once per
    end of run; a later report of the same source (a resumed process) replaces it. Called after
    the ingest's own ``UPDATE run``, so on PostgreSQL the row is already locked by this
    transaction and concurrent reports of other sources cannot overwrite each other."""
    config = dict(conn.execute(select(Run.config).where(Run.id == run_id)).scalar_one_or_none() or {})
    per_source = config.get(LOST_KEY)
    per_source = dict(per_source) if isinstance(per_source, dict) else {}
    per_source[str(source)] = dict(lost)
    config[LOST_KEY] = per_source
    conn.execute(update(Run).where(Run.id == run_id).values(config=config))


def get_run(conn: Connection, run_id: str) -> dict[str, Any]:
    row = conn.execute(select(*_RUN_COLUMNS).where(Run.id == run_id)).one_or_none()
    if row is None:
        raise NotFound(f"run {run_id!r} not found")
    out = _run_dict(row)
    out["layer_count"] = conn.execute(select(func.count()).select_from(Layer).where(Layer.run_id == run_id)).scalar_one()
    return out


def require_run(conn: Connection, run_id: str) -> None:
    if conn.execute(select(Run.id).where(Run.id == run_id)).first() is None:
        raise NotFound(f"run {run_id!r} not found")


def list_runs(conn: Connection, *, project: str | None = None, status: str | None = None,
              name: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Runs newest first; ``name`` matches a substring (case-insensitive)."""
    conds = []
    if project is not None:
        conds.append(Run.project == project)
    if status is not None:
        conds.append(Run.status == status)
    if name:
        esc = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conds.append(func.lower(Run.name).like(f"%{esc.lower()}%", escape="\\"))
    count = conn.execute(select(func.count()).select_from(Run).where(*conds)).scalar_one()
    rows = conn.execute(select(*_RUN_COLUMNS).where(*conds).order_by(Run.created_at.desc(), Run.id)
                        .limit(limit).offset(offset)).all()
    out = [_run_dict(r) for r in rows]
    counts = _event_counts(conn, [r["run_id"] for r in out])
    for r in out:
        r.update(counts.get(r["run_id"], dict.fromkeys(EVENT_COUNTS.values(), 0)))
    return out, int(count)


#: Event kinds counted per run in the runs list, and the field each count is reported as.
EVENT_COUNTS = {"overflow": "overflows", "skipped": "skipped", "clip": "clips", "nonfinite": "nonfinite"}


def _event_counts(conn: Connection, run_ids: list[str]) -> dict[str, dict[str, int]]:
    """``{run_id: {"overflows": n, "skipped": n, "clips": n, "nonfinite": n}}`` for a page of runs
    (one grouped query over the event table's (run_id, kind) rows)."""
    if not run_ids:
        return {}
    out: dict[str, dict[str, int]] = {r: dict.fromkeys(EVENT_COUNTS.values(), 0) for r in run_ids}
    rows = conn.execute(select(Event.run_id, Event.kind, func.count()).where(
        Event.run_id.in_(run_ids), Event.kind.in_(list(EVENT_COUNTS))).group_by(Event.run_id, Event.kind)).all()
    for run_id, kind, n in rows:
        out[run_id][EVENT_COUNTS[kind]] = int(n)
    return out


def create_run(conn: Connection, *, run_id: str, project: str, name: str | None, tags: list[str],
               config: dict[str, Any], notes: str | None) -> dict[str, Any]:
    if conn.execute(select(Run.id).where(Run.id == run_id)).first() is not None:
        raise Conflict(f"run {run_id!r} already exists")
    now = time.time()
    conn.execute(insert(Run).values(id=run_id, project=project, name=name, status="running",
                                    config=enc_value(config), tags=tags, notes=notes, world_size=1,
                                    created_at=now, updated_at=now))
    return get_run(conn, run_id)


def update_run(conn: Connection, run_id: str, values: dict[str, Any]) -> dict[str, Any]:
    require_run(conn, run_id)
    allowed = {"name", "tags", "notes", "status"}
    bad = values.keys() - allowed
    if bad:
        raise Invalid(f"cannot update {sorted(bad)}")
    if values:
        conn.execute(update(Run).where(Run.id == run_id).values(**values, updated_at=time.time()))
    return get_run(conn, run_id)


def delete_run(conn: Connection, run_id: str) -> None:
    """Delete a run and everything stored for it (explicitly, table by table).

    PostgreSQL: the run row is locked first (``FOR UPDATE``), which waits for the batches of
    the run being stored (each holds a key-share lock on it from its first statement) and
    makes later ones wait at that statement. Without it a batch in flight could commit rows
    the deletes had already passed (orphans), or deadlock with them: a batch locks the run
    row, then coarse blocks and its cursor, which the deletes took first."""
    if conn.dialect.name == "postgresql":
        if conn.execute(select(Run.id).where(Run.id == run_id).with_for_update()).first() is None:
            raise NotFound(f"run {run_id!r} not found")
    else:
        require_run(conn, run_id)
    layer_ids = select(Layer.id).where(Layer.run_id == run_id).scalar_subquery()
    conn.execute(delete(LayerStat).where(LayerStat.layer_id.in_(layer_ids)))
    for rollup in (layer_stat_block, layer_stat_coarse):
        conn.execute(delete(rollup).where(rollup.c.layer_id.in_(layer_ids)))
    for model in (StepRecord, Scalar, Event, IngestBatch, IngestCursor, Layer):
        conn.execute(delete(model).where(model.run_id == run_id))
    conn.execute(delete(Run).where(Run.id == run_id))


def list_layers(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    require_run(conn, run_id)
    rows = conn.execute(select(Layer.idx, Layer.name, Layer.shape, Layer.dtype, Layer.sparse)
                        .where(Layer.run_id == run_id).order_by(Layer.idx)).all()
    return [{"index": r.idx, "name": r.name, "shape": r.shape or [], "dtype": r.dtype, "sparse": bool(r.sparse)}
            for r in rows]


def resolve_layers(conn: Connection, run_id: str, specs: list[str]) -> list[tuple[int, int, str]]:
    """Turn layer names or indices (or ``all``) into ``(layer.id, index, name)``, in request order."""
    rows = conn.execute(select(Layer.id, Layer.idx, Layer.name).where(Layer.run_id == run_id)
                        .order_by(Layer.idx)).all()
    if not specs or specs == ["all"]:
        return [(r.id, r.idx, r.name) for r in rows]
    by_name = {r.name: r for r in rows}
    by_idx = {r.idx: r for r in rows}
    out = []
    for s in specs:
        r = by_name.get(s)
        if r is None and _INDEX.fullmatch(s):  # ASCII digits only: str.isdigit() also takes "²"
            r = by_idx.get(int(s))
        if r is None:
            raise NotFound(f"layer {s!r} not found in run {run_id!r}")
        out.append((r.id, r.idx, r.name))
    return out
