"""Fixtures for the transport tests: a real ``gradwatch serve`` subprocess, a delaying TCP relay,
record factories and exact-once checks on the server's SQLite database (opened read-only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.wire import Event, LayerInfo, RunInfo, ScalarRecord, StepRecord

REPO = Path(__file__).resolve().parents[2]


class BlockingIO:
    """Records which threads do network or disk-sync calls while active.

    "The server is slow or down never slows a step" is checked by structure, not by timing
    (these machines are shared): the training thread must make no socket call and no fsync, so
    nothing the server does can reach it.
    """

    _SOCKET = ("connect", "connect_ex", "send", "sendall", "recv", "recv_into", "sendto", "recvfrom")

    def __init__(self) -> None:
        self.threads: dict[int, set[str]] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        self._lock = threading.Lock()

    def _wrap(self, owner: Any, name: str) -> None:
        orig = getattr(owner, name)
        rec = self

        def wrapper(*a: Any, **k: Any) -> Any:
            with rec._lock:
                rec.threads.setdefault(threading.get_ident(), set()).add(name)
            return orig(*a, **k)

        self._saved.append((owner, name, orig))
        setattr(owner, name, wrapper)

    def __enter__(self) -> BlockingIO:
        for name in self._SOCKET:
            self._wrap(socket.socket, name)
        self._wrap(socket, "create_connection")
        self._wrap(os, "fsync")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)

    def on(self, ident: int) -> set[str]:
        return self.threads.get(ident, set())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProc:
    """``python -m gradwatch.cli serve`` on SQLite in a temp dir; kill -9 and restart it."""

    def __init__(self, root: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.db = root / "gw.db"
        self.port = port or free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "GRADWATCH_TOKEN"}
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ServerProc:
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradwatch.cli", "serve", "--port", str(self.port), "--db",
             f"sqlite:///{self.db}", "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.root / f'server-{self.starts}.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("server did not come up")

    def state(self) -> str:
        """Whether the process lives (or how it ended) and its log's tail: the message of a failed
        delivery assertion, so that a server that went away says why (a signal ends uvicorn with
        its negative number; a graceful shutdown logs it)."""
        if self.proc is None:
            return "server stopped by the test"
        rc = self.proc.poll()
        alive = f"pid {self.proc.pid} running" if rc is None else f"pid {self.proc.pid} exited with {rc}"
        log = self.root / f"server-{self.starts}.log"
        return f"{alive}; log: {log.read_text(errors='replace')[-2000:] if log.exists() else '(none)'}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[ServerProc] = []

    def make(**kw: Any) -> ServerProc:
        root = tmp_path / f"srv{len(made)}"
        root.mkdir()
        s = ServerProc(root, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def server(server_factory: Any) -> ServerProc:
    return server_factory().start()  # type: ignore[no-any-return]


def db_counts(db: Path, run_id: str) -> dict[str, Any]:
    """Exact-once view of one run, straight from the server's SQLite file (read-only)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        q = con.execute
        steps = q("SELECT step, rank, COUNT(*) FROM step_record WHERE run_id=? GROUP BY step, rank",
                  (run_id,)).fetchall()
        stats = q("SELECT ls.step, ls.rank, COUNT(*) FROM layer_stat ls JOIN layer l ON l.id = ls.layer_id "
                  "WHERE l.run_id=? GROUP BY ls.step, ls.rank", (run_id,)).fetchall()
        scalars = q("SELECT step, rank, COUNT(*) FROM scalar WHERE run_id=? GROUP BY step, rank",
                    (run_id,)).fetchall()
        events = q("SELECT COUNT(*) FROM event WHERE run_id=?", (run_id,)).fetchone()[0]
        layers = q("SELECT COUNT(*) FROM layer WHERE run_id=?", (run_id,)).fetchone()[0]
        status = q("SELECT status FROM run WHERE id=?", (run_id,)).fetchone()
        batches = q("SELECT COUNT(*) FROM ingest_batch WHERE run_id=?", (run_id,)).fetchone()[0]
    finally:
        con.close()
    return {"steps": {(s, r): n for s, r, n in steps}, "stats": {(s, r): n for s, r, n in stats},
            "scalars": {(s, r): n for s, r, n in scalars}, "events": events, "layers": layers,
            "status": status[0] if status else None, "batches": batches}


def assert_exactly_once(db: Path, run_id: str, steps: range, n_layers: int, ranks: tuple[int, ...] = (0,),
                        scalars_per_step: int = 1, status: str | None = "finished") -> dict[str, Any]:
    c = db_counts(db, run_id)
    want = {(s, r) for s in steps for r in ranks}
    assert set(c["steps"]) == want, f"missing {sorted(want - set(c['steps']))[:10]} extra " \
                                    f"{sorted(set(c['steps']) - want)[:10]}"
    assert all(n == 1 for n in c["steps"].values())
    assert c["stats"] == {k: n_layers for k in want}, "every step must have every layer exactly once"
    if scalars_per_step:
        assert c["scalars"] == {k: scalars_per_step for k in want}
    assert c["layers"] == n_layers
    if status is not None:
        assert c["status"] == status
    return c


def layers_of(n: int) -> list[LayerInfo]:
    return [LayerInfo(i, f"block{i // 2}.{'weight' if i % 2 == 0 else 'bias'}", [8, 8] if i % 2 == 0 else [8],
                      "float32") for i in range(n)]


