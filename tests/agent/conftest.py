"""Fixtures of the agent tests: one worker process per torch.distributed rank (gloo on localhost)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(worker: Path, world: int, outs: list[Path], args: list[str], timeout: float,
               **extra_env: str) -> list[Any]:
    """Start ``worker RANK WORLD PORT OUT *args`` for every rank, wait for all, assert each exited
    0 (naming the rank and the end of its output), and return each rank's JSON result."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADWATCH_DISABLED": "0", **extra_env}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port), str(outs[r]), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out.decode(errors="replace"))
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    return [json.loads(o.read_text()) for o in outs]


@pytest.fixture
def run_ranks() -> Callable[..., list[Any]]:
    """``run_ranks(worker, world, outs, args, timeout, **env)``: see :func:`_run_ranks`."""
    return _run_ranks
