"""``create_app(settings)``: the FastAPI application (no engine or settings exist before it is called).

Layout: ``/api/v1/...`` (REST + websockets), ``/healthz``, ``/metrics``, ``/docs``, ``/openapi.json``.
The root ``/`` belongs to the dashboard: pass ``dashboard=`` (a callable that mounts it on the app);
without one, ``/`` redirects to ``/docs``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.exc import DataError, IntegrityError

from gradwatch.server.api import export, ingest, live, runs, system
from gradwatch.server.api.deps import AppState
from gradwatch.server.db.engine import Database, make_engine
from gradwatch.server.db.migrate import upgrade_to_head
from gradwatch.server.errors import DomainError
from gradwatch.server.live import LiveHub
from gradwatch.server.metrics import Metrics
from gradwatch.server.settings import ServerSettings, get_settings

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(settings: ServerSettings | None = None, *,
               dashboard: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """Build the app. The lifespan opens the engine, migrates to head and starts the live listener."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        if settings.migrate_on_start:
            await asyncio.to_thread(upgrade_to_head, engine)
        hub = LiveHub()
        hub.bind(asyncio.get_running_loop())
        app.state.gw = AppState(settings=settings, db=Database(engine), metrics=Metrics(), hub=hub)
        await asyncio.to_thread(hub.start_listener, engine)
        if not settings.auth_enabled:
            log.warning("no GRADWATCH_TOKEN set: the API accepts unauthenticated reads and writes")
        try:
            yield
        finally:
            await asyncio.to_thread(hub.stop)
            engine.dispose()

    app = FastAPI(title="gradwatch", version="1", lifespan=lifespan,
                  description="Gradient-dynamics monitoring: ingest, storage and queries.")
    app.include_router(ingest.router, prefix=API_PREFIX)
    app.include_router(runs.router, prefix=API_PREFIX)
    app.include_router(export.router, prefix=API_PREFIX)
    app.include_router(live.router, prefix=API_PREFIX)
    app.include_router(system.router)

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, 422)

    @app.exception_handler(DataError)
    async def _data_error(_: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid value: {str(exc.orig).splitlines()[0][:200]}"}, 422)

    @app.exception_handler(IntegrityError)
    async def _integrity_error(_: Request, exc: IntegrityError) -> JSONResponse:
        return JSONResponse({"detail": f"conflict: {str(exc.orig).splitlines()[0][:200]}"}, 409)

    if dashboard is not None:
        dashboard(app)
    else:
        @app.get("/", include_in_schema=False)
        def _root() -> RedirectResponse:
            return RedirectResponse("/docs")

    def _openapi() -> dict[str, Any]:
        # Validation errors are answered as {"detail": "<message>"} like every other error.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.get("components", {}).get("schemas", {})
            if "HTTPValidationError" in comps:
                comps["HTTPValidationError"] = {"title": "HTTPValidationError", "type": "object",
                                                "properties": {"detail": {"type": "string"}},
                                                "required": ["detail"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = _openapi  # type: ignore[method-assign]
    return app
