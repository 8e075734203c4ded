"""Webhook alerts against a real local HTTP receiver (``http.server`` in a thread): delivered with a
Slack-compatible body; a receiver that is down is retried with backoff until it comes up; a slow
one never holds ingest up. Every attempt is readable over REST."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gradwatch.server.app import create_app
from gradwatch.server.detect.alerts import backoff
from gradwatch.server.settings import ServerSettings

_spec = importlib.util.spec_from_file_location("_gw_detect_api", Path(__file__).with_name("test_detect_api.py"))
assert _spec and _spec.loader
_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_api)
batches, norms = _api.batches, _api.norms


class Receiver:
    """A real HTTP server on 127.0.0.1; ``gate`` (when given) holds every answer until set."""

    def __init__(self, port: int = 0, gate: threading.Event | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recv.bodies.append(body)
                recv.arrived.set()
                if gate is not None:
                    gate.wait(120)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.http.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_settings(make_settings: Any, **kw: Any) -> ServerSettings:
    kw = {"alert_poll_seconds": 0.05, "alert_backoff_seconds": 0.2, "alert_timeout_seconds": 5, **kw}
    s: ServerSettings = make_settings(**kw)
    return s


def deliveries(c: Any, **params: Any) -> list[dict[str, Any]]:
    r = c.get("/api/v1/projects/default/alerts", params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_backoff_doubles_up_to_its_cap() -> None:
    s = ServerSettings(alert_backoff_seconds=2, alert_backoff_max_seconds=10)
    assert [backoff(s, n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_events_are_posted_to_the_webhook(make_settings, mk, post, receiver, gw) -> None:
    with TestClient(create_app(fast_settings(make_settings))) as c:
        r = c.put("/api/v1/projects/default/rules", json={"alerts": {"webhook_url": receiver.url}})
        assert r.status_code == 200
        for b in batches(mk, 150, 25, norms(dead_from=60)):
            assert post(c, b).status_code == 200
        done = gw.wait_for(lambda: [d for d in deliveries(c) if d["status"] == "delivered"] if
                        len(deliveries(c, status="delivered")) == 2 else None, "two deliveries")
        kinds = sorted(b["event"]["kind"] for b in receiver.bodies)
        assert kinds == ["clip_saturation", "dead"]
        dead = next(b for b in receiver.bodies if b["event"]["kind"] == "dead")
        assert dead["text"].startswith("[gradwatch] WARNING default/run1: dead gradients since step 60: layer.2")
        assert dead["event"]["layers"] == ["layer.2"] and dead["event"]["step"] == 79
        for d in done:
            assert d["attempts"] == 1 and [a["ok"] for a in d["attempt_log"]] == [True]
            assert d["attempt_log"][0]["status_code"] == 200 and d["url"] == receiver.url
        ev = c.get("/api/v1/runs/run1/events", params={"kind": "dead"}).json()["data"]
        assert {d["event_id"] for d in done} >= {ev[0]["id"]}


def test_min_severity_filters_and_no_webhook_sends_nothing(make_settings, mk, post, receiver) -> None:
    with TestClient(create_app(fast_settings(make_settings))) as c:
        for b in batches(mk, 150, 25, norms(dead_from=60), run_id="quiet"):
            post(c, b)
        c.put("/api/v1/projects/default/rules", json={"alerts": {"webhook_url": receiver.url,
                                                                 "min_severity": "critical"}})
        for b in batches(mk, 150, 25, norms(dead_from=60), run_id="loud"):
            post(c, b)
        assert len(c.get("/api/v1/runs/loud/events", params={"source": "detector"}).json()["data"]) == 2
        assert deliveries(c) == []  # warnings only, and the first run had no webhook


def test_a_receiver_that_is_down_is_retried_until_it_comes_up(make_settings, mk, post, gw) -> None:
    port = _closed_port()
    with TestClient(create_app(fast_settings(make_settings, alert_workers=1))) as c:
        c.put("/api/v1/projects/default/rules", json={"dead": {"steps": 5}, "clip_saturation": {"enabled": False},
                                                      "alerts": {"webhook_url": f"http://127.0.0.1:{port}/hook"}})
        for b in batches(mk, 100, 25, norms(dead_from=60)):
            assert post(c, b).status_code == 200  # ingest does not wait for the receiver
        failed = gw.wait_for(lambda: [d for d in deliveries(c) if d["attempts"] >= 3], "three failed attempts")[0]
        assert failed["status"] == "pending"
        log = failed["attempt_log"]
        assert all(not a["ok"] and a["status_code"] is None for a in log)
        assert "refused" in log[0]["error"].lower() or "errno" in log[0]["error"].lower(), log[0]
        gaps = [b["time"] - a["time"] for a, b in zip(log, log[1:])]
        assert all(g >= backoff(c.app.state.gw.settings, n + 1) for n, g in enumerate(gaps)), gaps  # backed off
        recv = Receiver(port)
        try:
            done = gw.wait_for(lambda: [d for d in deliveries(c) if d["status"] == "delivered"], "the delivery")[0]
            assert done["attempt_log"][-1]["ok"] and done["attempts"] == len(done["attempt_log"]) >= 4
            assert [b["event"]["kind"] for b in recv.bodies] == ["dead"]
        finally:
            recv.close()


def test_attempts_are_bounded(make_settings, mk, post, gw) -> None:
    port = _closed_port()
    with TestClient(create_app(fast_settings(make_settings, alert_max_attempts=2, alert_backoff_seconds=0.05))) as c:
        c.put("/api/v1/projects/default/rules", json={"dead": {"steps": 5}, "clip_saturation": {"enabled": False},
                                                      "alerts": {"webhook_url": f"http://127.0.0.1:{port}/x"}})
        for b in batches(mk, 100, 25, norms(dead_from=60)):
            post(c, b)
        d = gw.wait_for(lambda: deliveries(c, status="failed"), "a failed delivery")[0]
        assert d["attempts"] == 2 and len(d["attempt_log"]) == 2 and d["last_error"]


def test_a_slow_receiver_never_blocks_ingest(make_settings, mk, post, gw) -> None:
    gate = threading.Event()
    recv = Receiver(gate=gate)
    try:
        with TestClient(create_app(fast_settings(make_settings, alert_workers=1))) as c:
            c.put("/api/v1/projects/default/rules", json={"dead": {"steps": 5}, "clip_saturation": {"enabled": False},
                                                          "alerts": {"webhook_url": recv.url}})
            bs = batches(mk, 200, 25, norms(dead_from=60))
            for b in bs[:3]:
                assert post(c, b).status_code == 200
            assert recv.arrived.wait(60)  # the receiver holds the first delivery and does not answer
            layer3 = norms(dead_from=120, dead_layer=3)
            for b in bs[3:]:  # a second layer dies while the receiver hangs
                assert post(c, mk(seq=b.seq, steps=[s.step for s in b.steps], values=layer3, events=False)
                            ).status_code == 200
            assert not gate.is_set()
            ev = c.get("/api/v1/runs/run1/events", params={"source": "detector"}).json()["data"]
            assert [(e["kind"], e["layers"]) for e in ev] == [("dead", ["layer.2"]), ("dead", ["layer.3"])]
            assert [d["status"] for d in deliveries(c)] == ["pending", "pending"]  # stored while it hangs
            gate.set()
            gw.wait_for(lambda: len(deliveries(c, status="delivered")) == 2, "both deliveries")
    finally:
        gate.set()
        recv.close()
