"""``create_app(settings)``: the FastAPI application (no engine or settings exist before it is called).

Layout: ``/api/v1/...`` (REST + websockets), ``/healthz``, ``/metrics``, ``/docs``, ``/openapi.json``.
The root ``/`` belongs to the dashboard: pass ``dashboard=`` (a callable that mounts it on the app);
without one, ``/`` redirects to ``/docs``. Every request body is bounded by ``max_body_bytes``
(:class:`BodyLimit`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, IntegrityError
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradwatch.server.api import export, ingest, live, rules, runs, system
from gradwatch.server.api.deps import AppState
from gradwatch.server.db.engine import Database, make_engine
from gradwatch.server.db.migrate import upgrade_to_head
from gradwatch.server.detect.alerts import AlertWorkers
from gradwatch.server.errors import DomainError
from gradwatch.server.live import LiveHub
from gradwatch.server.metrics import Metrics
from gradwatch.server.settings import ServerSettings, get_settings

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes is answered 413 before any route
    (or FastAPI's body parsing) sees it, so no route can be made to buffer an unbounded body.

    A declared Content-Length over the limit is refused without reading a byte; a body without
    one (chunked) is counted as it streams in and handed on whole once it fits. ``exempt`` paths
    enforce their own limit (ingest: its own messages and metrics, and a limit that may differ).
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: Collection[str] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > self.limit):
            await self._refuse(scope, receive, send, f"request body of {declared.decode()[:40]} bytes exceeds "
                                                     f"the limit of {self.limit} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        first: Message
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                first = message
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._refuse(scope, receive, send, f"request body exceeds the limit of {self.limit} bytes")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        # No "connection: close": the server would drop the socket while the client is still
        # sending, and the client would see a reset instead of this answer. Kept open, the server
        # discards the rest of the body (without buffering it) and the client reads the 413.
        await JSONResponse({"detail": message}, 413)(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


DOCS_ASSETS = "/static/docs"


def _offline_docs(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` with Swagger UI and ReDoc served by this process (no CDN: they
    work without internet). The files come from the ``fastapi-offline`` package."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).with_name("static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def _swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="gradwatch API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def _redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="gradwatch API",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


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
        workers = AlertWorkers(settings) if settings.alerts_enabled else None
        if workers is not None:
            workers.start()
        if not settings.auth_enabled:
            log.warning("no GRADWATCH_TOKEN set: the API accepts unauthenticated reads and writes")
        try:
            yield
        finally:
            if workers is not None:
                await asyncio.to_thread(workers.stop)
            await asyncio.to_thread(hub.stop)
            engine.dispose()

    app = FastAPI(title="gradwatch", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Gradient-dynamics monitoring: ingest, storage and queries.")
    _offline_docs(app)
    app.include_router(ingest.router, prefix=API_PREFIX)
    app.include_router(runs.router, prefix=API_PREFIX)
    app.include_router(rules.router, prefix=API_PREFIX)
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

    @app.get("/api/{path:path}", include_in_schema=False)
    def _no_such_api_path(request: Request, path: str) -> JSONResponse:
        # Registered before the dashboard's catch-all page route: an unknown API path is JSON,
        # never HTML; a known path asked with the wrong method keeps its 405.
        for route in app.router.routes:
            if getattr(route, "endpoint", None) is not _no_such_api_path and \
                    route.matches(request.scope)[0] is Match.PARTIAL:
                return JSONResponse({"detail": "Method Not Allowed"}, 405)
        return JSONResponse({"detail": f"no such API path: /api/{path}"[:300]}, 404)

    if dashboard is not None:
        dashboard(app)
    else:
        @app.get("/", include_in_schema=False)
        def _root() -> RedirectResponse:
            return RedirectResponse("/docs")

    # Added last, so outermost: it reads a body before anything else (the dashboard's middleware
    # reads callback bodies itself and would leave nothing for it to count). Ingest checks the
    # same setting itself, with its own messages and metrics.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, exempt={f"{API_PREFIX}/ingest"})

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
