"""``WS /runs/{run_id}/live``: pushes each batch ingested for the run (any server process)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from gradwatch.server.api.deps import access_level, state

router = APIRouter(tags=["live"])


@router.websocket("/runs/{run_id}/live")
async def live(ws: WebSocket, run_id: str) -> None:
    gw = state(ws)
    await ws.accept()
    if access_level(ws) == "none":
        await ws.close(code=1008, reason="missing or invalid bearer token")
        return
    q = gw.hub.subscribe(run_id)
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
                    await ws.send_json(getter.result())
                continue
            await ws.send_json(getter.result())
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        gw.hub.unsubscribe(run_id, q)
        receiver.cancel()
        with contextlib.suppress(BaseException):
            await receiver
