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
