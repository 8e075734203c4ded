"""``gradwatch serve``: migrate the database, then serve the API (and later the dashboard) with uvicorn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the gradwatch server (API + dashboard)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--db", default=None, metavar="URL",
                   help="database URL (default: GRADWATCH_DATABASE_URL or sqlite:///./gradwatch.db)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gradwatch.server.app import create_app
    from gradwatch.server.settings import ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(database_url=args.db) if args.db else ServerSettings()
    log = logging.getLogger("gradwatch.serve")
    if not settings.auth_enabled and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s without GRADWATCH_TOKEN: anyone who can reach it can read and write", args.host)
    app = create_app(settings, dashboard=_dashboard())
    _tune_gc()
    # uvicorn's own frame limit sits above ours so oversized frames get our 1009 + message.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=settings.max_body_bytes + (1 << 20))
    return 0


def _dashboard() -> Callable[[Any], Any] | None:
    """The dashboard's mount function, or None (``/`` then redirects to ``/docs``) when the
    ``[dashboard]`` extra is not installed."""
    try:
        from gradwatch.dashboard.app import mount
    except ImportError as e:
        logging.getLogger("gradwatch.serve").warning("dashboard not available (%s): pip install 'gradwatch[dashboard]'", e)
        return None
    return mount


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
