"""The network sink: stream batches to a gradwatch server, never block training, never lose a step.

Data path (see :mod:`.buffered` for the training thread and the drainer)::

    put() ─► bounded buffer ─► drainer: resolve, batch, seq, append to the spool (disk) ─┐
                                                                                         ▼
               server ◄─ websocket (HTTP POST fallback) ◄─ sender thread reads the spool

- **The spool is a write-ahead log.** Every batch is appended to
  ``<spool_dir>/<source>-<first_seq>.jsonl`` before it is sent, and a segment file is deleted
  once the server has acknowledged every batch in it. So a slow or absent server only makes the
  spool grow (on disk, never in memory), and a killed training process leaves exactly the
  unacknowledged batches behind for ``gradwatch upload``. Memory holds an index of the
  unacknowledged batches (a few ints each) and a byte-bounded cache of recent encoded batches.
- **The sender thread** connects (websocket ``/api/v1/ingest/ws``; HTTP ``POST /api/v1/ingest``
  when the ``websockets`` package is missing or the websocket keeps failing), asks the server
  which seqs it already has (``hello``), then streams the unacknowledged batches in seq order
  with up to ``window`` frames in flight. Each acknowledgement removes one batch from the index.
  On any connection failure it reconnects with capped exponential backoff plus jitter and
  resends from the server's acknowledged seq; the server's idempotent ingest makes resends
  harmless.
- **Failures warn once per kind** (unreachable, auth rejected, version rejected, batch
  rejected). Auth and version rejections stop network attempts for the run: everything stays in
  the spool and the warning says how to upload it later. A batch refused with another 4xx is
  moved to ``rejected-<source>.jsonl`` beside the spool and counted, never retried forever.
- **Seqs and resume.** ``source`` is the rank. Before the first batch is numbered, the drainer
  takes the highest seq this (run, source) already used: the server's acknowledged seq, the
  seqs in a spool left by an earlier process of the same run on this machine (which it adopts and
  sends), and the spool's ``<source>.last`` marker. New batches continue above all of them, so a
  resumed process never reuses a (run, source, seq) with different content.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..wire import RunInfo
from .base import LayerTable
from .buffered import BufferedSink, _say, os_reason, upload_hint
from .spool import (
    Segment,
    SegmentWriter,
    _segment_key,
    note_name,
    read_at,
    rejected_name,
    spool_files,
    write_note,
)

__all__ = ["NetworkSink", "backoff_delay", "endpoints", "classify_http_error"]

logger = logging.getLogger("gradwatch.agent.transport")

#: The most seconds between two reconnection attempts.
BACKOFF_MAX = 10.0
#: The first reconnection delay.
BACKOFF_BASE = 0.5


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX,
                  rand: float | None = None) -> float:
    """Delay before reconnection attempt ``attempt`` (0-based): ``min(cap, base * 2**attempt)``
    with "equal jitter" (uniform in its upper half), so retrying agents do not synchronise."""
    r = random.random() if rand is None else rand
    d = min(cap, base * (2.0 ** min(attempt, 30)))
    return d * (0.5 + 0.5 * r)


def endpoints(url: str) -> dict[str, str]:
    """The server URLs derived from its base URL ``http(s)://HOST:PORT[/prefix]``."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"gradwatch server URL must look like http://HOST:PORT, got {url!r}")
    base = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
    ws = ("wss" if u.scheme == "https" else "ws") + base[len(u.scheme):]
    return {"base": base, "ingest": base + "/api/v1/ingest", "ack": base + "/api/v1/ingest/ack",
            "ws": ws + "/api/v1/ingest/ws"}


