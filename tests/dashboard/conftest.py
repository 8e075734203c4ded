"""Real processes for the browser tests: ``gradwatch serve`` on a free port, a training run
streaming into it, and Debian's headless Chromium driven by Playwright.

Under ``CI=true`` a missing Chromium (or Playwright) fails the tests, never skips them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = os.environ.get("GRADWATCH_TEST_CHROMIUM", "/usr/bin/chromium")
TRAINER = Path(__file__).with_name("trainer.py")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def wait_until(cond: Callable[[], Any], timeout: float = 90.0, what: str = "condition") -> Any:
    """Poll ``cond`` (bounded) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except (httpx.HTTPError, OSError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``gradwatch serve`` as a child process; ``restart`` keeps port and database."""

    def __init__(self, db: str, log: Path) -> None:
        self.port, self.db, self.log = free_port(), db, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", "serve", "--port", str(self.port),
                                      "--db", self.db, "--log-level", "warning"], stdout=out, stderr=out,
                                     env={**os.environ, "GRADWATCH_TOKEN": "", "GRADWATCH_READ_TOKEN": ""})
        wait_until(lambda: httpx.get(self.url + "/healthz", timeout=2).status_code == 200, 120, "the server")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def api(self, path: str) -> Any:
        return httpx.get(self.url + "/api/v1" + path, timeout=10).json()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(f"sqlite:///{tmp_path / 'gw.db'}", tmp_path / "server.log")
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def trainer(server: Server, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(run: str, *args: str) -> subprocess.Popen[bytes]:
        out = open(tmp_path / f"trainer-{run}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, str(TRAINER), "--server", server.url, "--run-id", run, *args],
                             stdout=out, stderr=out)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def _chromium_or_skip() -> str:
    if Path(CHROMIUM).exists() and shutil.which(CHROMIUM):
        return CHROMIUM
    msg = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")  # Playwright's sync API holds a running event loop while started: stop it with the module
def browser() -> Iterator[Any]:
    path = _chromium_or_skip()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # pragma: no cover - a dev dependency
        if os.environ.get("CI") == "true":
            pytest.fail(f"playwright is not installed: {e}")
        pytest.skip(f"playwright is not installed: {e}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=FLAGS)
        yield b
        b.close()


class Page:
    """A Playwright page that records console errors and page errors, with timestamps."""

    def __init__(self, browser: Any, shots: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[tuple[float, str]] = []
        self.requests: list[str] = []  # every URL the page asked for (offline: all of this server)
        self.shots = shots
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append((time.monotonic(), m.text))
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append((time.monotonic(), f"pageerror: {e}")))

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def js(self, expr: str, arg: Any = None) -> Any:
        return self.page.evaluate(expr, arg)

    def wait_js(self, expr: str, arg: Any = None, timeout: float = 90.0) -> Any:
        return self.page.wait_for_function(expr, arg=arg, timeout=timeout * 1000, polling=200).json_value()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Page]:
    shots = Path(os.environ.get("GRADWATCH_SCREENSHOT_DIR", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    p = Page(browser, shots)
    yield p
    p.page.close()
