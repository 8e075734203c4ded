"""Runs, layers and their series: ``/runs``, ``/runs/{id}``, ``/layers``, ``/stats``, ``/heatmap``,
``/steps``, ``/scalars``, ``/transforms``, ``/events``. Sync routes: each opens its own connection
or transaction. Every data endpoint declares its response model (so ``/openapi.json`` describes
it); every list answers ``{"data": [...], "count": n}``; ``/stats`` and ``/heatmap`` take a
bounded number of statements whatever the layer count.

Every series response is bounded: at most ``max_points`` buckets per series (10,000 at most, and
the default when it is left out, so a long run is downsampled rather than sent row by row) and at
most :data:`MAX_CELLS` values per response across layers.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from gradwatch.server.api.deps import ERRORS, ErrorBody, require_read, require_write, state
from gradwatch.server.encoding import FastJSONResponse
from gradwatch.server.errors import Invalid
from gradwatch.server.repo import events, series
from gradwatch.server.repo import runs as repo
from gradwatch.server.schemas import (
    MAX_STEP,
    RUN_ID_PATTERN,
    EventPage,
    HeatmapResponse,
    LayerPage,
    RunCreate,
    RunPage,
    RunRead,
    RunUpdate,
    ScalarsResponse,
    StatsResponse,
    StepsResponse,
    TransformsResponse,
)

router = APIRouter(tags=["runs"])
read = [Depends(require_read)]
write = [Depends(require_write)]

RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]
Start = Annotated[int | None, Query(ge=0, le=MAX_STEP, description="first step (inclusive)")]
End = Annotated[int | None, Query(ge=0, le=MAX_STEP, description="last step (inclusive)")]
#: Largest ``max_points`` (the server's ``max_points_limit`` may lower it), and the default.
MAX_POINTS = 10_000
#: Values one series response may hold across its layers (layers × buckets).
MAX_CELLS = 2_000_000
#: Heatmap buckets per layer when ``max_points`` is left out.
HEATMAP_POINTS = 200
MaxPoints = Annotated[int | None, Query(
    ge=1, le=MAX_POINTS, description=f"downsample into at most this many buckets (default and most: {MAX_POINTS:,}; "
    "raw points, one per step and rank, when the range spans no more steps than this)")]
QueryText = Annotated[str | None, Query(max_length=512, pattern=r"^[^\x00]*$")]


def _max_points(request: Request, v: int | None) -> int:
    """``max_points`` as asked, or the server's limit when left out (a series is never unbounded)."""
    lim = state(request).settings.max_points_limit
    if v is None:
        return lim
    if v > lim:
        raise Invalid(f"max_points: at most {lim} on this server, got {v}")
    return v


@router.get("/runs", response_model=RunPage, dependencies=read, responses=ERRORS)
def list_runs(request: Request, project: QueryText = None, status: QueryText = None, name: QueryText = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50, offset: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0
              ) -> Any:
    """Runs, newest first, filtered by project, status and a substring of the name."""
    with state(request).db.read() as conn:
        data, count = repo.list_runs(conn, project=project, status=status, name=name, limit=limit, offset=offset)
    return FastJSONResponse({"data": data, "count": count, "limit": limit, "offset": offset})


@router.post("/runs", response_model=RunRead, status_code=201, dependencies=write,
             responses={**ERRORS, 409: {"model": ErrorBody}, 413: {"model": ErrorBody}})
def create_run(request: Request, body: RunCreate) -> Any:
    """Create a run explicitly (runs are also created by the first batch that names them)."""
    with state(request).db.write() as conn:
        run = repo.create_run(conn, run_id=body.run_id or uuid.uuid4().hex, project=body.project, name=body.name,
                              tags=body.tags, config=body.config, notes=body.notes)
    return FastJSONResponse(run, status_code=201)


@router.get("/runs/{run_id}", response_model=RunRead, dependencies=read, responses=ERRORS)
def get_run(request: Request, run_id: RunId) -> Any:
    with state(request).db.read() as conn:
        return FastJSONResponse(repo.get_run(conn, run_id))


@router.patch("/runs/{run_id}", response_model=RunRead, dependencies=write,
              responses={**ERRORS, 413: {"model": ErrorBody}})
