"""Loss-scale headroom, underflow, zeros and the momentum cosine end to end: a real training loop
with ``watch()`` and gradwatch's GradScaler streams to a real ``gradwatch serve`` (SQLite and
PostgreSQL), and REST ``/stats`` and the CSV export answer what the gradients held (computed
directly in a step pre-hook). Batches of agents that predate these fields still store (nulls)."""

from __future__ import annotations

import csv
import io
import json
import math
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradwatch.agent import GradScaler, watch, wire
from gradwatch.agent.signals import FP16_MAX, FP16_TINY

_NEW = ("zeros", "headroom", "underflow", "mom_cos", "upd_ratio")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    return json.loads(body) if url.find("format=csv") < 0 else body.decode()


def _train(base: str, steps: int = 12) -> tuple[str, list[str], dict[tuple[int, str], dict[str, Any]]]:
    """SGD with momentum under gradwatch's GradScaler (CPU); a ReLU layer with dead units and
    tiny gradients so every signal has something to count. Returns the run id, the layer names
    and the directly computed expectation per (step, layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].bias[:8] = -50.0  # 8 units that never fire: rows of exact zeros in weight and bias grads
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    w = watch(model, opt, server=base, run="signals", project="sig", transport={"flush_interval": 0.1},
              signals_every=1)
    names = {id(p): n for n, p in model.named_parameters()}
    want: dict[tuple[int, str], dict[str, Any]] = {}
    step = [0]

    def hook(o: Any, args: Any, kwargs: Any) -> None:
        S = float(scaler._scale.item())
        for p in o.param_groups[0]["params"]:
            g = p.grad.detach().double().reshape(-1)
            buf = o.state.get(p, {}).get("momentum_buffer")
            nz = g != 0
            cos = None
            if buf is not None:
                b = buf.double().reshape(-1)
                cos = (g @ b).item() / (g.norm() * b.norm()).item()
            want[(step[0], names[id(p)])] = {
                "zeros": int((~nz).sum()), "underflow": int((nz & (g.abs() * S < FP16_TINY)).sum()),
                "headroom": math.log2(FP16_MAX / (g.abs().max().item() * S)), "mom_cos": cos,
                "w": p.detach().double().clone()}
        step[0] += 1

    def post(o: Any, args: Any, kwargs: Any) -> None:  # ‖Δw‖/‖w‖ of the step, realized
        for p in o.param_groups[0]["params"]:
            exp = want[(step[0] - 1, names[id(p)])]
            before = exp.pop("w")
            exp["upd_ratio"] = ((p.detach().double() - before).norm() / before.norm()).item()

    opt.register_step_pre_hook(hook)
    opt.register_step_post_hook(post)
    for i in range(steps):
        x = torch.randn(16, 8) * (1e-6 if i % 3 == 0 else 1.0)  # some steps' gradients sit below 2^-14 / S
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    assert w.flush(60)
    w.close()
    return w.run_id, [n for n, _ in model.named_parameters()], want


def _check_run(base: str) -> None:
    run, names, want = _train(base)
    assert any(v["underflow"] for v in want.values()) and any(v["zeros"] for v in want.values())
    for stat in _NEW:
        series = _get(f"{base}/api/v1/runs/{run}/stats?layer=all&stat={stat}")["series"]
        assert [s["name"] for s in series] == names
        for s in series:
            pts = s["points"]
            assert [p["step"] for p in pts] == list(range(12)), stat
            for p in pts:
                exp = want[(p["step"], s["name"])][stat]
                if exp is None or stat in ("zeros", "underflow"):
                    assert p["value"] == exp, (stat, s["name"], p)
                else:  # upd_ratio: the realized update differs by the rounding of w (fp32)
                    tol = 1e-3 if stat == "upd_ratio" else 1e-6
                    assert p["value"] == pytest.approx(exp, rel=tol, abs=1e-6), (stat, s["name"], p)
    rows = list(csv.DictReader(io.StringIO(_get(f"{base}/api/v1/runs/{run}/export?format=csv"))))
    assert len(rows) == 12 * len(names)
    for r in rows:
        exp = want[(int(r["step"]), names[int(r["layer"])])]
        assert int(r["zeros"]) == exp["zeros"] and int(r["underflow"]) == exp["underflow"]
        assert float(r["headroom"]) == pytest.approx(exp["headroom"], rel=1e-6)
        assert (r["mom_cos"] == "") == (exp["mom_cos"] is None)
        assert float(r["upd_ratio"]) == pytest.approx(exp["upd_ratio"], rel=1e-3, abs=1e-6)


def test_signals_reach_rest_and_export_from_a_real_server_on_sqlite(gw_serve: Callable[..., str],
                                                                    tmp_path: Path) -> None:
    _check_run(gw_serve(f"sqlite:///{tmp_path / 'gw.db'}"))


def test_signals_reach_rest_and_export_from_a_real_server_on_postgresql(gw_serve: Callable[..., str],
                                                                        fresh_pg: str) -> None:
    _check_run(gw_serve(fresh_pg))


def test_a_batch_without_the_new_columns_stores_them_as_null(client, mk) -> None:  # type: ignore[no-untyped-def]
    """An agent of the same wire version that predates these fields sends no such columns."""
    d = wire.batch_to_dict(mk(1, range(1, 4), layers=2, events=False))
    for st in d["steps"]:
        for k in _NEW:
            st["layers"].pop(k, None)
    r = client.post("/api/v1/ingest", content=json.dumps(d))
    assert r.status_code == 200, r.text
    for stat in (*_NEW, "l2"):
        series = client.get("/api/v1/runs/run1/stats", params={"layer": "all", "stat": stat}).json()["series"]
        vals = [p["value"] for s in series for p in s["points"]]
        assert len(vals) == 6 and (all(v is None for v in vals) if stat != "l2" else None not in vals), stat
    text = client.get("/api/v1/runs/run1/export", params={"format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 6 and all(r[k] == "" for r in rows for k in _NEW)
