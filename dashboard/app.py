"""``mount(app)``: the Dash dashboard served by the gradwatch FastAPI app itself, at ``/``.

Dash's native FastAPI backend adds its routes (``/``, ``/_dash-*``, ``/assets/*`` and a GET
catch-all for page URLs such as ``/runs/<id>``) to the server's app. The dashboard reads data only
through the REST API: in-process over :class:`httpx.ASGITransport` from the Python callbacks
(the whole API stack, auth included, without a socket), and with ``fetch``/``WebSocket`` from the
browser's live script. Every asset is served by this process: it works offline.
"""

from __future__ import annotations

from pathlib import Path

import dash
import httpx
from fastapi import FastAPI

from gradwatch.dashboard import callbacks, layout
from gradwatch.dashboard.api import Api

ASSETS = Path(__file__).with_name("assets")


def _request() -> object:
    return dash.get_app().backend.request_adapter()


def mount(app: FastAPI) -> dash.Dash:
    """Create the Dash app on ``app`` (before the server starts; one per FastAPI app)."""
    transport = httpx.ASGITransport(app=app)

    def api_factory() -> Api:
        token = _request().cookies.get(callbacks.TOKEN_COOKIE)  # type: ignore[attr-defined]
        return Api("http://gradwatch.internal", token=token, transport=transport)

    def server_url() -> str:
        return str(_request().root).rstrip("/")  # type: ignore[attr-defined]

    d = dash.Dash(__name__, server=app, assets_folder=str(ASSETS), title="gradwatch", update_title=None,
                  suppress_callback_exceptions=True, routes_pathname_prefix="/", serve_locally=True)
    d.layout = layout.shell
    callbacks.register(d, api_factory, server_url)
    # Dash does this on the first request to "/" or "/_dash-*"; a first request for a page URL
    # (a shared /runs/<id> link) would otherwise get an index without the assets (no live script).
    d._setup_server()
    return d
