"""Ingest: ``POST /ingest``, ``GET /ingest/ack`` and the agent's stream ``WS /ingest/ws``.

Decoding goes only through :mod:`gradwatch.agent.wire`. Status codes: 400 not JSON, 413 too big,
422 schema or wire-version error (the WireError message), 409 conflicting data, 503 storage down.
A payload that trips anything else while it is decoded is still the payload's fault: 422, never a
500 (the agent resends 5xx forever, so a 5xx for bad data would wedge its stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from gradwatch.agent.wire import MAX_DEPTH, MAX_RANK, Batch, WireError, batch_from_dict, validate_run_id
from gradwatch.server.api.deps import (
    ERRORS,
    AppState,
    ErrorBody,
    access_level,
    require_read,
    require_write,
    state,
)
from gradwatch.server.errors import DomainError
from gradwatch.server.live import message_from_batch
from gradwatch.server.repo.ingest import (
    Prepared,
    RowsOverlap,
    prepare_batch,
    prepare_known,
    read_acked,
    remember_layers,
    store_batch,
)
from gradwatch.server.schemas import RUN_ID_PATTERN

log = logging.getLogger(__name__)
router = APIRouter(tags=["ingest"])

#: Frames decoded ahead of the batch being stored, per connection.
_PIPELINE = 4
#: Batches of one stream written at once on PostgreSQL.
_STORES_IN_FLIGHT = 2
_CLOSE_CODES = {400: 1007, 422: 1007, 413: 1009, 409: 1007, 500: 1011, 503: 1011}


class ByteBudget:
    """Ingest bytes being decoded and stored at once (one per app, used on its event loop).

    A batch costs a few times its encoded size while it is parsed, validated and stored, so
    bounding the bytes in flight bounds the server's peak memory whatever the number of clients.
    ``take`` waits until the bytes fit (one payload larger than the whole budget takes all of it).
    After a burst, freed heap is handed back to the OS (glibc keeps it otherwise).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._freed = asyncio.Event()
        self._since_trim = 0

    async def take(self, n: int, timeout: float | None = None) -> int | None:
        """Reserve ``n`` bytes (capped at the total); the amount to release, or None on timeout."""
        n = min(n, self.total)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while self.used and self.used + n > self.total:
            freed = self._freed
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                return None
            try:
                await asyncio.wait_for(freed.wait(), left)
            except asyncio.TimeoutError:
                return None
        self.used += n
        return n

    def release(self, n: int) -> None:
        if not n:
            return
        self.used -= n
        self._since_trim += n
        self._freed.set()  # wakes every waiter; each checks again
        self._freed = asyncio.Event()
        if self.used == 0 and self._since_trim >= _TRIM_AFTER:
            self._since_trim = 0
            asyncio.get_running_loop().run_in_executor(None, _malloc_trim)


#: Bytes of payload released since the last trim before the heap is trimmed again.
_TRIM_AFTER = 16 << 20


def _malloc_trim() -> None:
    """Return freed heap to the OS (glibc only; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class IngestLimits:
    """The app's ingest bounds: bytes in flight and websockets per client."""

    def __init__(self, settings: Any) -> None:
        self.budget = ByteBudget(settings.ingest_max_inflight_bytes)
        self.max_connections = settings.ingest_max_connections
        self.connections: dict[str, int] = {}


def limits(conn: Request | WebSocket) -> IngestLimits:
    st = conn.app.state
    lim = getattr(st, "gw_ingest_limits", None)
    if lim is None:
        lim = st.gw_ingest_limits = IngestLimits(state(conn).settings)
    return lim


def _client_key(conn: WebSocket) -> str:
    """Who a connection counts against: its bearer token when it sends one, else its address."""
    auth = conn.headers.get("authorization")
    if auth:
        import hashlib

        return "token:" + hashlib.sha256(auth.encode()).hexdigest()[:16]
    return "addr:" + (conn.client.host if conn.client else "?")