class _Transient(Exception):
    """The server is away (``unreachable``) or answered 5xx/429 (``failing``); reconnect later,
    not before ``retry_after`` seconds when the server said so."""

    def __init__(self, message: str, kind: str = "unreachable", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class _Fatal(Exception):
    """The server refuses us for the whole run (auth, wire version): stop trying."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Rejected(Exception):
    """The server refused a batch or the handshake (4xx other than auth). The sink treats it as
    fatal for the run (the data stays in the spool); ``gradwatch upload`` counts it per batch."""

    def __init__(self, seq: int | None, status: int, message: str) -> None:
        super().__init__(message)
        self.seq = seq
        self.status = status


def classify_http_error(status: int, message: str, seq: int | None = None,
                        retry_after: float | None = None) -> Exception:
    """Map a server refusal to what the sender does about it."""
    if status in (401, 403):
        return _Fatal("auth", f"HTTP {status}: {message}")
    if "wire_version" in message or "wire version" in message:
        return _Fatal("version", f"HTTP {status}: {message}")
    if status == 404:
        return _Fatal("endpoint", f"HTTP 404 at the ingest endpoint (is this a gradwatch server?): {message}")
    if status in (408, 425, 429) or status >= 500:
        return _Transient(f"HTTP {status}: {message}", "failing", retry_after)
    return _Rejected(seq, status, message)


def _retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form only), capped at a minute."""
    try:
        v = headers.get("Retry-After") if headers is not None else None
        return None if v is None else min(60.0, max(0.0, float(v)))
    except (TypeError, ValueError):
        return None


def _detail(body: bytes) -> str:
    try:
        d = json.loads(body)
        if isinstance(d, dict):
            return str(d.get("detail") or d.get("error") or d)[:300]
    except ValueError:
        pass
    return body[:300].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# connections


class _Http:
    """HTTP POST per batch (stdlib urllib): the fallback, and what the drainer asks at start."""

    synchronous = True
    name = "http"

    def __init__(self, eps: dict[str, str], headers: dict[str, str], timeout: float, connect_timeout: float):
        self.eps = eps
        self.headers = headers
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def _open(self, req: urllib.request.Request, timeout: float, seq: int | None = None) -> Any:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                body = e.read()
            except Exception:
                body = b""
            raise classify_http_error(e.code, _detail(body), seq, _retry_after(e.headers)) from None
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
            raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    def hello(self, run_id: str, source: int) -> int:
        q = urllib.parse.urlencode({"run_id": run_id, "source": source})
        req = urllib.request.Request(f"{self.eps['ack']}?{q}", headers=self.headers, method="GET")
        try:
            d = self._open(req, self.connect_timeout)
        except _Fatal as f:
            if f.kind == "endpoint":  # 404: the run is unknown to the server (nothing acked yet)
                return 0
            raise
        return int(d.get("acked") or 0)

    def send(self, seq: int, raw: bytes) -> dict[str, Any]:
        req = urllib.request.Request(self.eps["ingest"], data=raw, method="POST",
                                     headers={**self.headers, "Content-Type": "application/json"})
        d = self._open(req, self.timeout, seq)
        d.setdefault("seq", seq)
        d["type"] = "ack"
        return d

    def close(self) -> None:
        pass


class _Ws:
    """The websocket stream (``websockets.sync.client``): frames pipelined, acks in order."""

    synchronous = False
    name = "websocket"

    def __init__(self, eps: dict[str, str], headers: dict[str, str], connect_timeout: float) -> None:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        try:
            # No permessage-deflate: it halves the bytes but costs ~2 us of CPU per layer row in
            # this (training) process and again on the server; the stream is small for a network.
            self.ws = connect(eps["ws"], additional_headers=headers, open_timeout=connect_timeout,
                              close_timeout=1.0, max_size=1 << 20, ping_interval=20, ping_timeout=20,
                              compression=None, **_LEGACY)
        except InvalidStatus as e:
            status = e.response.status_code
            body = getattr(e.response, "body", b"") or b""
            err = classify_http_error(status, _detail(body), None, _retry_after(e.response.headers))
            if isinstance(err, _Rejected):
                raise _Fatal("endpoint", f"websocket handshake refused: HTTP {status}") from None
            raise err from None
        except (OSError, TimeoutError) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        except Exception as e:  # InvalidHandshake, InvalidURI, ...
            raise _Transient(f"websocket handshake failed: {type(e).__name__}: {e}") from None

    def hello(self, run_id: str, source: int) -> int:
        self.ws.send(json.dumps({"type": "hello", "run_id": run_id, "source": source}))
        while True:
            msg = self.recv(30.0)
            if msg is None:
                raise _Transient("no answer to hello")
            if msg.get("type") == "ack" and msg.get("seq") is None:
                return int(msg.get("acked") or 0)
            if msg.get("type") == "error":
                raise classify_http_error(int(msg.get("status") or 400), str(msg.get("error")),
                                          None, msg.get("retry_after"))

    def send(self, seq: int, raw: bytes) -> None:
        try:
            self.ws.send(raw, text=True)
        except Exception as e:
            raise _closed(e, "websocket send failed") from None

    def recv(self, timeout: float) -> dict[str, Any] | None:
        try:
            m = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except Exception as e:  # ConnectionClosed and friends
            raise _closed(e, "websocket closed") from None
        try:
            d = json.loads(m)
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


def _closed(e: Exception, what: str) -> Exception:
    """What a websocket closed under us means, from the server's close code."""
    rcvd = getattr(e, "rcvd", None)
    code = getattr(rcvd, "code", None)
    reason = getattr(rcvd, "reason", "") or str(code)
    if code == 1008:  # policy: the server closes an unauthorised stream this way
        return _Fatal("auth", f"websocket closed by the server: {reason}")
    if code == 1001:  # the server closed an idle stream (or is shutting down): just reconnect
        return _Transient(f"websocket closed by the server: {reason}", "idle")
    if code in (1011, 1013):  # server error / try again later (the server is busy)
        return _Transient(f"websocket closed by the server: {reason}", "failing", 1.0 if code == 1013 else None)
    return _Transient(f"{what}: {type(e).__name__}: {e}")


#: websockets >= 15 wants ``legacy=True`` to return a plain long-lived connection without warning
_LEGACY: dict[str, Any] = {}


def _have_websockets() -> bool:
    try:
        import inspect

        from websockets.sync.client import connect
    except ImportError:
        return False
    if "legacy" in inspect.signature(connect).parameters:
        _LEGACY["legacy"] = True
    return True


# --------------------------------------------------------------------------------------------
# the sink


class NetworkSink(BufferedSink):
    """Streams a run to ``url`` (see the module docstring).

    Args:
        url: the server's base URL, ``http(s)://HOST:PORT``.
        run, layers, rank: as for every sink.
        token: sent as ``Authorization: Bearer``.
        spool_dir: the run's spool directory (default ``./.gradwatch/spool/<run_id>``).
        connect_timeout: seconds for one connection attempt (and the start-up ack query).
        request_timeout: seconds for one HTTP POST.
        backoff_max: cap of the reconnection delay.
        ws: use the websocket when available (else HTTP POST only).
        window: batches in flight on the websocket.
        cache_bytes: encoded batches kept in memory for sending while connected.
        segment_bytes: size at which the spool starts a new segment file (acknowledged
            segments are deleted, so this bounds the disk a healthy stream uses).
        memory_bytes: encoded batches held in memory while the spool cannot be written (a full
            disk); beyond it the oldest held batch is dropped and counted as lost with the reason.
        resume: True when the run existed before this process (makes seq continuation stricter).
        **options: ``flush_interval``, ``batch_max_steps``, ``batch_max_rows``, ``buffer_max``,
            ``close_timeout``.

    Starts two daemon threads (drainer, sender) when started by :func:`make_sink`.
    """

    kind = "network"

    def __init__(self, url: str, run: RunInfo, layers: LayerTable | None = None, *, rank: int = 0,
                 token: str | None = None, spool_dir: str | os.PathLike[str] | None = None,
                 connect_timeout: float = 5.0, request_timeout: float = 30.0,
                 backoff_max: float = BACKOFF_MAX, backoff_base: float = BACKOFF_BASE, ws: bool = True,
                 window: int = 32, resume: bool | None = None, cache_bytes: int = 16 << 20,
                 segment_bytes: int = 8 << 20, memory_bytes: int = 64 << 20, **options: Any) -> None:
        super().__init__(run, layers, rank=rank, **options)
        self.url = url
        self.eps = endpoints(url)
        self.headers = {"User-Agent": "gradwatch-agent"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.spool_dir = Path(spool_dir if spool_dir is not None
                              else Path(".gradwatch") / "spool" / run.run_id).expanduser().absolute()
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.backoff_max = float(backoff_max)
        self.backoff_base = float(backoff_base)
        self.use_ws = bool(ws) and _have_websockets()
        self.window = max(1, int(window))
        self.resume = resume
        self.cache_bytes = int(cache_bytes)
        self.segment_bytes = int(segment_bytes)
        self.memory_bytes = int(memory_bytes)

        self._cv = threading.Condition()
        # seq -> (segment, offset, length, records); segment None: held in memory (_mem), not on disk
        self._index: OrderedDict[int, tuple[Segment | None, int, int, int]] = OrderedDict()
        self._mem: OrderedDict[int, bytes] = OrderedDict()
        self._mem_size = 0
        self._sending: set[int] = set()  # seqs handed to the current connection, not yet acknowledged
        self._disk_error: str | None = None  # why the last spool write failed (None: the disk works)
        self._disk_reason = ""
        self._disk_failures = 0
        self._disk_retry_at = 0.0
        self._seg_pending: dict[Path, int] = {}
        self._segs: dict[Path, Segment] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = 0
        self._n_sent = 0
        self._n_unsent = 0  # records in the index (on disk, not acknowledged)
        self._n_rejected = 0
        self._batches_sent = 0
        self._acked = 0
        self._reconnects = 0
        self._offline: str | None = None
        self._connected = False
        self._down = False
        self._attempts = 0  # connection attempts that have ended (in success or failure)
        self._ever_connected = False
        self._ws_failures = 0
        self._http_only_left = 0
        self._closing_sender = False
        self._abandon = False
        self._kick = threading.Event()
        self._conn: Any = None
        self._writer_ready = threading.Event()
        self._last_error = ""
        self._last_kind = ""  # unreachable | failing: what the last failed attempt met
        self._close_deadline = float("inf")
        self._offline_reason = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> NetworkSink:
        if self._started:
            return self
        super().start()
        self._sender = threading.Thread(target=self._send_main, name="gradwatch-network-sender", daemon=True)
        self._sender.start()
        return self

    def _wait_delivered(self, deadline: float | None) -> bool:
        """Wait while delivery has a chance. Whenever the sender is not connected, it may be
        waiting out a long backoff while the server is back, or a connection may have broken
        while flush waited: have it try now, and judge by that attempt. When a try flush asked
        for fails, what is written is durably spooled, which is all flush promises."""
        with self._cv:
            tried: int | None = None  # the attempt count when flush last asked for a try
            while self._index and self._offline is None:
                if not self._connected:
                    if tried is not None and self._attempts != tried and self._down:
                        break
                    if tried is None or self._attempts != tried:
                        tried = self._attempts
                        self._kick.set()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.05 if left is None else min(left, 0.05))
        return True

    def stats(self) -> dict[str, int]:
        s = super().stats()
        with self._cv:
            s.update(sent=self._n_sent, spooled=self._n_unsent,
                     rejected=self._n_rejected, acked=self._acked, reconnects=self._reconnects,
                     batches_sent=self._batches_sent, batches_unsent=len(self._index),
                     connected=int(self._connected))
        return s

    # ------------------------------------------------------------------ drainer side

    def _marker(self) -> Path:
        return self.spool_dir / f"{self.source}.last"

    def _open_writer(self) -> tuple[SegmentWriter, int]:
        try:
            return self._open_writer_inner()
        finally:
            self._writer_ready.set()

    def _open_writer_inner(self) -> tuple[SegmentWriter, int]:
        remote: int | None = None
        try:
            remote = _Http(self.eps, self.headers, self.request_timeout, self.connect_timeout).hello(
                self.run.run_id, self.source)
        except _Fatal as f:
            self._go_offline(f)
        except _Rejected as r:
            self._go_offline(_Fatal("refused", f"HTTP {r.status}: {r}"))
        except _Transient as e:
            self._last_error = str(e)
            self._last_kind = e.kind
        local = self._adopt_spool(remote or 0)
        if remote is None and local == 0 and self.resume:
            # A resumed run whose history we cannot see (server away, no spool here): take a
            # fresh source so that our seqs cannot collide with batches of the earlier process.
            self.source = self.rank + 4096 * (1 + random.randrange(255))
            local = self._adopt_spool(0)
        if remote is not None:
            with self._cv:
                self._acked = max(self._acked, remote)
        base = max(local, remote or 0)
        return SegmentWriter(self.spool_dir, source=self.source, segmented=True,
                             max_segment_bytes=self.segment_bytes), base

    def _adopt_spool(self, acked: int) -> int:
        """Index batches an earlier process of this run left in the spool (they will be sent
        first); return the highest seq this source used."""
        best = 0
        m = self._marker()
        try:
            best = int(m.read_text().strip() or 0)
        except (OSError, ValueError):
            pass
        if not self.spool_dir.is_dir():
            return best
        mine = [p for p in spool_files(self.spool_dir) if p.parent == self.spool_dir
                and _segment_key(p)[0] == self.source]
        for p in mine:
            seg = Segment(p, _segment_key(p)[1], closed=True)
            off = 0
            n_left = 0
            with open(p, "rb") as f:
                data = f.read()
            for line in data.split(b"\n"):
                length = len(line)
                if line.strip():
                    try:
                        d = json.loads(line)
                        seq = int(d["seq"])
                        ok = d["run"]["run_id"] == self.run.run_id and int(d.get("source", 0)) == self.source
                        n = len(d.get("steps") or []) + len(d.get("scalars") or []) + len(d.get("events") or [])
                    except (ValueError, KeyError, TypeError):
                        ok = False  # a line truncated by a killed process: nothing to send
                    if ok:
                        best = max(best, seq)
                        seg.last_seq = max(seg.last_seq, seq)
                        if seq > acked:
                            if seq not in self._index:
                                self._n_unsent += n
                            self._index[seq] = (seg, off, length, n)
                            n_left += 1
                off += length + 1
            seg.size = len(data)
            if n_left:
                self._seg_pending[p] = n_left
                self._segs[p] = seg
            else:
                self._delete(p)
        if self._index:
            self._index = OrderedDict(sorted(self._index.items()))
        return best

    def _on_written(self, seq: int, seg: Segment, off: int, length: int, records: int, raw: bytes) -> None:
        with self._cv:
            self._index[seq] = (seg, off, length, records)
            self._n_unsent += records
            self._seg_pending[seg.path] = self._seg_pending.get(seg.path, 0) + 1
            new_seg = seg.path not in self._segs
            self._segs[seg.path] = seg
            # recent batches stay in memory only while connected (they are about to be sent);
            # while the server is away the spool on disk is the only copy, so memory stays flat
            if self._connected and self._offline is None and not self._abandon:
                self._cache[seq] = raw
                self._cache_size += len(raw)
                while self._cache_size > self.cache_bytes and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cache_size -= len(old)
            if new_seg:
                # the writer rolled: older closed segments with nothing pending can go, and the
                # marker keeps the highest seq used even after those files are deleted
                self._write_marker(seg.first_seq - 1)
                for p, s in list(self._segs.items()):
                    if s.closed and not self._seg_pending.get(p):
                        self._delete(p)
            self._cv.notify_all()

    def _append(self, seq: int, raw: bytes, n: int) -> None:
        """Spool one batch. When the spool cannot be written, hold it in memory (sent from there
        while the server answers) and retry the disk with backoff; once a retry works, the held
        batches move to disk first, oldest first."""
        assert self.writer is not None
        if self._disk_error is not None and (time.monotonic() < self._disk_retry_at or not self._spill()):
            self._hold(seq, raw, n)
            return
        try:
            seg, off, length = self.writer.append(seq, raw)
        except OSError as e:
            self._disk_failed(e)
            self._hold(seq, raw, n)
            return
        self._on_written(seq, seg, off, length, n, raw)

    def _disk_failed(self, e: OSError) -> None:
        self._disk_reason = os_reason(e)
        self._disk_error = f"{self._disk_reason}: {e.strerror or e}"
        self._disk_failures += 1
        self._disk_retry_at = time.monotonic() + min(10.0, 0.5 * 2.0 ** min(self._disk_failures - 1, 5))
        with self._cv:  # the failed writer closed its segment: what is acknowledged there can go now
            for p, seg in list(self._segs.items()):
                if seg.closed and not self._seg_pending.get(p):
                    self._delete(p)
        self.warn("disk", f"gradwatch: cannot write the spool {self.spool_dir} ({self._disk_error}); holding up to "
                          f"{self.memory_bytes >> 20} MB of monitoring data of run {self.run.run_id} in memory and "
                          "sending it directly while the server answers; the disk is retried. Training is not "
                          "affected.")

    def _hold(self, seq: int, raw: bytes, n: int) -> None:
        """Keep a batch the spool could not take in memory; past ``memory_bytes`` the oldest held
        batch is dropped and counted as lost under the disk's error."""
        lost = 0
        with self._cv:
            self._index[seq] = (None, 0, len(raw), n)
            self._n_unsent += n
            self._mem[seq] = raw
            self._mem_size += len(raw)
            # the oldest held batch goes first, unless it is on the wire (its ack may still come):
            # in flight are at most ``window`` batches, so memory stays bounded all the same
            for old in [q for q in self._mem if q not in self._sending][:-1]:
                if self._mem_size <= self.memory_bytes:
                    break
                e = self._release(old)
                lost += e[3] if e is not None else 0
            self._cv.notify_all()
        if lost:
            self._count_lost(lost, self._disk_reason or "disk")
            self.warn("lost", f"gradwatch: the spool {self.spool_dir} cannot be written ({self._disk_error}) and "
                              f"the server does not take the data fast enough: dropping the oldest monitoring "
                              f"records of run {self.run.run_id} beyond {self.memory_bytes >> 20} MB in memory "
                              "(counted in stats()['lost']). Training is not affected.")

    def _spill(self) -> bool:
        """Move the batches held in memory to the spool, oldest first. False (and a later retry)
        when the disk still fails."""
        while True:
            with self._cv:
                if not self._mem:
                    break
                seq, raw = next(iter(self._mem.items()))
            assert self.writer is not None
            try:
                seg, off, length = self.writer.append(seq, raw)
            except OSError as e:
                self._disk_failed(e)
                return False
            with self._cv:
                self._segs.setdefault(seg.path, seg)
                entry = self._index.get(seq)
                if self._mem.pop(seq, None) is not None:
                    self._mem_size -= len(raw)
                if entry is not None and entry[0] is None:  # (else: acknowledged meanwhile; a spare line)
                    self._index[seq] = (seg, off, length, entry[3])
                    self._seg_pending[seg.path] = self._seg_pending.get(seg.path, 0) + 1
        if self._disk_error is not None:
            logger.info("gradwatch: the spool %s can be written again", self.spool_dir)
        self._disk_error = None
        self._disk_failures = 0
        return True

    def _write_marker(self, seq: int) -> None:
        if seq <= 0:
            return
        try:
            self._marker().write_text(str(seq))
        except OSError:
            pass

    # ------------------------------------------------------------------ bookkeeping (under _cv)

    def _delete(self, p: Path) -> None:
        if self._abandon:
            return
        self._segs.pop(p, None)
        self._seg_pending.pop(p, None)
        try:
            p.unlink()
        except OSError:
            pass

    def _release(self, seq: int) -> tuple[Segment | None, int, int, int] | None:
        e = self._index.pop(seq, None)
        if e is None:
            return None
        self._n_unsent -= e[3]
        raw = self._cache.pop(seq, None)
        if raw is not None:
            self._cache_size -= len(raw)
        raw = self._mem.pop(seq, None)
        if raw is not None:
            self._mem_size -= len(raw)
        self._sending.discard(seq)
        if e[0] is None:
            return e
        p = e[0].path
        left = self._seg_pending.get(p, 1) - 1
        self._seg_pending[p] = left
        if left <= 0 and e[0].closed:
            self._delete(p)
        return e

    def _confirm(self, seq: int) -> None:
        e = self._release(seq)
        if e is not None:
            self._n_sent += e[3]
            self._batches_sent += 1

    def _confirm_upto(self, acked: int) -> None:
        if acked > self._acked:
            self._acked = acked
        while self._index:
            seq = next(iter(self._index))
            if seq > acked:
                break
            self._confirm(seq)

    def _reject(self, seq: int, status: int, message: str) -> None:
        raw = self._raw(seq)
        e = self._release(seq)
        if e is None:
            return
        self._n_rejected += e[3]
        path = self.spool_dir / rejected_name(self.source)
        try:
            with open(path, "ab") as f:
                f.write((raw or b"") + b"\n")
        except OSError:
            pass
        self.warn("rejected", f"gradwatch: the server at {self.url} rejected a batch of run {self.run.run_id} "
                              f"(HTTP {status}: {message}); it is kept in {path} and not retried.")

    def _raw(self, seq: int) -> bytes | None:
        raw = self._cache.get(seq) or self._mem.get(seq)
        if raw is not None:
            return raw
        e = self._index.get(seq)
        if e is None or e[0] is None:
            return None
        try:
            return read_at(e[0].path, e[1], e[2])
        except OSError:
            return None

    def _go_offline(self, f: _Fatal) -> None:
        with self._cv:
            if self._offline is not None:
                return
            self._offline = f.kind
            self._offline_reason = str(f)
            self._cache.clear()
            self._cache_size = 0
            self._cv.notify_all()
        what = {"auth": "rejected our credentials", "version": "does not accept this agent's wire version",
                "endpoint": "does not offer the gradwatch ingest API",
                "refused": "refused monitoring data"}.get(f.kind, "refused us")
        hint = " (set GRADWATCH_TOKEN or watch(token=...))" if f.kind == "auth" else ""
        self.warn(f.kind, f"gradwatch: the server at {self.url} {what}{hint}: {f}. Nothing more is sent for run "
                          f"{self.run.run_id}; its monitoring data is kept in {self.spool_dir}; once the cause is "
                          f"fixed, send it with: "
                          f"{upload_hint(self.spool_dir)} --server {self.eps['base']}")

    # ------------------------------------------------------------------ sender thread

    def _all_done(self) -> bool:
        return self._drainer_done.is_set() and not self._index

    def _connect(self) -> Any:
        http = _Http(self.eps, self.headers, self.request_timeout, self.connect_timeout)
        if not self.use_ws:
            return http
        # After 3 websocket failures while HTTP works, use HTTP for 20 connections, then retry.
        if self._http_only_left > 0:
            self._http_only_left -= 1
            return http
        try:
            c = _Ws(self.eps, self.headers, self.connect_timeout)
            self._ws_failures = 0
            return c
        except _Fatal as f:
            if f.kind != "endpoint":
                raise
            self._http_only_left = 20  # no websocket route here: HTTP
            logger.info("gradwatch: %s has no websocket ingest; using HTTP POST", self.url)
            return http
        except _Transient:
            # Is it the websocket or the server? Only a server that answers HTTP counts against the
            # websocket (a proxy that drops upgrades); a server that is down is just down.
            http.hello(self.run.run_id, self.source)  # raises _Transient when the server is down
            self._ws_failures += 1
            if self._ws_failures >= 3:
                self._ws_failures = 0
                self._http_only_left = 20
                logger.info("gradwatch: the websocket to %s keeps failing; using HTTP POST", self.url)
                return http
            raise

    def _wait_retry(self, attempt: int, retry_after: float | None = None) -> None:
        """Wait before reconnecting: capped exponential backoff (short while closing, bounded by
        the close deadline), never less than the server's ``Retry-After``."""
        if self._closing_sender:
            delay = backoff_delay(attempt, 0.1, 1.0)
        else:
            delay = backoff_delay(attempt, self.backoff_base, self.backoff_max)
        if retry_after:
            delay = max(delay, retry_after)
        now = time.monotonic()
        end = now + min(delay, max(0.0, self._close_deadline - now))
        # a kick (flush, close) cuts the backoff short, but not the wait the server asked for
        floor = min(end, now + (retry_after or 0.0))
        kicked = False
        while (left := (floor if kicked else end) - time.monotonic()) > 0:
            if self._kick.wait(left):
                self._kick.clear()
                kicked = True
        self._kick.clear()

    def _failed_attempt(self, e: _Transient) -> None:
        if e.kind == "idle":  # nothing wrong: reconnect when there is something to send
            return
        self._last_error = str(e)
        self._last_kind = e.kind
        if e.kind == "failing":
            self.warn("failing", f"gradwatch: the server at {self.url} is failing ({e}); monitoring data is "
                                 f"spooled to {self.spool_dir} and resent with backoff. Training is not affected.")
        else:
            self.warn("unreachable", f"gradwatch: cannot reach the server at {self.url} ({e}); monitoring data "
                                     f"is spooled to {self.spool_dir} and will be sent when it is back. "
                                     "Training is not affected.")

    def _send_main(self) -> None:
        self._writer_ready.wait()
        attempt = 0
        while True:
            with self._cv:
                if self._abandon or self._offline is not None:
                    break
                if self._closing_sender and (self._all_done() or time.monotonic() >= self._close_deadline):
                    break
            try:
                conn = self._connect()
                acked = conn.hello(self.run.run_id, self.source)
            except _Fatal as f:
                self._go_offline(f)
                break
            except _Rejected as r:
                self._go_offline(_Fatal("refused", f"HTTP {r.status}: {r}"))
                break
            except _Transient as e:
                self._failed_attempt(e)
                with self._cv:
                    self._connected = False
                    self._down = True
                    self._attempts += 1
                    self._cache.clear()
                    self._cache_size = 0
                    self._cv.notify_all()
                self._wait_retry(attempt, e.retry_after)
                attempt += 1
                continue
            except Exception as e:  # pragma: no cover - defensive
                self._last_error = repr(e)
                with self._cv:
                    self._attempts += 1
                    self._cv.notify_all()
                self._wait_retry(attempt)
                attempt += 1
                continue
            with self._cv:
                if self._ever_connected:
                    self._reconnects += 1
                    logger.info("gradwatch: reconnected to %s (%s)", self.url, conn.name)
                self._ever_connected = True
                self._connected = True
                self._down = False
                self._attempts += 1
                self._conn = conn
                self._confirm_upto(acked)
                self._cv.notify_all()
            connected_at = time.monotonic()
            retry_after: float | None = None
            try:
                self._pump(conn)
                continue_ok = True
            except _Fatal as f:
                self._go_offline(f)
                break
            except _Transient as e:
                self._failed_attempt(e)
                retry_after = e.retry_after
                continue_ok = e.kind == "idle"  # reconnect at once, no backoff
            except Exception as e:  # pragma: no cover - defensive
                self._last_error = repr(e)
                continue_ok = False
            finally:
                conn.close()
                with self._cv:
                    self._connected = False
                    self._conn = None
                    self._sending.clear()
                    self._cv.notify_all()
            if not continue_ok:
                # a connection that breaks at once (a server failing every batch with 5xx) must
                # not become a tight reconnect loop: back off unless it had lived a while
                if self._closing_sender or retry_after or time.monotonic() - connected_at < 5.0:
                    self._wait_retry(attempt, retry_after)
                    attempt += 1
                else:
                    attempt = 0

    def _next_seq(self, nxt: int) -> int | None:
        if nxt in self._index:
            return nxt
        for k in self._index:
            if k >= nxt:
                return k
        return None

    def _handle(self, msg: dict[str, Any], inflight: list[int]) -> None:
        kind = msg.get("type")
        if kind == "ack":
            seq = msg.get("seq")
            with self._cv:
                if isinstance(seq, int):
                    if seq in inflight:
                        inflight.remove(seq)
                    self._confirm(seq)
                acked = msg.get("acked")
                if isinstance(acked, int):
                    self._confirm_upto(acked)
                self._cv.notify_all()
        elif kind == "error":
            seq = msg.get("seq")
            if not isinstance(seq, int):
                seq = inflight[0] if inflight else None
            err = classify_http_error(int(msg.get("status") or 400), str(msg.get("error")), seq,
                                      msg.get("retry_after"))
            if isinstance(err, _Rejected):
                raise _Fatal("refused", f"HTTP {err.status}: {err}" + (f" (batch {seq})" if seq else ""))
            raise err

    def _pump(self, conn: Any) -> None:
        inflight: list[int] = []
        # Start above what the server acknowledged, never at the drainer's counter: the drainer
        # numbers a batch (``_seq``) before it reaches the index, so starting at ``_seq + 1``
        # while the index is empty skipped that batch for the whole connection (it stayed
        # unsent until close, and its steps never reached the server or a live view).
        with self._cv:
            nxt = self._acked + 1
        while True:
            if self._abandon:
                return
            # fill the window
            while len(inflight) < self.window and not self._abandon:
                with self._cv:
                    seq = self._next_seq(nxt)
                    raw = self._raw(seq) if seq is not None else None
                    if seq is not None:
                        self._sending.add(seq)
                if seq is None:
                    break
                nxt = seq + 1
                if raw is None:  # vanished from disk: nothing we can do but count it
                    with self._cv:
                        self._reject(seq, 0, "spooled batch could not be read back")
                    continue
                inflight.append(seq)
                if conn.synchronous:
                    try:
                        self._handle(conn.send(seq, raw), inflight)
                    except _Rejected as r:
                        raise _Fatal("refused", f"HTTP {r.status}: {r} (batch {seq})") from None
                else:
                    conn.send(seq, raw)
            if inflight and not conn.synchronous:
                msg = conn.recv(0.05)
                if msg:
                    self._handle(msg, inflight)
                continue
            with self._cv:
                if self._closing_sender and self._all_done():
                    return
                if self._next_seq(nxt) is None:
                    self._cv.wait(0.25)

    # ------------------------------------------------------------------ close

    def _finish(self, deadline: float, lost_in_memory: int) -> None:
        with self._cv:
            self._close_deadline = deadline
            self._closing_sender = True
            self._cv.notify_all()
        self._kick.set()
        if self._started:
            self._sender.join(max(0.0, deadline - time.monotonic()))
            timed_out = self._sender.is_alive()
        else:
            timed_out = False
        with self._cv:
            if timed_out:
                self._abandon = True  # from now on the sender deletes nothing
                conn = self._conn
            else:
                conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        # what the disk refused during the run goes there now if it can (else it is lost with the process)
        if self._mem and self.writer is not None and self._drainer_done.is_set():  # (the writer is the drainer's)
            self._spill()
        with self._cv:
            held = [self._index[q][3] for q in self._mem if q in self._index]
            unsent_batches = len(self._index) - len(held)
            unsent = sum(e[3] for e in self._index.values()) - sum(held)
            rejected = self._n_rejected
        if held:
            self._count_lost(sum(held), self._disk_reason or "disk")
        lost = self.lost_reasons()
        dropped = self.stats()["dropped"] + lost_in_memory
        if not unsent_batches and not rejected:
            self._cleanup()  # nothing left for an upload
            if not dropped and not lost:
                logger.info("gradwatch: run %s: all %d records delivered to %s", self.run.run_id, self._n_sent,
                            self.url)
                return
        else:
            self._write_marker(self._seq)
            if self.writer is not None:
                self.writer.close()
        parts = []
        if unsent_batches:
            parts.append(f"{unsent} records ({unsent_batches} batches) not delivered to {self.url} "
                         f"({self._why_undelivered(timed_out)}); kept in {self.spool_dir}; send them with: "
                         f"{upload_hint(self.spool_dir)}")
        if rejected:
            parts.append(f"{rejected} records could not be read back from the spool, kept in "
                         f"{self.spool_dir / rejected_name(self.source)}")
        if lost:
            why = ", ".join(f"{n} {r}" for r, n in sorted(lost.items()))
            err = f": {self._disk_error}" if self._disk_error else ""
            parts.append(f"{sum(lost.values())} records lost because the spool could not be written ({why}{err})")
        if dropped:
            parts.append(f"{dropped} records dropped (buffer full or closed before written)")
        if unsent_batches:
            write_note(self.spool_dir, self.source, {
                "run_id": self.run.run_id, "status": self._final_status, "sent": self._n_sent,
                "unsent": unsent, "lost": lost, "disk_error": self._disk_error or "", "dropped": dropped})
        _say(f"gradwatch: run {self.run.run_id}: {self._n_sent} records delivered; " + "; ".join(parts))

    def _why_undelivered(self, timed_out: bool) -> str:
        why = {"auth": "the server rejected our credentials", "version": "the server refused our wire version",
               "endpoint": "no gradwatch ingest API at that URL",
               "refused": f"the server refused them: {self._offline_reason}"}.get(self._offline or "")
        if why is not None:
            return why
        after = f"gave up after the close timeout of {self.close_timeout:g} s"
        if self._last_kind == "failing" and not self._connected:
            return f"server failing: {self._last_error}; {after}"
        if self._connected or (timed_out and not self._down):
            return f"{after} while sending"
        err = f": {self._last_error}" if self._last_error else ""
        return f"server unreachable{err}; {after}"

    def _cleanup(self) -> None:
        """Everything was delivered: remove this source's spool files (and the directory when
        no other rank still uses it)."""
        if self.writer is not None:
            self.writer.close()
        with self._cv:
            for p in list(self._segs):
                self._delete(p)
        for p in [self._marker(), self.spool_dir / note_name(self.source)]:
            try:
                p.unlink()
            except OSError:
                pass
        try:
            self.spool_dir.rmdir()
        except OSError:
            pass
