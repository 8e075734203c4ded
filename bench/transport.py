"""Transport benchmark (issue 5): what streaming costs the training step, and how fast it arrives.

Side by side in one run, each variant on its own identically initialised copy of the model:

  none   plain training step, no gradwatch
  memory watch() into the in-memory sink (statistics, no transport): isolates the watcher's cost
  live   watch() streaming to a real ``gradwatch serve`` subprocess (SQLite, websocket)
  down   watch() pointed at a port where nothing listens (everything goes to the spool)
  slow   watch() streaming through a TCP relay (its own process) that holds every
         client->server chunk for ``--delay`` seconds: a server that answers slowly

Method (as bench/agent_overhead.py, docs/storage.md, Agent cost): after warm-up, each round runs every variant
for one untimed step and then a block of timed steps, the starting variant rotating. A round's
ratio is the variant's block median over the reference's block median in that round; the table
shows the median ratio over rounds with [min-max]. The watchers stay open across rounds, so the
down and slow variants carry a growing spool the whole time.

Latency: a subscriber process listens on ``WS /api/v1/runs/{run_id}/live`` for the live
variant's run and stamps each step's arrival; latency = arrival - end of the step (wall clock,
same machine), over every timed and untimed step of the live variant.

Memory: one more watcher streams 10,000 steps of a small model to the live server, then 10,000
steps to the dead port; the process RSS and the number of allocated Python memory blocks
(``sys.getallocatedblocks``, agent threads included) are sampled every 1,000 steps.

    .venv/bin/python bench/transport.py                 # ~3 min here
    .venv/bin/python bench/transport.py --rounds 4 --block 20 --memory-steps 2000   # quick
    .venv/bin/python bench/transport.py --write         # also append the section to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------
# helper processes: the delaying relay and the live subscriber


def relay_main(listen: int, target: int, delay: float) -> None:
    """A TCP relay that sleeps ``delay`` before forwarding each client->server chunk."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen))
    srv.listen(64)

    def pipe(a: socket.socket, b: socket.socket, d: float) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if d:
                    time.sleep(d)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        try:
            u = socket.create_connection(("127.0.0.1", target))
        except OSError:
            c.close()
            continue
        threading.Thread(target=pipe, args=(c, u, delay), daemon=True).start()
        threading.Thread(target=pipe, args=(u, c, 0.0), daemon=True).start()


def listen_main(url: str, run_id: str, out: str) -> None:
    """Subscribe to a run's live feed and write "step arrival_time" lines."""
    from websockets.sync.client import connect

    ws_url = url.replace("http", "ws", 1) + f"/api/v1/runs/{run_id}/live"
    with connect(ws_url) as ws, open(out, "w") as f:
        first = json.loads(ws.recv())
        assert first.get("type") == "subscribed", first
        print("ready", flush=True)
        try:
            while True:
                msg = json.loads(ws.recv())
                t = time.time()
                for s in msg.get("steps", []):
                    f.write(f"{s['step']} {t:.6f}\n")
                f.flush()
        except Exception:  # the server stopped at the end of the benchmark
            return


# ----------------------------------------------------------------------------------------------
# training