def update_run(request: Request, run_id: RunId, body: RunUpdate) -> Any:
    """Change name, tags, notes or status; fields left out are kept."""
    values = {k: getattr(body, k) for k in body.model_fields_set}
    if "tags" in values and values["tags"] is None:
        values["tags"] = []
    if values.get("status", "") is None:  # a run always has a status
        del values["status"]
    with state(request).db.write() as conn:
        return FastJSONResponse(repo.update_run(conn, run_id, values))


@router.delete("/runs/{run_id}", status_code=204, dependencies=write, responses=ERRORS)
def delete_run(request: Request, run_id: RunId) -> Response:
    """Delete a run and all its data."""
    with state(request).db.write() as conn:
        repo.delete_run(conn, run_id)
    return Response(status_code=204)


@router.get("/runs/{run_id}/layers", response_model=LayerPage, dependencies=read, responses=ERRORS)
def list_layers(request: Request, run_id: RunId) -> Any:
    """The run's layer table, in index order."""
    with state(request).db.read() as conn:
        data = repo.list_layers(conn, run_id)
    return FastJSONResponse({"data": data, "count": len(data)})


LayerSpecs = Annotated[list[Annotated[str, Query(max_length=512)]] | None, Query(
    description="layer name or index, repeatable; 'all' for every layer")]


