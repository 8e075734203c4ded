"""Soak scenario (issue 13): many agents into one real server while things go wrong. Not a test.

Real processes throughout: one ``gradwatch serve`` (SQLite) and ``--agents`` agent processes,
each streaming ``--steps`` step records (``--layers`` layer rows each) plus one scalar per step
through the network sink, at about ``--rate`` steps per second. While they run:

- **freeze**: the server is stopped with SIGSTOP for ``--freeze`` seconds, then continued;
- **server kill**: the server is killed with SIGKILL and restarted ``--down`` seconds later;
- **full spool**: the last agent's spool sits on a "tiny disk" (its writes fail with ENOSPC past
  ``--quota`` bytes, emulated in that process) and may hold only ``--memory-kb`` in memory;
- **agent kill**: the agent before it is killed with SIGKILL mid-run; its spool is sent
  afterwards with ``gradwatch upload``.

Each agent reports what it put and what its sink counted (delivered, still spooled, lost with
the reason); the table compares, per agent, the records expected (step records + scalars put),
the records the server stored (read from its database), and those the agent reported lost with
the reason. ``unaccounted`` = expected - stored - lost must be 0, except for the killed agent
(records put but not yet written to its spool when it died: at most ``flush_interval`` of them).
``server lost`` is what the server's run says its agent lost (``GET /api/v1/runs/{id}``,
``lost_records``, from the agent's end-of-run record): it must equal ``lost``.

    .venv/bin/python bench/soak.py                      # ~1.5 min here
    .venv/bin/python bench/soak.py --agents 4 --steps 1000   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------ one agent process


def agent_main(a: argparse.Namespace) -> None:
    from gradwatch.agent.transport import make_sink
    from gradwatch.agent.wire import LayerInfo, RunInfo, ScalarRecord, StepRecord

    if a.quota:
        _tiny_disk(Path(a.spool), a.quota)
    n = a.layers
    layers = [LayerInfo(i, f"layer.{i}", [64, 64], "float32") for i in range(n)]
    opts: dict[str, Any] = {"spool_dir": a.spool, "close_timeout": a.close_timeout, "connect_timeout": 2.0,
                            "backoff_max": 2.0}
    if a.memory_kb:
        opts["memory_bytes"] = a.memory_kb * 1024
    sink = make_sink(a.url, run=RunInfo(run_id=a.run_id, project="soak"), layers=lambda: layers, **opts)
    progress = open(a.progress, "w")
    t0 = time.monotonic()
    for s in range(a.steps):
        v = 1.0 + (s % 13) / 7
        sink.put(StepRecord(step=s, time=time.time(), layer_ids=list(range(n)),
                            layers={"numel": [4096] * n, "mean": [v * 1e-3] * n, "m2": [v * 4096] * n,
                                    "l2": [v * 64] * n, "maxabs": [v * 3] * n, "nonfinite": [0] * n,
                                    "l2_post": [None] * n, "wnorm": [None] * n},
                            total_norm=v * 10))
        sink.put(ScalarRecord(step=s, time=time.time(), values={"loss": 1.0 / (s + 1)}))
        progress.seek(0)  # every step: the killed agent's count must be exact
        progress.write(f"{s + 1:>12}")
        progress.flush()
        ahead = (s + 1) / a.rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    sink.close()
    st = sink.stats()
    out = {"put": 2 * a.steps, "stats": st, "lost_reasons": sink.lost_reasons()}
    Path(a.out).write_text(json.dumps(out))


def _tiny_disk(root: Path, limit: int) -> None:
    """The spool's raw writes fail with ENOSPC (after writing what fits) once ``root`` holds
    ``limit`` bytes: a spool on a tiny filesystem, without mounting one."""
    import errno

    from gradwatch.agent.transport import spool

    orig = spool._write_all

    def used() -> int:
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0

    def write_all(f: Any, data: bytes) -> None:
        room = limit - used()
        if room < len(data):
            if room > 0:
                orig(f, data[:room])
            raise OSError(errno.ENOSPC, "No space left on device")
        orig(f, data)

    spool._write_all = write_all


# ------------------------------------------------------------------ the scenario


class Server:
    def __init__(self, db: Path, port: int, log: Path) -> None:
        self.db, self.port, self.log = db, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", "serve", "--port", str(self.port),
                                          "--db", f"sqlite:///{self.db}", "--log-level", "warning"],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log.read_text()[-2000:]) from None
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # a server that does not stop must not hang the bench
                self.proc.kill()
                self.proc.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stored(db: Path, run_id: str) -> tuple[int, int, int, str | None]:
    """(step records, scalars, layer rows, status) of a run, read from the server's database."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        q = con.execute
        steps = q("SELECT COUNT(*) FROM step_record WHERE run_id=?", (run_id,)).fetchone()[0]
        scalars = q("SELECT COUNT(*) FROM scalar WHERE run_id=?", (run_id,)).fetchone()[0]
        rows = q("SELECT COUNT(*) FROM layer_stat s JOIN layer l ON l.id = s.layer_id WHERE l.run_id=?",
                 (run_id,)).fetchone()[0]
        dup = q("SELECT COUNT(*) FROM (SELECT step FROM step_record WHERE run_id=? GROUP BY step, rank "
                "HAVING COUNT(*) > 1)", (run_id,)).fetchone()[0]
        assert dup == 0, f"{dup} duplicated steps in run {run_id}"
        st = q("SELECT status FROM run WHERE id=?", (run_id,)).fetchone()
    finally:
        con.close()
    return steps, scalars, rows, st[0] if st else None


