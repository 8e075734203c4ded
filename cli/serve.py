"""``gradwatch serve``: migrate the database, then serve the API and the dashboard with uvicorn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

    from gradwatch.server.settings import ServerSettings

_LOCAL = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the gradwatch server (API + dashboard)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--db", default=None, metavar="URL",
                   help="database URL (default: GRADWATCH_DATABASE_URL or sqlite:///./gradwatch.db)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def configure_logging(level: str) -> None:
    """Our log lines at ``level``; Alembic's per-migration and plugin-setup chatter only when debugging."""
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if level.lower() != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)


def urls(host: str, port: int) -> tuple[str, str]:
    """The dashboard and API-docs URLs a user opens for a server bound to ``host``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}"
    return f"{base}/", f"{base}/docs"


def make_server(settings: ServerSettings, host: str, port: int, log_level: str) -> uvicorn.Server:
    """The uvicorn server for ``settings`` (``gradwatch serve`` and ``gradwatch demo`` share it)."""
    import uvicorn

    from gradwatch.server.app import create_app

    app = create_app(settings, dashboard=_dashboard())
    # uvicorn's own frame limit sits above ours so oversized frames get our 1009 + message.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            ws_max_size=settings.max_body_bytes + (1 << 20))
    return uvicorn.Server(config)


def _dashboard() -> Callable[[Any], Any] | None:
    """The dashboard's mount function, or None (``/`` then redirects to ``/docs``) when the
    ``[dashboard]`` extra is not installed."""
    try:
        from gradwatch.dashboard.app import mount
    except ImportError as e:
        logging.getLogger("gradwatch.serve").warning("dashboard not available (%s): pip install 'gradwatch[dashboard]'", e)
        return None
    return mount


def settings_for(db: str | None) -> ServerSettings:
    from gradwatch.server.settings import ServerSettings

    return ServerSettings(database_url=db) if db else ServerSettings()


def describe_db(settings: Any) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.database_url).render_as_string(hide_password=True)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    settings = settings_for(args.db)
    log = logging.getLogger("gradwatch.serve")
    if not settings.auth_enabled and args.host not in _LOCAL:
        log.warning("binding %s without GRADWATCH_TOKEN: anyone who can reach it can read and write", args.host)
    server = make_server(settings, args.host, args.port, args.log_level)
    dash, docs = urls(args.host, args.port)
    print(f"gradwatch: dashboard {dash}  API docs {docs}  database {describe_db(settings)}", flush=True)
    _tune_gc()
    server.run()
    return 0 if server.started else 3  # uvicorn's own exit status for a failed startup


def _tune_gc() -> None:
    """Keep the cyclic GC off the ingest path (measured: +6-15% websocket ingest on SQLite).

    Ingest allocates many short-lived containers (parsed JSON, statement objects); with the
    default thresholds a collection runs every 700 of them and the periodic full collections
    walk the whole heap of a loaded FastAPI/SQLAlchemy process. Freezing what startup built and
    collecting less often leaves refcounting to free almost everything, as it does anyway.
    Done here, in the server process, not in ``create_app``: an embedding program owns its GC.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
