"""``WS /runs/{run_id}/live``: pushes each batch ingested for the run (any server process)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from gradwatch.server.api.deps import access_level, state
from gradwatch.server.live import LIVE_LAYER_STATS, project

router = APIRouter(tags=["live"])


@router.websocket("/runs/{run_id}/live")
async def live(ws: WebSocket, run_id: str, layers: str = "") -> None:
    """Each ingested batch's steps, events and scalars as JSON messages. ``?layers=l2,maxabs``
    (or ``all``) adds every step's per-layer statistics, column-wise under ``layers`` with the
    layers' ``index``; by default they are left out (hundreds of values per step)."""
    gw = state(ws)
    await ws.accept()
    if access_level(ws) == "none":
        await ws.close(code=1008, reason="missing or invalid bearer token")
        return
    wanted = [x.strip() for x in layers.split(",") if x.strip()]
    stats = LIVE_LAYER_STATS if wanted == ["all"] else tuple(dict.fromkeys(wanted))
    bad = [x for x in stats if x not in LIVE_LAYER_STATS]
    if bad:
        reason = f"layers: unknown statistic(s) {bad[:3]}; expected 'all' or some of {list(LIVE_LAYER_STATS)}"
        await ws.close(code=1008, reason=reason[:120])  # a close reason holds at most 123 bytes
        return
    q = gw.hub.subscribe(run_id, layers=bool(stats))
    receiver = asyncio.ensure_future(ws.receive())  # completes when the client disconnects
    try:
        await ws.send_json({"type": "subscribed", "run_id": run_id})
        while True:
            getter = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                getter.cancel()
                msg = receiver.result()
                if msg["type"] == "websocket.disconnect":
                    return
                receiver = asyncio.ensure_future(ws.receive())  # ignore client chatter
                if getter.done() and not getter.cancelled():
                    await ws.send_json(project(getter.result(), stats))
                continue
            await ws.send_json(project(getter.result(), stats))
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        gw.hub.unsubscribe(run_id, q)
        receiver.cancel()
        with contextlib.suppress(BaseException):
            await receiver
