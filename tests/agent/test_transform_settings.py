"""Transform settings that never change (max_norm, clip_value...) go once into the run's metadata
(the config sent with the run), not into every step record: read back over REST from a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from gradwatch.agent import ClipNorm, ClipValue, watch
from gradwatch.agent.watcher import TRANSFORMS_CONFIG_KEY
from tests.transport.conftest import ServerProc


@pytest.fixture
def server(tmp_path) -> Iterator[ServerProc]:
    s = ServerProc(tmp_path).start()  # the real server (uvicorn, SQLite) in a subprocess
    yield s
    s.stop()


def _wait(srv: ServerProc, path: str, ok, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = srv.get(path)
        if ok(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_settings_once_in_run_config_not_per_step(server: ServerProc) -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    o = torch.optim.SGD(m.parameters(), lr=0.01)
    with watch(m, o, server=server.url, config={"lr": 0.01},
               transforms=[ClipNorm(0.5), ClipValue(2.0, count_clipped=True)]) as w:
        for _ in range(3):
            o.zero_grad()
            (m(torch.randn(4, 8) * 10).sum() * 10).backward()
            o.step()
        assert w.flush(60)
    rid = w.run_id
    run = _wait(server, f"/api/v1/runs/{rid}", lambda r: r.get("status") == "finished")
    assert run["config"]["lr"] == 0.01
    assert run["config"][TRANSFORMS_CONFIG_KEY] == [
        {"transform": "clip_value", "clip_value": 2.0, "count_clipped": True},
        {"transform": "clip_norm", "max_norm": 0.5, "norm_type": 2.0, "error_if_nonfinite": False},
    ]
    known = server.get(f"/api/v1/runs/{rid}/transforms")["transforms"]
    assert sorted(known["clip_norm"]) == ["coef", "total_norm", "total_norm_post"]  # no max_norm per step
    assert "clip_value" not in known.get("clip_value", [])  # nor clip_value (its per-layer counts are not series)
