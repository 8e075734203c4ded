"""Live fan-out of ingested batches to ``WS /runs/{id}/live`` subscribers.

Each process keeps an in-process hub of subscriber queues. The process that stores a batch
publishes it to its own hub directly. On PostgreSQL it also sends ``NOTIFY gradwatch_ingest``
(inside the ingest transaction, so it is delivered only on commit) with a small payload
``{origin, run_id, source, seq}``; every other server process LISTENs, and if it has subscribers
for that run, reads the batch's rows back from the database. Payloads stay far below NOTIFY's
8000-byte limit whatever the batch size. NOTIFY is not kept for a connection that is gone: a
listener whose connection broke reads, once it listens again, the rows of the batches received
meanwhile for every run it has subscribers for (the hub drops what they already have).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import threading
import time
import uuid
from typing import Any

from sqlalchemy import Connection, Engine, text

from gradwatch.agent.spec import DERIVED_LAYER_FIELDS, LAYER_FIELDS, with_derived
from gradwatch.agent.wire import Batch
from gradwatch.server.db.models import LAYER_FLOAT_COLUMNS, STEP_FLOAT_COLUMNS
from gradwatch.server.encoding import enc, enc_nan, enc_value
from gradwatch.server.repo.ingest import NOTIFY_CHANNEL, scalar_reports

log = logging.getLogger(__name__)

_STEP_FIELDS = STEP_FLOAT_COLUMNS
_QUEUE_SIZE = 1000
#: A listener back from a lost connection relays the batches received from this long before it
#: found the connection broken: a break is seen a little after it happens, a batch's
#: ``received_at`` is taken before its commit, and the storing process's clock may differ a
#: little from this one's.
_CATCH_UP_MARGIN_S = 10.0


#: Stored per-layer fields the live stream carries (the spec's, in spec order).
_LIVE_STORED: tuple[str, ...] = tuple(f.name for f in LAYER_FIELDS if "live" in f.expose)
#: Per-layer statistics a live subscriber may ask for (``?layers=l2,maxabs``): stored and derived.
LIVE_LAYER_STATS: tuple[str, ...] = _LIVE_STORED + tuple(d.name for d in DERIVED_LAYER_FIELDS if "live" in d.expose)
_FLOAT_STATS = frozenset(LAYER_FLOAT_COLUMNS) | {d.name for d in DERIVED_LAYER_FIELDS}


def _layer_block(ids: list[int], cols: dict[str, Any]) -> dict[str, Any]:
    """One step's per-layer statistics, column-wise: ``index`` (the layer's index in the run's
    layer table) and one list per statistic, NaN/inf as strings like everywhere in the API."""
    out: dict[str, Any] = {"index": list(ids)}
    if "m2" in cols and "numel" in cols:
        cols = with_derived({k: list(v) for k, v in cols.items()})
    for k in LIVE_LAYER_STATS:
        v = cols.get(k)
        if v is not None:
            out[k] = [enc(x) for x in v] if k in _FLOAT_STATS else [None if x is None else int(x) for x in v]
    return out


def project(message: dict[str, Any], stats: tuple[str, ...]) -> dict[str, Any]:
    """``message`` as one subscriber asked for it: per-layer blocks cut to ``stats`` (none: no
    ``layers`` key at all). The hub builds each message once for every subscriber of a run."""
    if not any("layers" in st for st in message.get("steps", ())):
        return message
    steps = []
    for st in message["steps"]:
        st = dict(st)
        blk = st.pop("layers", None)
        if stats and blk is not None:
            st["layers"] = {"index": blk["index"], **{k: blk[k] for k in stats if k in blk}}
        steps.append(st)
    return {**message, "steps": steps}


def _scalar_reports(tr: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each transform's scalar values of one step (what ``/transforms`` serves), NaN/inf as strings."""
    return {name: {k: enc(v) for k, v in vals.items()} for name, vals in scalar_reports(tr).items()}


def message_from_batch(batch: Batch, layers: bool = False) -> dict[str, Any]:
    """The live message for a batch this process just stored (``layers``: with every step's
    per-layer statistics, when some subscriber asked for them)."""
    return {
        "type": "batch", "run_id": batch.run.run_id, "source": batch.source, "seq": batch.seq,
        "steps": [{"step": s.step, "time": s.time, "rank": s.rank, **{f: enc(getattr(s, f)) for f in _STEP_FIELDS},
                   "skipped": s.skipped, "transforms": _scalar_reports(s.transforms),
                   **({"layers": _layer_block(s.layer_ids, s.layers)} if layers else {})} for s in batch.steps],
        "events": [{"kind": e.kind, "step": e.step, "time": e.time, "rank": e.rank, "data": enc_value(e.data)}
                   for e in batch.events],
        "scalars": [{"step": s.step, "time": s.time, "rank": s.rank, "values": enc_value(s.values)}
                    for s in batch.scalars],
    }


