"""The dashboard's only way to data: a small client of the server's REST API (``/api/v1``).

Everything the Python side of the dashboard reads goes through :class:`Api`, so a change of the
API (a new envelope, a new endpoint) is adapted here and nowhere else. Non-finite values arrive as
the strings ``"NaN"``/``"Infinity"``/``"-Infinity"``; :func:`num` turns them into floats.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx

PREFIX = "/api/v1"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ApiError(Exception):
    """The API answered an error (``status`` 0: it could not be reached at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def num(v: Any) -> float | None:
    """A value of the API as a float: ``None`` stays ``None``, the non-finite strings become floats."""
    if v is None:
        return None
    if isinstance(v, str):
        return _NONFINITE.get(v, math.nan)
    return float(v)


class Api:
    """Async client bound to one base URL and (optionally) one bearer token.

    Inside the server the dashboard passes ``transport=httpx.ASGITransport(app)``: requests go
    through the whole API stack (auth, validation, encoding) without a socket, and a callback never
    waits on its own process's listening port."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 20.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/") + PREFIX, headers=headers, timeout=timeout,
                                  transport=transport)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _get(self, path: str, params: Any = None, *, missing_ok: bool = False) -> Any:
        try:
            r = await self._http.get(path, params=params)
        except httpx.HTTPError as e:
            raise ApiError(0, f"the server is unreachable ({type(e).__name__}: {e})") from e
        if r.status_code >= 400:
            try:
                detail = str(r.json().get("detail", r.text))
            except ValueError:
                detail = r.text
            # an unknown path (an older server) is not a missing run: ``missing_ok`` says so by None
            if missing_ok and r.status_code == 404 and not detail.startswith("run "):
                return None
            raise ApiError(r.status_code, detail[:500])
        return r.json()

    # -- runs ---------------------------------------------------------------------------------
    async def runs(self, *, limit: int = 1000, **filters: str) -> list[dict[str, Any]]:
        params = {"limit": limit, **{k: v for k, v in filters.items() if v}}
        return list((await self._get("/runs", params))["data"])

    async def run(self, run_id: str) -> dict[str, Any]:
        return dict(await self._get(f"/runs/{run_id}"))

    async def layers(self, run_id: str) -> list[dict[str, Any]]:
        out = await self._get(f"/runs/{run_id}/layers")
        return list(out["data"] if isinstance(out, dict) else out)  # {"data", "count"} or a bare list

    # -- series -------------------------------------------------------------------------------
    async def heatmap(self, run_id: str, stat: str = "l2", *, start: int | None = None, end: int | None = None,
                max_points: int | None = None, agg: str = "max") -> dict[str, Any]:
        params = _clean(stat=stat, start=start, end=end, max_points=max_points, agg=agg)
        return dict(await self._get(f"/runs/{run_id}/heatmap", params))

    async def layer_stats(self, run_id: str, layer: str | int, stat: str, *, start: int | None = None,
                    end: int | None = None, max_points: int | None = None) -> dict[str, Any]:
        params = _clean(layer=str(layer), stat=stat, start=start, end=end, max_points=max_points)
        series = (await self._get(f"/runs/{run_id}/stats", params))["series"]
        return dict(series[0]) if series else {"downsampled": False, "points": []}

    async def steps(self, run_id: str, fields: list[str] | None = None, *, start: int | None = None,
              end: int | None = None, max_points: int | None = None) -> dict[str, Any]:
        params = _clean(fields=",".join(fields) if fields else None, start=start, end=end, max_points=max_points)
        return dict(await self._get(f"/runs/{run_id}/steps", params))

    async def scalar_keys(self, run_id: str) -> list[str]:
        return list((await self._get(f"/runs/{run_id}/scalars"))["keys"])

    async def scalar(self, run_id: str, key: str, *, start: int | None = None, end: int | None = None,
               max_points: int | None = None) -> dict[str, Any]:
        params = _clean(key=key, start=start, end=end, max_points=max_points)
        return dict(await self._get(f"/runs/{run_id}/scalars", params))

    async def transforms(self, run_id: str, *, start: int | None = None, end: int | None = None,
                         max_points: int | None = None) -> dict[str, Any] | None:
        """Every value each transform of the run reported, as ``{"series": [{transform, field,
        ...series}, ...]}`` (one request for the list, one per transform), or ``None`` where the
        server has no such endpoint."""
        listing = await self._get(f"/runs/{run_id}/transforms", missing_ok=True)
        if listing is None:
            return None
        params = _clean(start=start, end=end, max_points=max_points)
        names = list((listing.get("transforms") or {}).keys())
        got = await asyncio.gather(*[self._get(f"/runs/{run_id}/transforms", {**params, "transform": t})
                                     for t in names])
        return {"series": [s for g in got for s in g.get("series") or []]}

    async def events(self, run_id: str, kinds: list[str] | None = None, *, start: int | None = None,
               end: int | None = None, limit: int = 10_000, severity: str | None = None,
               source: str | None = None) -> list[dict[str, Any]]:
        """Events in step order (``severity``: that severity or worse; ``source``: agent or detector)."""
        params = _clean(kind=kinds or None, start=start, end=end, limit=limit, severity=severity, source=source)
        return list((await self._get(f"/runs/{run_id}/events", params))["data"])


def _clean(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}