class IngestFailure(Exception):
    def __init__(self, status: int, message: str, kind: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.seq = status, message, kind, seq


def _parse(gw: AppState, holder: list[bytes | str]) -> Any:
    """Parse the one payload in ``holder``, which this function empties.

    ``json.loads`` of bytes decodes them to a str first and keeps both alive while it parses;
    decoding here (as it would) and dropping the bytes before parsing saves one copy of the
    payload at the peak. The caller must hold no other reference for that to happen."""
    data = holder.pop()
    try:
        if not isinstance(data, str):
            data = data.decode(json.detect_encoding(data), "surrogatepass")  # what json.loads does
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        gw.metrics.error("json")
        raise IngestFailure(400, f"batch: not valid JSON ({e})", "json") from None
    except RecursionError:  # valid JSON, but deeper than the parser goes (and than any batch is)
        gw.metrics.error("schema")
        raise IngestFailure(422, f"batch: nested too deeply (free-form values hold at most {MAX_DEPTH} levels)",
                            "schema") from None


def decode_object(gw: AppState, obj: Any) -> Batch:
    """Validate one parsed batch through the wire schema (its steps are dropped from ``obj`` as
    they are decoded). Raises IngestFailure (422)."""
    try:
        return batch_from_dict(obj, packed_as_array=True, consume=True)
    except WireError as e:
        gw.metrics.error("schema")
        raise IngestFailure(422, str(e), "schema", _seq_of(obj)) from None
    except Exception as e:  # a wire bug this payload found: still the payload's 422, never a 500
        gw.metrics.error("schema")
        log.exception("decoding a batch raised %s (not a WireError)", type(e).__name__)
        raise IngestFailure(422, f"batch: could not be decoded ({type(e).__name__}: {str(e)[:120]})", "schema",
                            _seq_of(obj)) from None


def _seq_of(obj: Any) -> int | None:
    return obj.get("seq") if isinstance(obj, dict) and type(obj.get("seq")) is int else None


def decode_frame(gw: AppState, data: list[bytes | str]) -> Prepared | dict[str, Any]:
    """Parse, validate and prepare one websocket frame (in a worker thread): a Prepared batch,
    or a hello dict. ``data`` holds the frame and is emptied (see :func:`_parse`)."""
    obj = _parse(gw, data)
    if isinstance(obj, dict) and obj.get("type") == "hello":
        return obj
    batch = decode_object(gw, obj)
    del obj
    try:
        known = prepare_known(gw.db.key, batch, not gw.db.sqlite)
        if known is not None:
            return known
        with gw.db.read() as conn:
            return prepare_batch(conn, batch)
    except Exception:  # the database is down: storing will say so (503)
        log.debug("preparing batch %s/%s failed", batch.run.run_id, batch.seq, exc_info=True)
        return Prepared(batch)


def store(gw: AppState, item: Batch | Prepared, t0: float) -> dict[str, Any]:
    """Store one decoded batch in its own transaction and publish it live. Raises IngestFailure."""
    batch, prepared = (item.batch, item) if isinstance(item, Prepared) else (item, None)
    try:
        try:
            with gw.db.write() as conn:
                res = store_batch(conn, batch, origin=gw.hub.origin, prepared=prepared,
                                  detect=gw.settings.detectors_enabled)
        except RowsOverlap:  # rare: rows resent under a new seq; retry with ON CONFLICT DO NOTHING
            with gw.db.write() as conn:
                res = store_batch(conn, batch, origin=gw.hub.origin, upsert=True,
                                  detect=gw.settings.detectors_enabled)
        remember_layers(gw.db.key, res)  # (committed)
    except DomainError as e:
        gw.metrics.error("conflict")
        raise IngestFailure(e.status, e.message, "conflict", batch.seq) from None
    except Exception as e:
        gw.metrics.error("storage")
        log.exception("storing batch %s/%s/%s failed", batch.run.run_id, batch.source, batch.seq)
        raise IngestFailure(503, f"storage unavailable: {type(e).__name__}", "storage", batch.seq) from None
    gw.metrics.observe_batch(res.rows, time.perf_counter() - t0, res.duplicate)
    if not res.duplicate and gw.hub.has_subscribers(res.run_id):
        gw.hub.publish(res.run_id, message_from_batch(batch, layers=gw.hub.wants_layers(res.run_id)))
    return {"run_id": res.run_id, "source": res.source, "seq": res.seq, "acked": res.acked,
            "duplicate": res.duplicate, "rows": res.rows}


def ingest_bytes(gw: AppState, data: list[bytes | str]) -> dict[str, Any]:
    """Parse, validate and store one POSTed batch (runs in a worker thread). Raises IngestFailure.

    ``data`` is a one-item list that this function empties: the body's bytes are freed before
    they are parsed instead of living on beside the parsed and decoded batch (:func:`_parse`)."""
    t0 = time.perf_counter()
    obj = _parse(gw, data)
    batch = decode_object(gw, obj)
    del obj
    return store(gw, batch, t0)


class IngestAck(BaseModel):
    run_id: str
    source: int
    seq: int
    acked: int
    duplicate: bool
    rows: int


class AckState(BaseModel):
    run_id: str
    source: int
    acked: int


_BATCH_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "An encoded gradwatch.agent.wire Batch (wire_version 1)."}}}}}


