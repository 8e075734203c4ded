"""``gradwatch demo`` as a user runs it: a real subprocess, into a real server, checked over REST."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

DEMO = [sys.executable, "-m", "gradwatch.cli", "demo"]


def check_run(gw: Any, base: str, run_id: str, steps: int, *, injected: bool) -> None:
    """The run is complete (every step stored, finished) and the injected overflow is recorded with its layer."""
    api = f"{base}/api/v1/runs/{run_id}"
    run = gw.get_json(api)
    assert run["status"] == "finished" and run["last_step"] == steps - 1 and run["project"] == "demo"
    points = gw.get_json(f"{api}/steps?max_points={steps}")["points"]
    assert [p["step"] for p in points] == list(range(steps))
    layers = {la["name"] for la in gw.get_json(f"{api}/layers")["data"]}
    assert {"conv1.weight", "conv2.weight", "fc.bias"} <= layers
    loss = gw.get_json(f"{api}/scalars?key=loss")
    assert loss and "loss" in str(loss)
    overflows = gw.get_json(f"{api}/events?kind=overflow")["data"]
    skipped = [p["step"] for p in points if p["skipped"]]
    if injected:
        assert len(overflows) == 1, overflows
        ev = overflows[0]
        assert ev["step"] == steps // 2 and ev["data"]["layers"] == ["conv2.weight"]
        assert ev["data"]["scale_after"] == ev["data"]["scale_before"] / 2
        assert skipped == [steps // 2]
        assert points[steps // 2]["total_norm"] == "Infinity"
    else:
        assert overflows == [] and skipped == []
    # ClipNorm(1.0) after AutoscaledNorm: every applied step leaves with a norm of at most 1
    assert all(p["total_norm_post"] <= 1.0 + 1e-4 for p in points if not p["skipped"])


def run_id_of(out: str) -> str:
    m = re.search(r"run ([0-9a-f]{32}) finished", out)
    assert m, out
    return m.group(1)


def test_demo_no_serve_streams_into_a_running_server(gw: Any, tmp_path: Path) -> None:
    base = gw.serve(f"sqlite:///{tmp_path / 'gw.db'}")
    steps = 40
    proc = subprocess.run(DEMO + ["--steps", str(steps), "--no-serve"], capture_output=True, text=True,
                          timeout=300, env=gw.clean_env(GRADWATCH_URL=base), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"streaming into the server at {base}" in proc.stdout
    assert f"run page {base}/runs/{run_id_of(proc.stdout)}" in proc.stdout
    assert "bfloat16 autocast" in proc.stdout and "GradScaler, AutoscaledNorm, ClipNorm" in proc.stdout
    assert f"injecting an overflow into conv2.weight at step {steps // 2}" in proc.stdout
    assert f"{steps}/{steps} steps 100%" in proc.stderr  # the progress bar (plain lines off a terminal)
    check_run(gw, base, run_id_of(proc.stdout), steps, injected=True)

    quiet = subprocess.run(DEMO + ["--steps", "12", "--no-serve", "--no-inject"], capture_output=True, text=True,
                           timeout=300, env=gw.clean_env(GRADWATCH_URL=base), cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "injecting" not in quiet.stdout
    check_run(gw, base, run_id_of(quiet.stdout), 12, injected=False)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_serves_prints_the_url_at_once_and_stops_on_ctrl_c(gw: Any, tmp_path: Path, sig: int) -> None:
    port = gw.free_port()
    steps = 40
    proc = subprocess.Popen(DEMO + ["--steps", str(steps), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=gw.clean_env(), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        assert first.startswith(f"gradwatch demo: dashboard {base}/ "), first
        where = proc.stdout.readline()
        tmp_db = Path(re.search(r"database in (\S+), deleted on exit", where).group(1))  # type: ignore[union-attr]
        lines: list[str] = []
        while not any("press Ctrl-C to stop" in ln for ln in lines):
            line = proc.stdout.readline()
            assert line, f"demo ended early: {''.join(lines)}{proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
        out = "".join(lines)
        check_run(gw, base, run_id_of(out), steps, injected=True)
        assert gw.get_json(f"{base}/healthz")  # still serving after training
        assert (tmp_db / "gradwatch.db").exists()
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in rest
        assert not tmp_db.exists()  # the temporary database goes with the demo
    finally:
        gw.stop_proc(proc, signal.SIGKILL)


def test_demo_says_what_is_wrong(gw: Any, tmp_path: Path) -> None:
    port = gw.free_port()
    no_server = subprocess.run(DEMO + ["--no-serve", "--port", str(port)], capture_output=True, text=True,
                               timeout=120, env=gw.clean_env(), cwd=tmp_path)
    assert no_server.returncode == 1
    assert f"no gradwatch server answers at http://127.0.0.1:{port}" in no_server.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        taken = subprocess.run(DEMO + ["--port", str(port)], capture_output=True, text=True, timeout=120,
                               env=gw.clean_env(), cwd=tmp_path)
    assert taken.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in taken.stderr
    assert not os.listdir(tmp_path)  # nothing left behind


def test_demo_keeps_its_data_with_db_and_opens_a_browser(gw: Any, tmp_path: Path) -> None:
    """``--db URL`` keeps the run after the demo ends; ``--open`` hands the dashboard URL to the
    browser Python's ``webbrowser`` finds (here the ``BROWSER`` a user sets: a script that notes it)."""
    port, steps = gw.free_port(), 16
    seen = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" >> {seen}\n')
    browser.chmod(0o755)
    db = tmp_path / "kept.db"
    proc = subprocess.run(DEMO + ["--steps", str(steps), "--port", str(port), "--db", f"sqlite:///{db}",
                                  "--open", "--exit"], capture_output=True, text=True, timeout=300,
                          env=gw.clean_env(BROWSER=f"{browser} %s", DISPLAY=""), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"storing into sqlite:///{db}" in proc.stdout and "deleted on exit" not in proc.stdout
    assert seen.read_text().split() == [f"http://127.0.0.1:{port}/"]  # opened once, at the dashboard
    assert "no browser found" not in proc.stdout
    base = gw.serve(f"sqlite:///{db}")  # a new server on the kept database finds the whole run
    check_run(gw, base, run_id_of(proc.stdout), steps, injected=True)
