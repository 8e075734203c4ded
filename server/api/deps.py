"""Shared route plumbing: app state, auth dependencies, error bodies."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from gradwatch.server.db.engine import Database
from gradwatch.server.live import LiveHub
from gradwatch.server.metrics import Metrics
from gradwatch.server.settings import ServerSettings


@dataclass
class AppState:
    """What the lifespan builds and the routes use (on ``app.state.gw``)."""

    settings: ServerSettings
    db: Database
    metrics: Metrics
    hub: LiveHub


class ErrorBody(BaseModel):
    detail: str


#: Documented error responses shared by the routes.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 403: {"model": ErrorBody},
    404: {"model": ErrorBody}, 422: {"model": ErrorBody},
}


def state(conn: HTTPConnection) -> AppState:
    return conn.app.state.gw


#: HttpOnly cookie holding the dashboard's token (set by its sign-in form, ``/dashboard/login``).
#: Read as the bearer token when a request has no Authorization header: API calls, websockets
#: and Dash callbacks of a signed-in browser. It is ``SameSite=Strict``, so another site's page
#: cannot make the browser send it (no cross-site request or websocket carries it).
TOKEN_COOKIE = "gradwatch_token"


def _bearer(conn: HTTPConnection) -> str | None:
    h = conn.headers.get("authorization")
    if not h:
        return conn.cookies.get(TOKEN_COOKIE) or None
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def access_level(conn: HTTPConnection) -> str:
    """``write``, ``read`` or ``none`` for this request's credentials (constant-time comparison)."""
    s = state(conn).settings
    if not s.auth_enabled:
        return "write"
    token = _bearer(conn)
    if token is None:
        return "none"
    t = token.encode()
    if s.token and hmac.compare_digest(t, s.token.encode()):
        return "write"
    if s.read_token and hmac.compare_digest(t, s.read_token.encode()):
        return "read"
    return "none"


def _unauthorized(conn: HTTPConnection) -> HTTPException:
    msg = "missing bearer token" if _bearer(conn) is None else "invalid bearer token"
    return HTTPException(401, msg, headers={"WWW-Authenticate": "Bearer"})


def require_read(request: Request) -> None:
    if access_level(request) == "none":
        raise _unauthorized(request)


def require_write(request: Request) -> None:
    level = access_level(request)
    if level == "none":
        raise _unauthorized(request)
    if level != "write":
        raise HTTPException(403, "this token grants read-only access")
