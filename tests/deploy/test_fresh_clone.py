"""The README's two commands on a fresh clone in a fresh venv: ``make run`` (set up, then the demo,
here with a small step count so it ends by itself) and ``make test`` (here one quick test)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(2400)
def test_make_run_and_make_test_on_a_fresh_clone(gw: Any, tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.fail(f"{ROOT} is not a git checkout: this test clones it")
    clone = tmp_path / "gradwatch"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
    assert not (clone / ".venv").exists()
    env = gw.clean_env()
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if ".venv" not in p)
    port = gw.free_port()
    db = tmp_path / "demo.db"  # kept, so the run can be read back over REST after the demo ends
    t0 = time.monotonic()
    run = subprocess.run(["make", "run", "PIP_FLAGS=--no-compile",
                          f"DEMO_ARGS=--steps 30 --exit --port {port} --db sqlite:///{db}"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=2000)
    took = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"gradwatch demo: dashboard http://127.0.0.1:{port}/" in run.stdout
    m = re.search(r"run ([0-9a-f]{32}) finished: 30 steps", run.stdout)
    assert m, run.stdout[-3000:]
    assert "30/30 steps 100%" in run.stderr
    base = gw.serve(f"sqlite:///{db}")  # what the dashboard showed, read back over REST
    api = f"{base}/api/v1/runs/{m.group(1)}"
    stored = gw.get_json(api)
    assert stored["status"] == "finished" and stored["last_step"] == 29
    assert [p["step"] for p in gw.get_json(f"{api}/steps?max_points=30")["points"]] == list(range(30))
    overflow = gw.get_json(f"{api}/events?kind=overflow")["data"]
    assert [(e["step"], e["data"]["layers"]) for e in overflow] == [(15, ["conv2.weight"])]
    assert (clone / ".venv" / "bin" / "gradwatch").exists()  # what the README puts on the PATH
    print(f"make run on a fresh clone (setup + demo): {took:.0f} s")

    test = subprocess.run(["make", "test", "PYTEST_ARGS=tests/deploy/test_compose.py -k structure -p no:cacheprovider"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert re.search(r"2 passed", test.stdout), test.stdout[-2000:]
    shutil.rmtree(clone, ignore_errors=True)
