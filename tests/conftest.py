"""Suite-wide test configuration: the `cuda` marker skips where no GPU is present; helpers for
tests that run real ``gradwatch`` processes (servers, the demo, the integrations)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# -- real processes shared by tests/cli, tests/deploy and tests/integrations ---------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: Any, log: Path, timeout: float = 90.0) -> None:
    """Poll ``base``/healthz until it answers 200 (bounded); fail with the log if the process dies."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server at {base} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_proc(proc: Any, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any GRADWATCH_ setting, one torch thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture
def gw_serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``gw_serve(db_url, **env) -> base URL``: a real ``gradwatch serve`` process, stopped afterwards."""
    procs: list[Any] = []

    def start(db_url: str, **env: str) -> str:
        port = free_port()
        log = tmp_path / f"serve-{len(procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", "serve", "--port", str(port),
                                     "--db", db_url, "--log-level", "warning"],
                                    stdout=out, stderr=subprocess.STDOUT, env=clean_env(**env))
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc, log)
        return base

    yield start
    for p in procs:
        stop_proc(p)


def get_json(url: str) -> Any:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll ``cond()`` until it returns something truthy (bounded), else fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


PG_URL = os.environ.get("GRADWATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """An empty PostgreSQL database (a failure under CI=true when PostgreSQL is down), dropped afterwards."""
    import uuid

    try:
        import psycopg

        admin = PG_URL.replace("postgresql+psycopg://", "postgresql://", 1)
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL at {PG_URL} unreachable (CI=true: required): {e}")
        pytest.skip(f"PostgreSQL at {PG_URL} unreachable: {e}")
    name = f"gwt_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with conn:
        conn.execute(f"CREATE DATABASE {name}")
        try:
            yield PG_URL.rpartition("/")[0] + "/" + name
        finally:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def gw(gw_serve: Callable[..., str]) -> Any:
    """The helpers above for tests in any folder: ``gw.serve(db_url)``, ``gw.get_json(url)``,
    ``gw.wait_for(cond, what)``, ``gw.clean_env()``, ``gw.free_port()``, ``gw.stop_proc(proc)``,
    ``gw.wait_healthy(base, proc, log)``."""
    from types import SimpleNamespace

    return SimpleNamespace(serve=gw_serve, get_json=get_json, wait_for=wait_for, clean_env=clean_env,
                           free_port=free_port, stop_proc=stop_proc, wait_healthy=wait_healthy)


# -- the source tree is not the tests' to write in ------------------------------------------------

_ROOT = Path(__file__).resolve().parents[1]
#: Entries of ``git status`` that running Python code makes on its own (byte-code caches).
_NOISE = ("__pycache__/", ".pytest_cache/", ".hypothesis/")  # tool caches (hypothesis keys its store to the project root)


def _tree_state() -> set[str] | None:
    """``git status --porcelain --ignored`` of the checkout (untracked and ignored entries too),
    less byte-code caches; None where this is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain", "--ignored"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line for line in out.stdout.splitlines() if not line.rstrip("/").endswith(tuple(n.rstrip("/") for n in _NOISE))}


@pytest.fixture(scope="session", autouse=True)
def _source_tree_untouched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test runs with a scratch directory as its working directory (code whose defaults are
    relative to it, such as a watcher's ``.gradwatch/spool``, writes there), and the checkout's
    ``git status`` (untracked and ignored files included) must be the same after the session as
    before it: a test that creates or deletes anything in the source tree fails the run."""
    before = _tree_state()
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(cwd)
    after = _tree_state()
    if before is not None and after is not None and before != after:
        pytest.fail("the test session changed the source tree (git status --porcelain --ignored): "
                    f"appeared {sorted(after - before)[:20]}, disappeared {sorted(before - after)[:20]}")
