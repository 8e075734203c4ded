"""Scaling out: two ``gradwatch serve`` processes on one PostgreSQL behave as one server.

Real agents (``watch()`` on a real model) stream concurrently, one into each process; every step is
stored exactly once, each process answers for both runs, and a live view on either process sees
the run that streams into the other one, every step.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import torch
from websockets.sync.client import connect

from gradwatch.agent import ClipNorm, watch

pytestmark = pytest.mark.slow

STEPS = 60


def train(server: str, run_id: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, server=server, project="scale-out", run_id=run_id, transforms=[ClipNorm(1.0)],
               transport={"flush_interval": 0.05}) as w:
        for _ in range(STEPS):
            loss = model(torch.randn(16, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)


def watch_live(base: str, run_id: str, ready: threading.Event, seen: list[int], errors: list[str]) -> None:
    try:
        with connect(base.replace("http", "ws") + f"/api/v1/runs/{run_id}/live") as live:
            assert json.loads(live.recv(timeout=30))["type"] == "subscribed"
            ready.set()
            while len(set(seen)) < STEPS:
                msg = json.loads(live.recv(timeout=120))
                if msg.get("type") == "batch":
                    seen.extend(s["step"] for s in msg["steps"])
    except Exception as e:  # noqa: BLE001 - reported by the test
        missing = sorted(set(range(STEPS)) - set(seen))
        errors.append(f"{run_id} on {base}: {e!r}; {len(seen)} steps seen, missing {missing[:20]}")
        ready.set()


def test_two_processes_on_one_postgresql_act_as_one_server(gw: Any, pg_database: str, tmp_path: Path) -> None:
    a, b = gw.serve(pg_database), gw.serve(pg_database)
    run_a, run_b = uuid.uuid4().hex, uuid.uuid4().hex  # run_a streams into A, run_b into B
    seen: dict[str, list[int]] = {run_a: [], run_b: []}
    errors: list[str] = []
    live = []
    for base, rid in ((b, run_a), (a, run_b)):  # each live view sits on the *other* process
        ready = threading.Event()
        t = threading.Thread(target=watch_live, args=(base, rid, ready, seen[rid], errors), daemon=True)
        t.start()
        assert ready.wait(60)
        live.append(t)
    agents = [threading.Thread(target=train, args=(srv, rid)) for srv, rid in ((a, run_a), (b, run_b))]
    for t in agents:
        t.start()
    for t in agents + live:
        t.join(300)
    assert not errors, errors
    for rid in (run_a, run_b):
        # live on the other process sees every step exactly once (issue 13.5: a message rebuilt from
        # the database leaves out the steps an earlier message of the run already carried)
        assert sorted(seen[rid]) == list(range(STEPS))
        for base in (a, b):
            run = gw.get_json(f"{base}/api/v1/runs/{rid}")
            assert run["status"] == "finished" and run["last_step"] == STEPS - 1
            points = gw.get_json(f"{base}/api/v1/runs/{rid}/steps")["points"]
            assert [p["step"] for p in points] == list(range(STEPS))
    with psycopg.connect(pg_database.replace("postgresql+psycopg", "postgresql")) as conn:
        rows = dict(conn.execute("SELECT run_id, COUNT(*) FROM step_record GROUP BY run_id").fetchall())
        distinct = dict(conn.execute(
            "SELECT run_id, COUNT(DISTINCT (step, rank)) FROM step_record GROUP BY run_id").fetchall())
        stats = dict(conn.execute("SELECT l.run_id, COUNT(*) FROM layer_stat s JOIN layer l ON l.id = s.layer_id "
                                  "GROUP BY l.run_id").fetchall())
    assert rows == distinct == {run_a: STEPS, run_b: STEPS}  # each step stored once
    assert stats == {run_a: STEPS * 4, run_b: STEPS * 4}  # 4 parameter tensors per step, once each


def _post(base: str, batch: Any) -> None:
    import urllib.request

    from gradwatch.agent import wire

    req = urllib.request.Request(base + "/api/v1/ingest", data=wire.encode_batch(batch), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status < 300


def _steps_batch(run_id: str, seq: int, steps: range, rank: int = 0) -> Any:
    from gradwatch.agent import wire

    layers = [wire.LayerInfo(i, f"l{i}", [3], "float32") for i in range(2)]
    recs = [wire.StepRecord(step=s, time=1000.0 + s, rank=rank, layer_ids=[0, 1], layers={
        "numel": [3, 3], "mean": [0.1, 0.2], "m2": [1.0, 2.0], "l2": [float(s), 1.0], "maxabs": [1.0, 1.0],
        "nonfinite": [0, 0]}, total_norm=float(s)) for s in steps]
    return wire.Batch(run=wire.RunInfo(run_id=run_id, project="listen", world_size=2), seq=seq, source=rank,
                      layers=layers if seq == 1 else [], steps=recs)


def test_a_live_view_gets_what_was_stored_while_its_listener_reconnected(gw: Any, pg_database: str) -> None:
    """NOTIFY reaches only connections that are listening: a process whose LISTEN connection was
    cut (here by ``pg_terminate_backend``; a PostgreSQL restart or a network blip alike) relays,
    once it listens again, the steps other processes stored meanwhile: its live view has no gap,
    and no step twice."""
    a, b = gw.serve(pg_database), gw.serve(pg_database)
    rid = uuid.uuid4().hex
    admin = pg_database.replace("postgresql+psycopg", "postgresql")
    db = admin.rpartition("/")[2]
    _post(a, _steps_batch(rid, 1, range(0, 5)))
    seen: list[tuple[int, int]] = []
    errors: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        try:
            with connect(b.replace("http", "ws") + f"/api/v1/runs/{rid}/live?layers=l2") as live:
                assert json.loads(live.recv(timeout=30))["type"] == "subscribed"
                ready.set()
                while True:
                    msg = json.loads(live.recv(timeout=120))
                    if msg.get("type") == "batch":
                        for st in msg["steps"]:
                            assert st["layers"]["l2"] == [float(st["step"]), 1.0]
                            seen.append((st["rank"], st["step"]))
        except Exception as e:  # noqa: BLE001 - reported by the test (the socket closes at teardown)
            errors.append(repr(e))
            ready.set()

    threading.Thread(target=watch, daemon=True).start()
    assert ready.wait(60) and not errors, errors

    def listeners(conn: Any) -> list[Any]:
        return conn.execute("SELECT backend_start FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'",
                            (db,)).fetchall()

    with psycopg.connect(admin, autocommit=True) as conn:
        gw.wait_for(lambda: len(listeners(conn)) == 2, "both processes to LISTEN")
        _post(a, _steps_batch(rid, 2, range(5, 10)))
        gw.wait_for(lambda: (0, 9) in seen, "the live view on B to get a batch stored by A")
        seq, gaps = 3, 0
        for _ in range(3):  # cut both LISTEN connections, store while they reconnect (they wait 1 s)
            killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                                  "AND query LIKE 'LISTEN%%'", (db,)).fetchone()[0]
            assert killed == 2
            first = 10 + 10 * (seq - 3)
            _post(a, _steps_batch(rid, seq, range(first, first + 5)))  # rank 0 into A, rank 1 into B itself
            _post(b, _steps_batch(rid, seq, range(first, first + 5), rank=1))
            stored_at = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            seq += 1
            back = gw.wait_for(lambda: len(listeners(conn)) == 2 and listeners(conn), "both processes to LISTEN again")
            gaps += all(start > stored_at for (start,) in back)  # stored while neither listened
        assert gaps >= 1, "the batches were never stored while the listeners were down"
        _post(a, _steps_batch(rid, seq, range(100, 105)))  # and the live path still works after
    want = {(0, s) for s in range(5, 10)} | {(0, s) for s in range(100, 105)} | {
        (r, s) for k in range(3) for r in (0, 1) for s in range(10 + 10 * k, 15 + 10 * k)}
    gw.wait_for(lambda: want <= set(seen) or errors, "every step on B's live view", timeout=60)
    assert not errors and want <= set(seen), (errors, sorted(want - set(seen)))
    assert len(seen) == len(set(seen)), "a step reached the live view twice"