def message_from_db(conn: Connection, run_id: str, source: int, seq: int,
                    ranks: list[int] | None = None, layers: bool = False) -> dict[str, Any] | None:
    """The live message for a batch stored by another process: the rows of the batch's ranks
    (``ranks``; default ``[source]``) within its step range (``layers``: per-layer rows too)."""
    row = conn.execute(text("SELECT step_min, step_max FROM ingest_batch WHERE run_id = :r AND source = :s "
                            "AND seq = :q"), {"r": run_id, "s": source, "q": seq}).first()
    if row is None:
        return None
    return message_for_steps(conn, run_id, source, seq, row.step_min, row.step_max, ranks or [source], layers)


def message_for_steps(conn: Connection, run_id: str, source: int, seq: int, step_min: int | None,
                      step_max: int | None, ranks: list[int] | None, layers: bool = False) -> dict[str, Any]:
    """A live message of the run's stored rows in ``[step_min, step_max]`` of ``ranks`` (None: every
    rank), labelled with ``source`` and ``seq``."""
    msg: dict[str, Any] = {"type": "batch", "run_id": run_id, "source": source, "seq": seq,
                           "steps": [], "events": [], "scalars": []}
    if step_min is None or step_max is None:
        return msg
    rk = _rank_filter(ranks, "rank")
    p = {"r": run_id, "a": step_min, "b": step_max}
    for r in conn.execute(text(f"SELECT step, time, rank, skipped, nan_mask, {', '.join(_STEP_FIELDS)} "
                               f"FROM step_record WHERE run_id = :r {rk} AND "
                               "step BETWEEN :a AND :b ORDER BY step"), p):
        st: dict[str, Any] = {"step": r.step, "time": r.time, "rank": r.rank}
        for bit, f in enumerate(_STEP_FIELDS):
            st[f] = enc_nan(getattr(r, f), bool(r.nan_mask & (1 << bit)))
        st["skipped"] = bool(r.skipped)
        st["transforms"] = {}
        msg["steps"].append(st)
    by_step = {(st["step"], st["rank"]): st for st in msg["steps"]}
    for r in conn.execute(text(f"SELECT step, rank, transform, field, value, is_nan FROM transform_value WHERE "
                               f"run_id = :r {rk} AND step BETWEEN :a AND :b"), p):
        owner = by_step.get((r.step, r.rank))
        if owner is not None:
            owner["transforms"].setdefault(r.transform, {})[r.field] = enc_nan(r.value, bool(r.is_nan))
    if layers and msg["steps"]:
        _layers_from_db(conn, msg["steps"], run_id, ranks, p)
    # the batch's own (agent) events, as the in-process path sends; detector events are read over REST
    for r in conn.execute(text(f"SELECT kind, step, time, rank, data FROM event WHERE run_id = :r {rk} "
                               "AND source = 'agent' AND step BETWEEN :a AND :b ORDER BY step, id"), p):
        data = json.loads(r.data) if isinstance(r.data, str) else r.data
        msg["events"].append({"kind": r.kind, "step": r.step, "time": r.time, "rank": r.rank, "data": data or {}})
    scalars: dict[tuple[int, int], dict[str, Any]] = {}
    for r in conn.execute(text(f"SELECT key, step, time, rank, value, is_nan FROM scalar WHERE run_id = :r {rk} "
                               "AND step BETWEEN :a AND :b ORDER BY step, key"), p):
        s = scalars.setdefault((r.step, r.rank), {"step": r.step, "time": r.time, "rank": r.rank, "values": {}})
        s["values"][r.key] = enc_nan(r.value, bool(r.is_nan))
    msg["scalars"] = list(scalars.values())
    return msg


def _rank_filter(ranks: list[int] | None, column: str) -> str:
    """``AND column IN (...)`` for ``ranks``; nothing for None (every rank)."""
    return "" if ranks is None else f"AND {column} IN ({','.join(str(int(r)) for r in ranks)})"