def _model(width: int, depth: int, seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    layers: list[Any] = []
    d = 64
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    layers.append(torch.nn.Linear(d, 10))
    return torch.nn.Sequential(*layers)


class Variant:
    def __init__(self, name: str, model: Any, server: str | None, spool: Path, run_id: str | None = None,
                 keep_ends: bool = True) -> None:
        import torch

        from gradwatch.agent import watch
        from gradwatch.agent.transport import make_sink

        self.name = name
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.w = None
        if server is not None:
            def factory(*, run: Any, layers: Any, rank: int) -> Any:
                return make_sink(server, run=run, layers=layers, rank=rank, spool_dir=spool / name,
                                 connect_timeout=2.0)

            self.w = watch(model, self.opt, server=server, run_id=run_id, sink=factory)
        self.g = torch.Generator().manual_seed(1)
        self.ends: dict[int, float] = {}
        self.keep_ends = keep_ends
        self.n = 0

    def step(self, batch: int) -> float:
        import torch

        x = torch.randn(batch, 64, generator=self.g)
        y = torch.randint(0, 10, (batch,), generator=self.g)
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.w is not None:
            self.w.log(loss=loss)
        dt = time.perf_counter() - t0
        if self.keep_ends:
            self.ends[self.n] = time.time()
        self.n += 1
        return dt


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _ratio_row(name: str, ratios: list[float]) -> str:
    m = statistics.median(ratios)
    return f"{name} | {m:.3f} ({(m - 1) * 100:+.1f}%) | [{min(ratios):.3f}-{max(ratios):.3f}]"


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=40, help="timed steps per variant per round")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--delay", type=float, default=0.5, help="slow server: seconds per client->server chunk")
    ap.add_argument("--memory-steps", type=int, default=10_000)
    ap.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--relay", nargs=3, type=float, help=argparse.SUPPRESS)
    ap.add_argument("--listen", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.relay:
        relay_main(int(a.relay[0]), int(a.relay[1]), a.relay[2])
        return 0
    if a.listen:
        listen_main(*a.listen)
        return 0

    import torch

    warnings.simplefilter("ignore")  # the down/slow variants warn once each, by design
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-transport-"))
    procs: list[subprocess.Popen[Any]] = []
    port, relay_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = " ".join(["python", "bench/transport.py", *sys.argv[1:]])
    try:
        srv = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", "serve", "--port", str(port), "--db",
                                f"sqlite:///{tmp / 'gw.db'}", "--log-level", "warning"],
                               stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(srv)
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        relay = subprocess.Popen([sys.executable, __file__, "--relay", str(relay_port), str(port), str(a.delay)],
                                 stdout=subprocess.PIPE, text=True)
        procs.append(relay)
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        live_id = os.urandom(16).hex()
        arrivals = tmp / "arrivals.txt"
        lst = subprocess.Popen([sys.executable, __file__, "--listen", url, live_id, str(arrivals)],
                               stdout=subprocess.PIPE, text=True)
        procs.append(lst)
        assert lst.stdout is not None and lst.stdout.readline().strip() == "ready"

        base = _model(a.width, a.depth)
        n_params = sum(p.numel() for p in base.parameters())
        n_tensors = len(list(base.parameters()))
        variants = [
            Variant("none", copy.deepcopy(base), None, tmp),
            Variant("memory", copy.deepcopy(base), "memory", tmp),
            Variant("live", copy.deepcopy(base), url, tmp, run_id=live_id),
            Variant("down", copy.deepcopy(base), f"http://127.0.0.1:{_free_port()}", tmp),
            Variant("slow", copy.deepcopy(base), f"http://127.0.0.1:{relay_port}", tmp),
        ]
        for v in variants:  # warm-up
            for _ in range(5):
                v.step(a.batch)
        blocks: dict[str, list[list[float]]] = {v.name: [] for v in variants}
        backlog: dict[str, int] = {}
        t_start = time.monotonic()
        for r in range(a.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                v.step(a.batch)  # untimed: absorbs what the previous variant left behind
                blocks[v.name].append([v.step(a.batch) for _ in range(a.block)])
                if v.w is not None and v.name != "memory":
                    backlog[v.name] = max(backlog.get(v.name, 0), v.w.stats()["batches_unsent"])
        bench_s = time.monotonic() - t_start

        def ratios(name: str, ref: str) -> list[float]:
            return [statistics.median(x) / statistics.median(y) for x, y in zip(blocks[name], blocks[ref])]

        med = {k: statistics.median([t for b in v for t in b]) for k, v in blocks.items()}
        p95 = {k: _pct([t for b in v for t in b], 0.95) for k, v in blocks.items()}
        mx = {k: max(t for b in v for t in b) for k, v in blocks.items()}
        stats = {v.name: v.w.stats() for v in variants if v.w is not None and v.name != "memory"}

        summary = {k: round(v * 1e3, 2) for k, v in med.items()}
        sys.stderr.write(f"timed rounds done in {bench_s:.0f} s; medians (ms): {summary}; down/live "
                         f"{statistics.median(ratios('down', 'live')):.3f} slow/live "
                         f"{statistics.median(ratios('slow', 'live')):.3f}\n")
        sys.stderr.flush()
        live = variants[2]
        assert live.w is not None
        live.w.flush(30)
        time.sleep(1.0)
        got: dict[int, float] = {}
        for line in arrivals.read_text().splitlines():
            s, t = line.split()
            got.setdefault(int(s), float(t))
        lat = [got[s] - live.ends[s] for s in live.ends if s in got]
        missing = len(live.ends) - len(lat)
        for v in variants:
            if v.w is not None and v.name != "memory":
                v.w.close(timeout=2 if v.name in ("down", "slow") else 20)

        # memory over N steps, live then down
        mem_rows = []
        for name, target in (("live", url), ("down", f"http://127.0.0.1:{_free_port()}")):
            m = _model(64, 4, seed=1)
            v = Variant(f"mem-{name}", m, target, tmp, keep_ends=False)
            samples = []
            t0 = time.monotonic()
            every = max(1, a.memory_steps // 10)
            for i in range(1, a.memory_steps + 1):
                v.step(32)
                if i % every == 0 or i == 100:
                    # RSS, and Python's allocated blocks (cheap, unlike tracemalloc, which would
                    # slow every allocation of the training loop)
                    samples.append((i, _rss_mib(), sys.getallocatedblocks() / 1000))
            el = time.monotonic() - t0
            assert v.w is not None
            st = v.w.stats()
            v.w.close(timeout=2 if name == "down" else 20)
            mem_rows.append((name, samples, st, el))
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
            except Exception:
                p.kill()

    # ------------------------------------------------------------------ report
    out = []
    out.append("## Transport (issue 5)\n")
    out.append(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {os.cpu_count()} "
               f"vCPU (shared, noisy), Python {platform.python_version()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch threads. Command: `{cmd}` ({bench_s:.0f} s of interleaved "
               "training).\n")
    out.append(f"Model: MLP {a.depth}x{a.width} ({n_tensors} parameter tensors, {n_params / 1e6:.2f} M parameters), "
               f"batch {a.batch}, SGD+momentum, `watch(every=1)` + `w.log(loss=...)` every step. "
               f"{a.rounds} rounds x {a.block} timed steps per variant; server: `gradwatch serve` on SQLite, "
               f"same machine. Slow server: a relay process holding each client->server chunk {a.delay:g} s.\n")
    out.append("| variant | median step | p95 step | max step |")
    out.append("|---|---|---|---|")
    for k in ("none", "memory", "live", "down", "slow"):
        out.append(f"| {k} | {med[k] * 1e3:.2f} ms | {p95[k] * 1e3:.2f} ms | {mx[k] * 1e3:.1f} ms |")
    out.append("")
    out.append("| ratio (median over rounds of block-median ratios) | value | [min-max over rounds] |")
    out.append("|---|---|---|")
    out.append("| " + _ratio_row("down / live", ratios("down", "live")) + " |")
    out.append("| " + _ratio_row("slow / live", ratios("slow", "live")) + " |")
    out.append("| " + _ratio_row("live / memory (the transport: drainer + sender threads, server on the same CPU)",
                                 ratios("live", "memory")) + " |")
    out.append("| " + _ratio_row("memory / none (the watcher's statistics alone, records kept in a list)",
                                 ratios("memory", "none")) + " |")
    out.append("| " + _ratio_row("live / none (the whole agent: statistics + transport)", ratios("live", "none")) + " |")
    out.append("| " + _ratio_row("down / none", ratios("down", "none")) + " |")
    out.append("| " + _ratio_row("slow / none", ratios("slow", "none")) + " |")
    out.append("")
    out.append("Sink counters at the end of the timed rounds (records; `spooled` = on disk, not yet acknowledged):\n")
    for k, st in stats.items():
        out.append(f"- {k}: sent {st['sent']}, spooled {st['spooled']}, dropped {st['dropped']}, "
                   f"rejected {st['rejected']}, reconnects {st['reconnects']}, batches {st['batches']}; "
                   f"largest backlog seen after a block: {backlog.get(k, 0)} unacknowledged batches")
    out.append("")
    if lat:
        out.append(f"End-to-end latency, end of step -> arrival on `WS /api/v1/runs/{{id}}/live` (live variant, "
                   f"{len(lat)} steps, {missing} not seen): **p50 {statistics.median(lat) * 1e3:.0f} ms, "
                   f"p95 {_pct(lat, 0.95) * 1e3:.0f} ms**, max {max(lat) * 1e3:.0f} ms "
                   f"(flush interval 200 ms).\n")
    out.append(f"Agent memory over {a.memory_steps} steps (MLP 4x64, batch 32; RSS of the training process in "
               "MiB / allocated Python blocks in thousands):\n")
    out.append("| server | " + " | ".join(f"step {i}" for i, _, _ in mem_rows[0][1]) + " | end counters |")
    out.append("|---|" + "---|" * (len(mem_rows[0][1]) + 1))
    for name, samples, st, el in mem_rows:
        cells = " | ".join(f"{rss:.0f} / {heap:.0f}k" for _, rss, heap in samples)
        out.append(f"| {name} | {cells} | sent {st['sent']}, spooled {st['spooled']}, dropped {st['dropped']} "
                   f"({el:.0f} s) |")
    out.append("")
    text = "\n".join(out)
    print(text)
    if a.write:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