@router.get("/runs/{run_id}/stats", response_model=StatsResponse, dependencies=read, responses=ERRORS)
def layer_stats(request: Request, run_id: RunId, layer: LayerSpecs = None,
                stat: Annotated[str, Query(max_length=32)] = "l2", start: Start = None, end: End = None,
                max_points: MaxPoints = None, rank: Annotated[int | None, Query(ge=0, le=1 << 20)] = None
                ) -> Any:
    """Per-layer series of one statistic: raw points while the range spans at most ``max_points``
    steps, else buckets that keep min, max, mean and count (so a spike stays visible).

    Left out, ``max_points`` is the server's limit (10,000) shared out so that the layers asked for
    hold at most 2,000,000 values in all (200 layers: 10,000 each; 1,000 layers: 2,000 each); a
    ``max_points`` given with more layers than that allows is refused with 422."""
    mp = _max_points(request, max_points)
    if stat not in series.LAYER_STATS:
        raise Invalid(f"unknown stat {stat!r}; expected one of {list(series.LAYER_STATS)}")
    with state(request).db.read() as conn:
        repo.require_run(conn, run_id)
        layers = repo.resolve_layers(conn, run_id, layer or [])
        if len(layers) > 1000:
            raise Invalid("stats: at most 1000 layers per request; use /heatmap for more")
        if max_points is None:
            mp = max(1, min(mp, MAX_CELLS // max(1, len(layers))))
        elif len(layers) * mp > MAX_CELLS:
            raise Invalid(f"max_points: {len(layers)} layers × {mp} points is more than the {MAX_CELLS:,} values "
                          f"one response holds; ask for at most {MAX_CELLS // len(layers)} points or fewer layers")
        got = series.layers_series(conn, [lid for lid, _, _ in layers], stat, start=start, end=end, max_points=mp,
                                   rank=rank)
    out = [{"layer": idx, "name": name, **s} for (_, idx, name), s in zip(layers, got)]
    return FastJSONResponse({"run_id": run_id, "stat": stat, "series": out})


@router.get("/runs/{run_id}/heatmap", response_model=HeatmapResponse, dependencies=read, responses=ERRORS)
def layer_heatmap(request: Request, run_id: RunId, layers: LayerSpecs = None,
                  stat: Annotated[str, Query(max_length=32)] = "l2", start: Start = None, end: End = None,
                  max_points: Annotated[int | None, Query(ge=1, le=MAX_POINTS, description=(
                      f"buckets per layer (default {HEATMAP_POINTS}, fewer when that many layers would exceed "
                      f"{MAX_CELLS:,} values)"))] = None,
                  agg: Annotated[str, Query(max_length=8)] = "max") -> Any:
    """Many layers at once: a matrix ``values[layer][bucket]`` of the bucket's max (or min/mean).

    The buckets span the steps the layers hold within ``start``..``end``. A matrix of more than
    2,000,000 values (layers × buckets) is refused with 422; left out, ``max_points`` is 200, or
    as many as fit that budget for the layers asked for."""
    mp = _max_points(request, max_points)
    with state(request).db.read() as conn:
        repo.require_run(conn, run_id)
        ls = repo.resolve_layers(conn, run_id, layers or [])
        if max_points is None:
            mp = max(1, min(HEATMAP_POINTS, mp, MAX_CELLS // max(1, len(ls))))
        out = series.heatmap(conn, ls, stat, start=start, end=end, max_points=mp, agg=agg, max_cells=MAX_CELLS)
    return FastJSONResponse({"run_id": run_id, **out})


@router.get("/runs/{run_id}/steps", response_model=StepsResponse, dependencies=read, responses=ERRORS)
def step_series(request: Request, run_id: RunId,
                fields: Annotated[str | None, Query(max_length=200, description="comma-separated")] = None,
                start: Start = None, end: End = None, max_points: MaxPoints = None,
                skipped: bool | None = None) -> Any:
    """Step-level series (total norm before/after, clip coefficient, loss scale, skipped): raw points
    while the range spans at most ``max_points`` steps (default 10,000), else min/max/mean buckets."""
    mp = _max_points(request, max_points)
    names = [f.strip() for f in fields.split(",") if f.strip()] if fields else []
    with state(request).db.read() as conn:
        repo.require_run(conn, run_id)
        out = series.step_series(conn, run_id, names, start=start, end=end, max_points=mp, skipped=skipped)
    return FastJSONResponse({"run_id": run_id, **out})


@router.get("/runs/{run_id}/scalars", response_model=ScalarsResponse, dependencies=read, responses=ERRORS)
def scalar_series(request: Request, run_id: RunId, key: QueryText = None, start: Start = None, end: End = None,
                  max_points: MaxPoints = None) -> Any:
    """User scalars from ``Watcher.log``: the keys, or one key's series (raw points while the range
    spans at most ``max_points`` steps, default 10,000, else min/max/mean buckets)."""
    mp = _max_points(request, max_points)
    with state(request).db.read() as conn:
        repo.require_run(conn, run_id)
        if key is None:
            return FastJSONResponse({"run_id": run_id, "keys": series.scalar_keys(conn, run_id)})
        out = series.scalar_series(conn, run_id, key, start=start, end=end, max_points=mp)
    return FastJSONResponse({"run_id": run_id, "key": key, **out})


@router.get("/runs/{run_id}/transforms", response_model=TransformsResponse, dependencies=read, responses=ERRORS)
def transform_series(request: Request, run_id: RunId, transform: QueryText = None,
                     fields: Annotated[str | None, Query(max_length=1000, description="comma-separated")] = None,
                     start: Start = None, end: End = None, max_points: MaxPoints = None) -> Any:
    """Each transform's reported values (threshold, coefficient, α_t, σ_t, z-score...): the
    transforms and their fields, or one transform's fields as series, raw points while the range
    spans at most ``max_points`` steps, else min/max/mean buckets like ``/steps``."""
    mp = _max_points(request, max_points)
    with state(request).db.read() as conn:
        repo.require_run(conn, run_id)
        known = series.transform_fields(conn, run_id)
        if transform is None:
            return FastJSONResponse({"run_id": run_id, "transforms": known})
        names = [f.strip() for f in fields.split(",") if f.strip()] if fields else known.get(transform, [])
        bad = [f for f in names if f not in known.get(transform, [])]
        if bad:
            raise Invalid(f"transform {transform!r} reported no field(s) {bad[:5]}; it reported "
                          f"{known.get(transform, [])}")
        out = [{"transform": transform, "field": f, **series.transform_series(
            conn, run_id, transform, f, start=start, end=end, max_points=mp)} for f in names[:64]]
    return FastJSONResponse({"run_id": run_id, "series": out})


@router.get("/runs/{run_id}/events", response_model=EventPage, dependencies=read, responses=ERRORS)
def list_events(request: Request, run_id: RunId,
                kind: Annotated[list[Annotated[str, Query(max_length=32)]] | None, Query()] = None,
                start: Start = None, end: End = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                offset: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
                source: Annotated[Literal["agent", "detector"] | None, Query(
                    description="only the agent's events or only the detectors'")] = None,
                severity: Annotated[Literal["info", "warning", "critical"] | None, Query(
                    description="only events of this severity or worse")] = None) -> Any:
    """Events by kind (repeatable), source, least severity and step range, in step order."""
    with state(request).db.read() as conn:
        repo.require_run(conn, run_id)
        data, count = events.list_events(conn, run_id, kinds=kind or [], start=start, end=end, limit=limit,
                                         offset=offset, source=source, min_severity=severity)
    return FastJSONResponse({"data": data, "count": count, "limit": limit, "offset": offset})