def _layers_from_db(conn: Connection, steps: list[dict[str, Any]], run_id: str, ranks: list[int] | None,
                    p: dict[str, Any]) -> None:
    """Attach each step's per-layer block, read back from ``layer_stat`` (NaN: NULL + mask bit)."""
    by_key = {(st["step"], st["rank"]): st for st in steps}
    cols = ", ".join(f"s.{c}" for c in _LIVE_STORED)
    # the nan_mask bit of each float statistic (None: an integer column)
    bits = [1 << LAYER_FLOAT_COLUMNS.index(k) if k in LAYER_FLOAT_COLUMNS else None for k in _LIVE_STORED]
    acc: dict[tuple[int, int], dict[str, list[Any]]] = {}
    for r in conn.execute(text(
            f"SELECT s.step, s.rank, l.idx, s.nan_mask, {cols} FROM layer_stat s JOIN layer l ON l.id = s.layer_id "
            f"WHERE l.run_id = :r {_rank_filter(ranks, 's.rank')} AND s.step BETWEEN :a AND :b "
            "ORDER BY s.step, s.rank, l.idx"), p):
        if (r[0], r[1]) not in by_key:
            continue
        blk = acc.setdefault((r[0], r[1]), {"index": [], **{k: [] for k in _LIVE_STORED}})
        blk["index"].append(r[2])
        for k, bit, v in zip(_LIVE_STORED, bits, r[4:]):
            blk[k].append(v if bit is None else (math.nan if r[3] & bit else v))
    for key, blk in acc.items():
        by_key[key]["layers"] = _layer_block(blk.pop("index"), blk)


class _Steps:
    """A set of steps kept as sorted disjoint ``[lo, hi]`` ranges (live steps arrive nearly in
    order, so this stays a handful of ranges however long the run)."""

    __slots__ = ("lo", "hi")

    def __init__(self) -> None:
        self.lo: list[int] = []
        self.hi: list[int] = []

    def add(self, x: int) -> bool:
        """Add ``x``; False when it was already there."""
        lo, hi = self.lo, self.hi
        i = bisect.bisect_right(lo, x) - 1  # the last range starting at or before x
        if i >= 0 and x <= hi[i]:
            return False
        if i >= 0 and hi[i] == x - 1:
            hi[i] = x
            if i + 1 < len(lo) and lo[i + 1] == x + 1:  # bridges two ranges
                hi[i] = hi.pop(i + 1)
                lo.pop(i + 1)
        elif i + 1 < len(lo) and lo[i + 1] == x + 1:
            lo[i + 1] = x
        else:
            lo.insert(i + 1, x)
            hi.insert(i + 1, x)
        return True


class _Delivered:
    """What a run's subscribers were sent, so that each step, scalar and event goes out once:
    a batch read back from the database by its step range also holds rows of neighbouring
    batches that share a step, and a run's batches may be stored by several processes."""

    def __init__(self) -> None:
        self.steps: dict[int, _Steps] = {}
        self.scalars: dict[tuple[int, str], _Steps] = {}
        self.events: set[tuple[int, int, str, float]] = set()

    def new_only(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """``message`` without what was sent before (None: nothing new in a non-empty message)."""
        if message.get("type") != "batch":
            return message
        steps = [st for st in message.get("steps", ())
                 if self.steps.setdefault(st["rank"], _Steps()).add(st["step"])]
        events = []
        for e in message.get("events", ()):
            key = (e["rank"], e["step"], e["kind"], e["time"])
            if key not in self.events:
                self.events.add(key)
                events.append(e)
        scalars = []
        for sc in message.get("scalars", ()):
            values = {k: v for k, v in sc["values"].items()
                      if self.scalars.setdefault((sc["rank"], k), _Steps()).add(sc["step"])}
            if values:
                scalars.append(sc if len(values) == len(sc["values"]) else {**sc, "values": values})
        had = message.get("steps") or message.get("events") or message.get("scalars")
        if had and not (steps or events or scalars):
            return None
        return {**message, "steps": steps, "events": events, "scalars": scalars}


class LiveHub:
    """Subscriber queues per run, fed from any thread; the event loop is bound at app start.
    Messages are filtered on the loop's thread so each row reaches a subscriber once."""

    def __init__(self) -> None:
        self.origin = uuid.uuid4().hex
        self._subs: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._layer_subs: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: _PgListener | None = None
        self._delivered: dict[str, _Delivered] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self, run_id: str, layers: bool = False) -> asyncio.Queue[dict[str, Any]]:
        """A queue of ``run_id``'s live messages; ``layers``: this subscriber wants per-layer
        statistics, so messages for the run are built with them."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE_SIZE)
        self._subs.setdefault(run_id, set()).add(q)
        if layers:
            self._layer_subs.setdefault(run_id, set()).add(q)
        return q

    def unsubscribe(self, run_id: str, q: asyncio.Queue[dict[str, Any]]) -> None:
        for d in (self._subs, self._layer_subs):
            subs = d.get(run_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    d.pop(run_id, None)
        if run_id not in self._subs:
            self._delivered.pop(run_id, None)

    def subscribed_runs(self) -> list[str]:
        """The runs with subscribers now (callable from any thread)."""
        while True:
            try:
                return list(self._subs)
            except RuntimeError:  # changed size on the loop's thread while copied: copy again
                continue

    def has_subscribers(self, run_id: str) -> bool:
        return bool(self._subs.get(run_id))

    def wants_layers(self, run_id: str) -> bool:
        return bool(self._layer_subs.get(run_id))

    def publish(self, run_id: str, message: dict[str, Any]) -> None:
        """Deliver to every subscriber of ``run_id``; callable from any thread. Slow consumers drop."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self.has_subscribers(run_id):
            return
        loop.call_soon_threadsafe(self._deliver, run_id, message)

    def _deliver(self, run_id: str, message: dict[str, Any]) -> None:
        if run_id not in self._subs:
            return
        new = self._delivered.setdefault(run_id, _Delivered()).new_only(message)
        if new is None:
            return
        message = new
        for q in list(self._subs.get(run_id, ())):
            try:
                q.put_nowait(message)
            except asyncio.QueueFull:
                log.warning("live subscriber of run %s is too slow; dropping a message", run_id)

    def start_listener(self, engine: Engine) -> None:
        """On PostgreSQL, LISTEN for batches stored by other processes."""
        if engine.dialect.name != "postgresql":
            return
        self._listener = _PgListener(self, engine)
        self._listener.start()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None


