"""``GET /runs/{id}/export``: CSV or Parquet, streamed."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from gradwatch.server.api.deps import ERRORS, require_read, state
from gradwatch.server.api.runs import RunId
from gradwatch.server.repo import export
from gradwatch.server.repo.runs import require_run

router = APIRouter(tags=["export"])


@router.get("/runs/{run_id}/export", dependencies=[Depends(require_read)], responses={
    **ERRORS, 200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
def export_run(request: Request, run_id: RunId,
               format: Annotated[Literal["csv", "parquet"], Query()] = "csv",
               table: Annotated[Literal["layer_stats", "steps", "events", "scalars", "transforms"], Query()] = "layer_stats",
               ) -> StreamingResponse:
    """One table of a run; NaN/±inf survive (CSV spells them NaN/Infinity/-Infinity)."""
    gw = state(request)
    with gw.db.read() as conn:
        require_run(conn, run_id)
    chunk = gw.settings.export_chunk_rows
    if format == "csv":
        body = export.stream_csv(gw.db.engine, table, run_id, chunk)
        media = "text/csv"
    else:
        body = export.stream_parquet(gw.db.engine, table, run_id, chunk)
        media = "application/vnd.apache.parquet"
    filename = f"{run_id}-{table}.{format}"
    return StreamingResponse(body, media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})
