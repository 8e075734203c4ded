"""Two real server processes on one PostgreSQL database: the detector state lives in the database,
so every step is evaluated once whichever process stores it, and the events equal a replay."""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent import wire

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("_gw_detect_api2", Path(__file__).with_name("test_detect_api.py"))
assert _spec and _spec.loader
_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_api)


def _post(url: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return dict(json.loads(r.read()))


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _state(url: str, run_id: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
        row = conn.execute("SELECT state FROM detector_state WHERE run_id = %s", (run_id,)).fetchone()
    assert row is not None
    return dict(json.loads(row[0]))


def _detector_events(base: str, run_id: str) -> list[tuple[str, int, list[str]]]:
    data = _get(f"{base}/api/v1/runs/{run_id}/events?source=detector")["data"]
    return [(e["kind"], e["step"], e["layers"]) for e in data]


def test_two_processes_alternating_evaluate_each_step_once(gw_serve: Callable[..., str], fresh_pg: str, mk) -> None:
    a, b = gw_serve(fresh_pg), gw_serve(fresh_pg)
    bs = _api.batches(mk, 300, 20, _api.norms(dead_from=150, spike_at=222))
    for k, batch in enumerate(bs):  # batch by batch, each to the other process than the one before
        assert _post((a, b)[k % 2] + "/api/v1/ingest", wire.encode_batch(batch))["acked"] == k + 1
    live = _detector_events(a, "run1")
    assert live == _detector_events(b, "run1") == [("clip_saturation", 100, []), ("dead", 169, ["layer.2"]),
                                                   ("spike", 222, ["layer.1"])]
    st = _state(fresh_pg, "run1")
    assert (st["steps"], st["late"], st["last_step"]) == (300, 0, 300)
    r = urllib.request.Request(f"{b}/api/v1/projects/default/rules/replay?run=run1", b"", method="POST")
    with urllib.request.urlopen(r, timeout=60) as resp:
        assert json.loads(resp.read())["events"] == 3
    assert _detector_events(a, "run1") == live


def test_two_processes_storing_concurrently_never_evaluate_a_step_twice(gw_serve: Callable[..., str],
                                                                        fresh_pg: str, mk) -> None:
    """Batches of one run sent at once from four threads to both processes: some arrive after a
    later step was evaluated (skipped as late), none is evaluated twice: evaluated + late = sent."""
    a, b = gw_serve(fresh_pg), gw_serve(fresh_pg)
    bs = _api.batches(mk, 400, 10, _api.norms())
    errors: list[BaseException] = []

    def send(part: list[wire.Batch], base: str) -> None:
        try:
            for batch in part:
                _post(base + "/api/v1/ingest", wire.encode_batch(batch))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=send, args=(bs[k::4], (a, b)[k % 2])) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    st = _state(fresh_pg, "run1")
    assert st["steps"] + st["late"] == 400 and st["last_step"] == 400
    kinds = [(k, s) for k, s, _ in _detector_events(a, "run1")]
    assert len(kinds) == len(set(kinds))  # no event twice
