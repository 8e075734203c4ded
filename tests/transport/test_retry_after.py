"""The agent honours a server's ``Retry-After`` (issue 13 point 4), against a real HTTP receiver
in a thread that answers the first batch with 503 and ``Retry-After: 2``, then stores.

The receiver measures on its own clock when the 503 left and when the next request arrived: that
gap is a lower bound on the sender's waiting, so the assertion cannot flake on a slow machine."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gradwatch.agent.transport import make_sink

from .conftest import layers_of, new_run, scalar_record, step_record

N = 3  # layers per step record


class Receiver:
    """A minimal ingest endpoint: ``GET /api/v1/ingest/ack`` and ``POST /api/v1/ingest``; the
    first POST gets ``503`` with ``Retry-After``; every request's arrival time is logged."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        self.lock = threading.Lock()
        self.batches: dict[int, dict[str, Any]] = {}
        self.log: list[tuple[float, str]] = []  # (monotonic arrival, "GET"/"POST"/"503")
        self.refused_at: float | None = None
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with rec.lock:
                    rec.log.append((time.monotonic(), "GET"))
                    acked = rec.acked()
                if urllib.parse.urlsplit(self.path).path != "/api/v1/ingest/ack":
                    self._json(404, {"detail": "not found"})
                    return
                self._json(200, {"acked": acked})

            def do_POST(self) -> None:
                d = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with rec.lock:
                    now = time.monotonic()
                    if rec.refused_at is None:
                        rec.refused_at = now  # before the answer leaves: a lower bound for the sender
                        rec.log.append((now, "503"))
                        refuse = True
                    else:
                        rec.log.append((now, "POST"))
                        rec.batches.setdefault(d["seq"], d)
                        refuse = False
                    acked = rec.acked()
                if refuse:
                    self._json(503, {"detail": "busy"}, {"Retry-After": str(rec.retry_after)})
                else:
                    self._json(200, {"seq": d["seq"], "acked": acked, "duplicate": False, "rows": 0})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def acked(self) -> int:
        n = 0
        while n + 1 in self.batches:
            n += 1
        return n

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def first_after(self, t: float) -> float | None:
        with self.lock:
            later = [a for a, _ in self.log if a > t]
        return min(later) if later else None

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_503_with_retry_after_delays_the_next_attempt_and_loses_nothing(tmp_path: Path) -> None:
    rec = Receiver(retry_after=2)
    try:
        run = new_run()
        sink = make_sink(rec.url, run=run, layers=lambda: layers_of(N), spool_dir=tmp_path / "spool", ws=False,
                         flush_interval=0.02, batch_max_steps=10, backoff_base=0.05, backoff_max=0.2,
                         close_timeout=60)
        for i in range(50):
            sink.put(step_record(i, N))
            sink.put(scalar_record(i))
        deadline = time.monotonic() + 60
        while rec.refused_at is None:
            assert time.monotonic() < deadline, "the receiver never saw a batch"
            time.sleep(0.01)
        # flush kicks a sender that waits to reconnect: that must not cut the server's wait short
        assert sink.flush(60)
        sink.close()
        st = sink.stats()
    finally:
        rec.close()
    assert rec.refused_at is not None
    nxt = rec.first_after(rec.refused_at)
    assert nxt is not None and nxt - rec.refused_at >= 2.0, rec.log
    steps = sorted(s["step"] for b in rec.batches.values() for s in b["steps"])
    scalars = sorted(s["step"] for b in rec.batches.values() for s in b["scalars"])
    assert steps == list(range(50)) and scalars == list(range(50))
    assert [b.get("status") for _, b in sorted(rec.batches.items())][-1] == "finished"
    assert st["lost"] == 0 and st["dropped"] == 0 and st["spooled"] == 0 and st["sent"] == 100
    assert not list((tmp_path / "spool").glob("*.jsonl"))