def step_record(step: int, n_layers: int, rank: int = 0, nan: bool = False) -> StepRecord:
    v = float(step % 7) + 0.5
    return StepRecord(
        step=step, time=time.time(), rank=rank, layer_ids=list(range(n_layers)),
        layers={"numel": [64] * n_layers, "mean": [v * 1e-3] * n_layers, "m2": [v * 64] * n_layers,
                "l2": [float("nan") if nan else v * 3] * n_layers,
                "maxabs": [v * 2] * n_layers, "nonfinite": [1 if nan else 0] * n_layers,
                "l2_post": [None] * n_layers, "wnorm": [v * 5] * n_layers},
        total_norm=v * 10, clip_coef=None, loss_scale=None, skipped=False)


def scalar_record(step: int, rank: int = 0) -> ScalarRecord:
    return ScalarRecord(step=step, time=time.time(), values={"loss": 1.0 / (step + 1)}, rank=rank)


def event(step: int) -> Event:
    return Event(kind="spike", step=step, time=time.time(), data={"l2": float("inf")})


def new_run(run_id: str | None = None) -> RunInfo:
    return RunInfo(run_id=run_id or os.urandom(16).hex(), project="transport-tests", world_size=1)


class DelayRelay:
    """A real TCP relay in front of the server that sleeps ``delay`` seconds before forwarding
    each chunk from the client: a server that answers slowly, without touching the server.
    ``hold`` keeps the client's side open that many seconds after the server's side closed: a
    connection whose break the client learns of late."""

    def __init__(self, target_port: int, delay: float, hold: float = 0.0) -> None:
        self.target = target_port
        self.delay = delay
        self.hold = hold
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            threading.Thread(target=self._pipe, args=(c, u, self.delay, self.hold), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, 0.0, self.hold), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, delay: float, hold: float = 0.0) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                b.sendall(data)
        except OSError:
            pass
        finally:
            if hold:
                time.sleep(hold)
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradwatch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class FlakyProxy:
    """A real TCP proxy in front of the server that, while ``failing`` is set, answers every
    request itself with ``status`` (an HTTP response, also to websocket upgrades) instead of
    forwarding it: a server behind a load balancer that is restarting. Counts its refusals."""

    def __init__(self, target_port: int, status: int = 503, failing: bool = True) -> None:
        self.target = target_port
        self.status = status
        self.failing = failing
        self.refused = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        if self.failing:
            try:
                c.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                body = json.dumps({"detail": "maintenance"}).encode()
                c.sendall(f"HTTP/1.1 {self.status} Service Unavailable\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                with self._lock:
                    self.refused += 1
            except OSError:
                pass
            finally:
                c.close()
            return
        try:
            u = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            c.close()
            return
        with self._lock:
            self._open += [c, u]
        threading.Thread(target=DelayRelay._pipe, args=(c, u, 0.0), daemon=True).start()
        threading.Thread(target=DelayRelay._pipe, args=(u, c, 0.0), daemon=True).start()

    def fail(self) -> None:
        """Start refusing, and cut the connections being relayed (the server behind went away)."""
        self.failing = True
        with self._lock:
            socks, self._open = self._open, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


class DiskQuota:
    """A spool directory on a tiny filesystem, emulated: the spool's raw writes fail with ENOSPC
    (after writing the part that fits, as a real full disk does) once the files under ``root``
    hold ``limit`` bytes. Raise ``limit`` to free space."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.failures = 0

    def used(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) if self.root.exists() else 0

    def __enter__(self) -> DiskQuota:
        import errno

        from gradwatch.agent.transport import spool

        self._orig = orig = spool._write_all
        quota = self

        def write_all(f: Any, data: bytes) -> None:
            room = quota.limit - quota.used()
            if room < len(data):
                if room > 0:
                    orig(f, data[:room])
                quota.failures += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            orig(f, data)

        spool._write_all = write_all
        return self

    def __exit__(self, *exc: Any) -> None:
        from gradwatch.agent.transport import spool

        spool._write_all = self._orig


class ReadOnlySpool:
    """A spool directory that cannot be written, emulated (root ignores ``chmod 0555``): while
    ``on``, the spool's opens for writing under ``root`` and its writes fail with ``err``
    (``EROFS``: a read-only mount; ``EACCES``: no write permission). Set ``on = False`` to make
    it writable again."""

    def __init__(self, root: Path, err: int) -> None:
        self.root = root
        self.err = err
        self.on = True
        self.failures = 0

    def _fail(self, path: Any = None) -> None:
        self.failures += 1
        raise OSError(self.err, os.strerror(self.err), *([str(path)] if path is not None else []))

    def __enter__(self) -> ReadOnlySpool:
        import builtins

        from gradwatch.agent.transport import spool

        self._write_all = orig = spool._write_all
        ro = self

        def ro_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if ro.on and any(c in mode for c in "wax+") and Path(file).absolute().is_relative_to(ro.root):
                ro._fail(file)
            return builtins.open(file, mode, *a, **k)

        def write_all(f: Any, data: bytes) -> None:
            if ro.on:
                ro._fail()
            orig(f, data)

        spool.open = ro_open  # type: ignore[attr-defined]  # (shadows the builtin in that module)
        spool._write_all = write_all
        return self

    def __exit__(self, *exc: Any) -> None:
        from gradwatch.agent.transport import spool

        spool._write_all = self._write_all
        del spool.open  # type: ignore[attr-defined]


def summary_line(err: str) -> str:
    """The agent's one end-of-run line in captured stderr."""
    lines = [ln for ln in err.splitlines() if ln.startswith("gradwatch: run ")]
    assert len(lines) == 1, err
    return lines[0]


def wait_for(cond: Any, timeout: float = 60.0) -> None:
    """Poll ``cond`` until true (a condition, not a timed assertion: the timeout only ends a hang)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
