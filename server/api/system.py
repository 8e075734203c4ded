"""``/healthz`` (open) and ``/metrics`` (Prometheus text; needs a read or write token when auth is on)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text

from gradwatch.server.api.deps import require_read, state

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """200 when the database answers, 503 otherwise."""
    try:
        with state(request).db.read() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        return JSONResponse({"status": "unavailable", "detail": type(e).__name__}, 503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", dependencies=[Depends(require_read)], response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(state(request).metrics.render(), media_type="text/plain; version=0.0.4")