@router.post("/ingest", response_model=IngestAck, dependencies=[Depends(require_write)], openapi_extra=_BATCH_BODY,
             responses={**ERRORS, 409: {"model": ErrorBody}, 413: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def ingest(request: Request) -> Any:
    """Store one batch; resending it changes nothing (``duplicate: true``)."""
    gw = state(request)
    limit = gw.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        gw.metrics.error("too_large")
        return JSONResponse({"detail": f"batch: body of {declared} bytes exceeds the limit of {limit}"}, 413)
    budget = limits(request).budget
    held = 0
    if declared and declared.isdigit():  # wait for room before reading the body
        got = await budget.take(int(declared), gw.settings.ingest_wait_seconds)
        if got is None:
            return _busy(gw)
        held = got
    try:
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                gw.metrics.error("too_large")
                return JSONResponse({"detail": f"batch: body exceeds the limit of {limit} bytes"}, 413)
            chunks.append(chunk)
        if size > held:  # chunked, or longer than declared
            got = await budget.take(size - held, gw.settings.ingest_wait_seconds)
            if got is None:
                return _busy(gw)
            held += got
        body: list[bytes | str] = [b"".join(chunks)]
        chunks.clear()  # one copy of the body, handed over (and dropped once parsed)
        try:
            return await run_in_threadpool(ingest_bytes, gw, body)
        except IngestFailure as e:
            return JSONResponse({"detail": e.message}, e.status)
    finally:
        budget.release(held)


def _busy(gw: AppState) -> JSONResponse:
    gw.metrics.error("busy")
    return JSONResponse({"detail": "server busy: too many ingest bytes in flight; retry later"}, 503,
                        headers={"Retry-After": "1"})


@router.get("/ingest/ack", response_model=AckState, dependencies=[Depends(require_read)], responses=ERRORS)
def ingest_ack(request: Request, run_id: str = Query(..., pattern=RUN_ID_PATTERN),
               source: int = Query(0, ge=0, le=1 << 20)) -> Any:
    """Highest contiguous seq stored for (run, source); 0 if nothing."""
    with state(request).db.read() as conn:
        return {"run_id": run_id, "source": source, "acked": read_acked(conn, run_id, source)}


async def _fail(ws: WebSocket, status: int, message: str, seq: int | None) -> None:
    code = _CLOSE_CODES.get(status, 1007)
    try:
        await ws.send_json({"type": "error", "seq": seq, "status": status, "error": message})
        await ws.close(code=code, reason=message.encode()[:120].decode(errors="ignore"))
    except Exception:  # the client went away first
        pass


@router.websocket("/ingest/ws")
async def ingest_ws(ws: WebSocket) -> None:
    """The agent's stream: one encoded batch per frame, one ack per batch, in order.

    Frames are parsed and validated in worker threads while the previous batch is being
    stored (decoding and storing overlap on two cores); storing and acks stay strictly in order.
    Every way a connection ends on the server's side sends an error message and a close frame
    with a code (1007 bad data, 1009 too big, 1011 server error) and a reason.
    """
    gw = state(ws)
    await ws.accept()
    level = access_level(ws)
    if level != "write":
        gw.metrics.error("auth")
        reason = "missing or invalid bearer token" if level == "none" else "this token grants read-only access"
        await ws.close(code=1008, reason=reason)
        return
    lim = limits(ws)
    key = _client_key(ws)
    if lim.connections.get(key, 0) >= lim.max_connections:
        gw.metrics.error("busy")
        await ws.close(code=1013, reason=f"too many ingest connections from this client (at most "
                                         f"{lim.max_connections}); retry later")
        return
    lim.connections[key] = lim.connections.get(key, 0) + 1
    try:
        await _stream(ws, gw, lim.budget)
    finally:
        lim.connections[key] -= 1
        if not lim.connections[key]:
            del lim.connections[key]


_IDLE = (0.0, None, 0)


async def _stream(ws: WebSocket, gw: AppState, budget: ByteBudget) -> None:
    limit = gw.settings.max_body_bytes
    idle = gw.settings.ingest_idle_timeout
    pending: asyncio.Queue[tuple[float, asyncio.Future[Any] | None, int] | None] = asyncio.Queue(_PIPELINE)
    held: dict[int, int] = {}  # frame number -> bytes it holds of the budget
    tokens = iter(range(1 << 62))

    def free(tok: int) -> None:
        budget.release(held.pop(tok, 0))

    async def receive() -> None:
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), idle)
                except asyncio.TimeoutError:
                    await pending.put(_IDLE)
                    return
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("text")
                if data is None:
                    data = msg.get("bytes") or b""
                t0 = time.perf_counter()
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                if len(data) > limit:
                    gw.metrics.error("too_large")
                    fut.set_exception(IngestFailure(
                        413, f"batch: frame of {len(data)} bytes exceeds the limit of {limit}", "too_large"))
                    await pending.put((t0, fut, -1))
                    break
                tok = next(tokens)
                # back-pressure: no more frames are read from this socket until the bytes fit
                held[tok] = await budget.take(len(data)) or 0
                # the frame is handed over in a list that decode_frame empties: no reference stays
                # here (while waiting for the next frame) or in the worker call's arguments
                job = run_in_threadpool(decode_frame, gw, [data])
                del msg, data
                await pending.put((t0, asyncio.ensure_future(job), tok))
        except WebSocketDisconnect:
            pass
        except Exception:  # the main loop still ends (below), and says so to the client
            log.exception("receiving from an ingest stream failed")
        await pending.put(None)

    receiver = asyncio.ensure_future(receive())
    # PostgreSQL: a batch whose layers all exist may be written while the one before it commits
    # (acks still go out in order); SQLite has one writer, so batches go one at a time.
    inflight: deque[asyncio.Future[Any]] = deque()
    overlap = 1 if gw.db.sqlite else _STORES_IN_FLIGHT
    reported: dict[tuple[str, int], int] = {}

    async def settle() -> bool:
        """Answer the oldest store in flight; False when the connection must end."""
        try:
            ack = await inflight.popleft()
        except IngestFailure as e:
            if e.status == 409:  # the batch is refused, the stream is fine
                await ws.send_json({"type": "error", "seq": e.seq, "status": 409, "error": e.message})
                return True
            await _fail(ws, e.status, e.message, e.seq)
            return False
        ack.pop("rows", None)
        # Batches written side by side may commit out of order, so a later batch can see an
        # older ``acked``; the stored cursor only grows, and so must what the client is told.
        key = (ack["run_id"], ack["source"])
        ack["acked"] = reported[key] = max(ack["acked"], reported.get(key, 0))
        await ws.send_json({"type": "ack", **ack})
        return True

    async def settle_all() -> bool:
        while inflight:
            if not await settle():
                return False
        return True

    getter: asyncio.Future[Any] | None = None
    try:
        while True:
            if getter is None:
                getter = asyncio.ensure_future(pending.get())
            if inflight:  # answer stores as they finish, also while no new frame comes
                await asyncio.wait((getter, inflight[0]), return_when=asyncio.FIRST_COMPLETED)
                if inflight[0].done():
                    if not await settle():
                        return
                    continue
            item = await getter
            getter = None
            if item is None:
                await settle_all()
                return
            t0, fut, tok = item
            if fut is None:  # no frame for ``idle`` seconds
                if await settle_all():
                    gw.metrics.error("idle")
                    with contextlib.suppress(Exception):
                        await ws.close(code=1001, reason=f"idle for {idle:g} s; reconnect to send more")
                return
            try:
                decoded = await fut
            except IngestFailure as e:
                free(tok)
                if await settle_all():
                    await _fail(ws, e.status, e.message, e.seq)
                return
            except Exception as e:  # decode_frame's own guards missed it: a server bug
                free(tok)
                log.exception("decoding an ingest frame failed")
                gw.metrics.error("internal")
                if await settle_all():
                    await _fail(ws, 500, f"server error while decoding the frame ({type(e).__name__})", None)
                return
            if isinstance(decoded, dict):
                free(tok)
                if not await settle_all():
                    return
                try:
                    reply = await run_in_threadpool(_hello, gw, decoded)
                except IngestFailure as e:
                    await _fail(ws, e.status, e.message, e.seq)
                    return
                except Exception as e:
                    log.exception("answering an ingest hello failed")
                    gw.metrics.error("internal")
                    await _fail(ws, 500, f"server error while answering hello ({type(e).__name__})", None)
                    return
                await ws.send_json(reply)
                continue
            cap = overlap if decoded.layers_known else 1
            while len(inflight) >= cap:
                if not await settle():
                    return
            stored = asyncio.ensure_future(run_in_threadpool(store, gw, decoded, t0))
            stored.add_done_callback(lambda _, tok=tok: free(tok))  # type: ignore[misc]
            inflight.append(stored)
            while inflight and inflight[0].done():
                if not await settle():
                    return
    except WebSocketDisconnect:
        return
    except Exception as e:  # a send after the client left (RuntimeError) or a server bug: close with a reason
        if type(e) is not RuntimeError:
            log.exception("ingest stream failed")
            gw.metrics.error("internal")
        await _fail(ws, 500, f"server error ({type(e).__name__})", None)
    finally:
        for f in (*inflight, getter):
            if f is not None:
                f.cancel()
        receiver.cancel()
        with contextlib.suppress(BaseException):
            await receiver
        for tok in list(held):
            free(tok)


def _hello(gw: AppState, obj: dict[str, Any]) -> dict[str, Any]:
    """The ack cursor of ``{type: hello, run_id, source}``, checked as strictly as a batch's run and
    source (an id the database cannot hold would otherwise fail inside the query)."""
    try:
        run_id = validate_run_id(obj.get("run_id"), "hello.run_id")
    except WireError as e:
        gw.metrics.error("schema")
        raise IngestFailure(422, str(e), "schema") from None
    source = obj.get("source", 0)
    if type(source) is not int or not 0 <= source <= MAX_RANK:
        gw.metrics.error("schema")
        got = str(source)[:40] if type(source) is int else type(source).__name__
        raise IngestFailure(422, f"hello.source: expected an integer in [0, {MAX_RANK}], got {got}", "schema")
    try:
        with gw.db.read() as conn:
            acked = read_acked(conn, run_id, source)
    except Exception as e:
        gw.metrics.error("storage")
        log.exception("reading the ack cursor of %s/%s failed", run_id, source)
        raise IngestFailure(503, f"storage unavailable: {type(e).__name__}", "storage") from None
    return {"type": "ack", "run_id": run_id, "source": source, "seq": None, "acked": acked, "duplicate": False}
