"""``mount(app)``: the Dash dashboard served by the gradwatch FastAPI app itself, at ``/``.

Dash's native FastAPI backend adds its routes (``/``, ``/_dash-*``, ``/assets/*`` and a GET
catch-all for page URLs such as ``/runs/<id>``) to the server's app. The dashboard reads data only
through the REST API: in-process over :class:`httpx.ASGITransport` from the Python callbacks
(the whole API stack, auth included, without a socket), and with ``fetch``/``WebSocket`` from the
browser's live script. Every asset is served by this process: it works offline.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

import dash
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from gradwatch.dashboard import callbacks, layout
from gradwatch.dashboard.api import PREFIX, Api
from gradwatch.server.api.deps import TOKEN_COOKIE

ASSETS = Path(__file__).with_name("assets")
#: How long the browser keeps the token cookie (seconds).
COOKIE_AGE = 30 * 24 * 3600
_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>gradwatch · sign in</title>
<style>body{{font-family:system-ui,sans-serif;background:#f6f7f9;color:#1d1d24;display:flex;justify-content:center;
padding-top:12vh}}form{{background:#fff;border:1px solid #e6e7eb;border-radius:8px;padding:24px 28px;width:360px}}
input{{width:100%;box-sizing:border-box;padding:7px;margin:8px 0 14px}}.err{{color:#c62828}}</style></head>
<body><form method="post" action="/dashboard/login"><h2>gradwatch</h2>
<p>This server needs an API token (<code>GRADWATCH_TOKEN</code>, or <code>GRADWATCH_READ_TOKEN</code> to view
only). It is kept in an HttpOnly cookie of this browser, never in a URL.</p>{error}
<label for="token">Token</label><input id="token" name="token" type="password" autocomplete="current-password"
autofocus required><button type="submit">Sign in</button></form></body></html>"""


def _request() -> object:
    return dash.get_app().backend.request_adapter()


def mount(app: FastAPI) -> dash.Dash:
    """Create the Dash app on ``app`` (before the server starts; one per FastAPI app)."""
    transport = httpx.ASGITransport(app=app)

    def api_factory() -> Api:
        token = _request().cookies.get(TOKEN_COOKIE)  # type: ignore[attr-defined]
        return Api("http://gradwatch.internal", token=token, transport=transport)

    def server_url() -> str:
        return str(_request().root).rstrip("/")  # type: ignore[attr-defined]

    _login_routes(app, transport)
    d = dash.Dash(__name__, server=app, assets_folder=str(ASSETS), title="gradwatch", update_title=None,
                  suppress_callback_exceptions=True, routes_pathname_prefix="/", serve_locally=True,
                  assets_ignore=PLOTLY_BUNDLE.replace(".", r"\."))
    d.index_string = d.index_string.replace("{%css%}", "{%css%}" + plotly_early(d.config.requests_pathname_prefix))
    d.layout = layout.shell
    callbacks.register(d, api_factory, server_url)
    # Dash does this on the first request to "/" or "/_dash-*"; a first request for a page URL
    # (a shared /runs/<id> link) would otherwise get an index without the assets (no live script).
    d._setup_server()
    return d


#: gradwatch's partial Plotly bundle (``dashboard/plotly-bundle/``: the core, heatmap and treemap),
#: served from the assets folder but not included by Dash (``assets_ignore``): ``plotly_early`` loads it.
PLOTLY_BUNDLE = "plotly-gradwatch.min.js"


def plotly_early(prefix: str) -> str:
    """A script for the page's head that loads Plotly from the first byte on, instead of Dash's copy.

    dcc.Graph loads the plotly wheel's full bundle (4.8 MB; ~1 s of script evaluation per page on
    the 2-core box) only once a graph mounts: after the renderer started, fetched the layout and
    the page's route callback answered; every chart waited on it. Here a partial bundle (1.3 MB,
    ~0.1 s) downloads beside Dash's own scripts and is evaluated while the chart callbacks are on
    the server. Until then ``window.Plotly`` is a promise of it: dcc.Graph takes
    ``Promise.resolve(window.Plotly || <load the full bundle>)``, so it waits on this load and
    never starts its own; the bundle replaces the promise with Plotly itself."""
    url = f"{prefix}assets/{PLOTLY_BUNDLE}"
    return ("<script>(function () { if (window.Plotly) { return; } var s = document.createElement('script'); "
            "window.Plotly = new Promise(function (ok, fail) { s.onload = function () { ok(); }; "
            "s.onerror = function (e) { window.Plotly = undefined; fail(e); }; }); "
            f"s.src = {url!r}; s.async = true; document.head.appendChild(s); }})();</script>")


def _login_routes(app: FastAPI, transport: httpx.AsyncBaseTransport) -> None:
    """``/dashboard/login``: a form that checks a token against the API and keeps it in an
    HttpOnly, SameSite=Strict cookie, which the server accepts as the bearer token (API,
    websockets, Dash callbacks); ``/dashboard/logout`` forgets it. Registered before Dash's
    catch-all page route."""

    @app.get("/dashboard/login", include_in_schema=False)
    def login_form() -> HTMLResponse:
        return HTMLResponse(_LOGIN.format(error=""))

    @app.post("/dashboard/login", include_in_schema=False, response_model=None)
    async def login(request: Request) -> HTMLResponse | RedirectResponse:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        status = 0
        if token and len(token) <= 4096:
            async with httpx.AsyncClient(base_url="http://gradwatch.internal", transport=transport) as http:
                r = await http.get(f"{PREFIX}/runs", params={"limit": 1}, headers={"Authorization": f"Bearer {token}"})
                status = r.status_code
        if status != 200:
            msg = '<p class="err">That token is not valid on this server.</p>'
            return HTMLResponse(_LOGIN.format(error=msg), status_code=401)
        out = RedirectResponse("/", status_code=303)
        out.set_cookie(TOKEN_COOKIE, token, max_age=COOKIE_AGE, path="/", httponly=True, samesite="strict",
                       secure=request.url.scheme == "https")
        return out

    @app.post("/dashboard/logout", include_in_schema=False)
    def logout() -> RedirectResponse:
        out = RedirectResponse("/dashboard/login", status_code=303)
        out.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict")
        return out