def server_lost(url: str, run_id: str) -> int | None:
    """The records the server says the run's agents lost (from their end-of-run records)."""
    try:
        with urllib.request.urlopen(f"{url}/api/v1/runs/{run_id}", timeout=30) as r:
            v = json.loads(r.read()).get("lost_records")
    except (OSError, ValueError):
        return None
    return v if isinstance(v, int) else None


def scenario(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    srv = Server(tmp / "gw.db", _free_port(), tmp / "server.log")
    srv.start()
    n = a.agents
    killed, tiny = (n - 2, n - 1) if n >= 2 else (-1, n - 1)
    procs = []
    run_ids = [f"soak-{os.getpid()}-{i}" for i in range(n)]
    for i in range(n):
        cmd = [sys.executable, str(HERE), "agent", "--url", srv.url, "--run-id", run_ids[i], "--steps", str(a.steps),
               "--layers", str(a.layers), "--rate", str(a.rate), "--spool", str(tmp / f"spool-{i}"),
               "--progress", str(tmp / f"progress-{i}"), "--out", str(tmp / f"agent-{i}.json"),
               "--close-timeout", str(a.close_timeout)]
        if i == tiny:
            cmd += ["--quota", str(a.quota), "--memory-kb", str(a.memory_kb)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / f"agent-{i}.err", "wb")))
    run_s = a.steps / a.rate
    timeline = [(0.15 * run_s, "freeze"), (0.15 * run_s + a.freeze, "thaw"), (0.35 * run_s, "kill agent"),
                (0.5 * run_s, "kill server"), (0.5 * run_s + a.down, "restart server")]
    t0 = time.monotonic()
    log = []
    for at, what in timeline:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        log.append(f"{time.monotonic() - t0:5.1f} s {what}")
        if what == "freeze":
            srv.signal(signal.SIGSTOP)
        elif what == "thaw":
            srv.signal(signal.SIGCONT)
        elif what == "kill agent" and killed >= 0:
            procs[killed].send_signal(signal.SIGKILL)
        elif what == "kill server":
            srv.signal(signal.SIGKILL)
        elif what == "restart server":
            srv.start()
    for p in procs:
        p.wait()
    if killed >= 0:  # the killed agent's spool, sent by hand as its user would
        up = subprocess.run([sys.executable, "-m", "gradwatch.cli", "upload", str(tmp / f"spool-{killed}"),
                             "--server", srv.url], capture_output=True, text=True)
        log.append(f"upload of agent {killed}'s spool: rc {up.returncode}: {up.stdout.strip().splitlines()[-1:]}")
    print(f"# gradwatch bench/soak.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  agents={n} "
          f"steps={a.steps} layers={a.layers} rate={a.rate}/s freeze={a.freeze}s down={a.down}s "
          f"quota={a.quota}B memory={a.memory_kb}KB")
    for line in log:
        print(f"#   {line}")
    print(f"{'agent':<14}{'expected':>10}{'stored':>10}{'lost':>8}  {'lost reason':<18}{'unaccounted':>12}  "
          f"{'layer rows':>11}  {'server lost':>11}  status")
    totals = [0, 0, 0, 0]
    for i in range(n):
        steps, scalars, rows, status = stored(srv.db, run_ids[i])
        got = steps + scalars
        if i == killed:
            put = 2 * int((tmp / f"progress-{i}").read_text().strip() or 0)
            lost, why, label = 0, "killed (SIGKILL)", f"{i} killed"
        else:
            rep = json.loads((tmp / f"agent-{i}.json").read_text())
            put, reasons = rep["put"], rep["lost_reasons"]
            lost = sum(reasons.values())
            left = rep["stats"]["spooled"] + rep["stats"]["dropped"]
            why = ", ".join(f"{r}" for r in reasons) or "-"
            if left:
                why += f" (+{left} left in spool/dropped)"
            label = f"{i} tiny disk" if i == tiny else str(i)
        unacc = put - got - lost
        totals = [totals[0] + put, totals[1] + got, totals[2] + lost, totals[3] + unacc]
        srv_lost = server_lost(srv.url, run_ids[i])
        print(f"{label:<14}{put:>10}{got:>10}{lost:>8}  {why:<18}{unacc:>12}  {rows:>11}  "
              f"{'?' if srv_lost is None else srv_lost:>11}  {status}")
    print(f"{'total':<14}{totals[0]:>10}{totals[1]:>10}{totals[2]:>8}  {'':<18}{totals[3]:>12}")
    srv.stop()
    errors = [ln for ln in (tmp / "server.log").read_text().splitlines() if "database is locked" in ln]
    print(f"# server log: {len(errors)} 'database is locked'; files in {tmp}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    ag = sub.add_parser("agent", help="(internal) one agent process")
    for k, t in (("--url", str), ("--run-id", str), ("--steps", int), ("--layers", int), ("--rate", float),
                 ("--spool", str), ("--progress", str), ("--out", str), ("--close-timeout", float)):
        ag.add_argument(k, type=t, required=True)
    ag.add_argument("--quota", type=int, default=0)
    ag.add_argument("--memory-kb", type=int, default=0)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3000, help="steps per agent")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--rate", type=float, default=100.0, help="steps per second per agent")
    ap.add_argument("--freeze", type=float, default=10.0, help="seconds the server is stopped (SIGSTOP)")
    ap.add_argument("--down", type=float, default=6.0, help="seconds the killed server stays down")
    ap.add_argument("--quota", type=int, default=64 * 1024, help="bytes of the tiny disk under one agent's spool")
    ap.add_argument("--memory-kb", type=int, default=256, help="memory that agent may hold beyond its spool")
    ap.add_argument("--close-timeout", type=float, default=120.0)
    a = ap.parse_args()
    if a.cmd == "agent":
        agent_main(a)
    else:
        scenario(a)


if __name__ == "__main__":
    main()