class _PgListener:
    """A daemon thread holding one autocommit psycopg connection that LISTENs."""

    def __init__(self, hub: LiveHub, engine: Engine) -> None:
        self.hub = hub
        self.engine = engine
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-pg-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            # serving goes on; until LISTEN is active, batches stored by other processes are not relayed
            log.warning("PostgreSQL LISTEN not established after 10 s; live views miss other processes' "
                        "batches until it is")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        lost_at: float | None = None  # when the LISTEN connection was found broken
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if lost_at is not None:
                        self._catch_up(lost_at - _CATCH_UP_MARGIN_S)
                        lost_at = None
                    self._ready.set()
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self._handle(n.payload)
            except Exception:
                self._ready.set()
                if self._stop.is_set():
                    return
                if lost_at is None:
                    lost_at = time.time()
                log.exception("PostgreSQL LISTEN connection failed; retrying in 1 s")
                self._stop.wait(1.0)

    def _catch_up(self, since: float) -> None:
        """Relay what other processes stored while this listener was not listening: NOTIFY is not
        queued for a connection that is gone. For each run with subscribers, one message of every
        rank's rows over the steps of the batches received since ``since``; the hub drops the
        steps its subscribers already have."""
        for run_id in self.hub.subscribed_runs():
            try:
                with self.engine.connect() as conn:
                    row = conn.execute(text(  # the span of those batches, labelled as the latest one
                        "SELECT min(step_min) OVER (), max(step_max) OVER (), source, seq FROM ingest_batch "
                        "WHERE run_id = :r AND received_at >= :t ORDER BY received_at DESC, seq DESC LIMIT 1"),
                        {"r": run_id, "t": since}).first()
                    if row is None or row[0] is None:
                        continue
                    lo, hi, source, seq = row
                    msg = message_for_steps(conn, run_id, int(source), int(seq), lo, hi, None,
                                            layers=self.hub.wants_layers(run_id))
                self.hub.publish(run_id, msg)
                log.info("live: relayed steps %s..%s of run %s missed while not listening", lo, hi, run_id)
            except Exception:
                log.exception("could not relay the steps of run %s missed while not listening", run_id)

    def _handle(self, payload: str) -> None:
        try:
            p = json.loads(payload)
            if p.get("origin") == self.hub.origin or not self.hub.has_subscribers(p["run_id"]):
                return
            with self.engine.connect() as conn:
                msg = message_from_db(conn, p["run_id"], int(p["source"]), int(p["seq"]), p.get("ranks"),
                                      layers=self.hub.wants_layers(p["run_id"]))
            if msg is not None:
                self.hub.publish(p["run_id"], msg)
        except Exception:
            log.exception("could not relay a live notification %r", payload[:200])
