"""Ingest and query benchmark for the gradwatch server (issue 4). Not a test.

Part 1, ingest: the same layer rows go (a) through the real server (uvicorn subprocess, the
agent's websocket protocol, pipelined) into SQLite and into PostgreSQL, and (b) straight into the
same migrated schema with the raw driver's best bulk path (sqlite3 ``executemany`` / psycopg
binary ``COPY``), one transaction per batch in both cases. The ratio (a)/(b) is the target
(>= 0.5).

Part 2, queries: one run of ``--rows`` layer rows (200 layers, step-major, as ingest lays them
down) is built inside each database, then the real server answers a 1,000-point downsampled
series of one layer and a 200-layer heatmap (median of several calls over HTTP).

    .venv/bin/python bench/ingest.py --ingest-rows 500000 --rows 20000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gradwatch.agent import wire

LAYERS = 200
STEPS_PER_BATCH = 25
PG_ADMIN = os.environ.get("GRADWATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# ------------------------------------------------------------------ helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh, migrated database URL of ``kind``; dropped afterwards."""
    from gradwatch.server.db.engine import make_engine
    from gradwatch.server.db.migrate import upgrade_to_head

    if kind == "sqlite":
        url = f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        dropper = None
    else:
        import psycopg

        name = f"gw_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(_libpq(PG_ADMIN), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        url = PG_ADMIN.rpartition("/")[0] + "/" + name

        def dropper() -> None:
            with psycopg.connect(_libpq(PG_ADMIN), autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    try:
        yield url
    finally:
        if dropper:
            dropper()


@contextmanager
def server(url: str, log: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update(extra_env or {})
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gradwatch.cli", "serve", "--port", str(port), "--db", url,
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(log.read_text()[-2000:]) from None
                time.sleep(0.2)
        server.pid = proc.pid  # type: ignore[attr-defined]  # for the memory figure
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def make_batches(n_rows: int, run_id: str, seed: int = 0) -> list[wire.Batch]:
    rnd = random.Random(seed)
    out = []
    step = 1
    n_batches = max(1, n_rows // (LAYERS * STEPS_PER_BATCH))
    layers = [wire.LayerInfo(i, f"model.layers.{i}.weight", [256, 256], "float32") for i in range(LAYERS)]
    ids = list(range(LAYERS))
    for b in range(n_batches):
        steps = []
        for _ in range(STEPS_PER_BATCH):
            mean = [rnd.gauss(0, 1e-4) for _ in range(LAYERS)]
            std = [rnd.uniform(1e-4, 1e-2) for _ in range(LAYERS)]
            l2 = [s * 256 for s in std]
            steps.append(wire.StepRecord(
                step=step, time=time.time(), layer_ids=ids,
                layers={"numel": [65536] * LAYERS, "mean": mean, "m2": [s * s * 65536 for s in std], "l2": l2,
                        "maxabs": [s * rnd.uniform(3, 6) for s in std], "nonfinite": [0] * LAYERS,
                        "l2_post": [x * rnd.uniform(0.5, 1) for x in l2], "wnorm": [x * 40 for x in l2]},
                total_norm=1.0, clip_coef=1.0, loss_scale=65536.0))
            step += 1
        out.append(wire.Batch(run=wire.RunInfo(run_id=run_id), seq=b + 1, layers=layers if b == 0 else [],
                              steps=steps))
    return out


# ------------------------------------------------------------------ part 1: ingest

def ingest_via_server(url: str, batches: list[bytes], rows: int, tmp: Path, window: int = 8,
                      env: dict[str, str] | None = None) -> float:
    from websockets.sync.client import connect

    with server(url, tmp / "bench-server.log", env) as base:
        with connect(base.replace("http", "ws") + "/api/v1/ingest/ws", max_size=None, compression=None) as ws:
            sem = threading.Semaphore(window)
            done = threading.Event()
            last: list[dict] = []

            def reader() -> None:
                for _ in batches:
                    last[:] = [json.loads(ws.recv(timeout=300))]
                    if last[0].get("type") != "ack":
                        raise RuntimeError(last[0])
                    sem.release()
                done.set()

            t = threading.Thread(target=reader, daemon=True)
            t0 = time.perf_counter()
            t.start()
            for b in batches:
                sem.acquire()
                ws.send(b)  # a binary frame of UTF-8 JSON (the protocol accepts text or binary)
            done.wait(600)
            dt = time.perf_counter() - t0
            assert last and last[0]["acked"] == len(batches), last
    return rows / dt


def ingest_raw(kind: str, url: str, batches: list[wire.Batch], stream: bool = False) -> float:
    """The raw driver's best: pre-built tuples, one executemany/COPY + commit per batch.

    ``stream`` (PostgreSQL): COPY a pre-built binary stream instead of ``write_row`` tuples (the
    server builds its stream the same way, in numpy), so neither side is timed building input."""
    from gradwatch.server.db.engine import make_engine
    from gradwatch.server.repo.ingest import _LAYER_STAT_COLUMNS, _PG_COPY, _PG_TYPES, ensure_run

    engine = make_engine(url)
    with engine.begin() as conn:
        ensure_run(conn, batches[0], time.time())
        conn.exec_driver_sql("INSERT INTO layer (run_id, idx, name, dtype, sparse) VALUES " + ",".join(
            f"('{batches[0].run.run_id}', {i}, 'l{i}', '', {'false' if kind != 'sqlite' else 0})" for i in range(LAYERS)))
        ids = dict(conn.exec_driver_sql("SELECT idx, id FROM layer").all())
    engine.dispose()
    prepared = []
    for b in batches:
        rows = []
        for s in b.steps:
            c = s.layers
            rows.extend(zip([ids[i] for i in s.layer_ids], [s.step] * LAYERS, [0] * LAYERS,
                            *(c.get(k) or [None] * LAYERS for k in wire.LAYER_FIELDS), [0] * LAYERS))
        prepared.append(rows)
    n = sum(len(r) for r in prepared)
    if stream:
        from gradwatch.server.repo.frame import LayerFrame

        streams = [LayerFrame.from_batch(b, ids).copy_binary() for b in batches]
    if kind == "sqlite":
        import sqlite3

        con = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        sql = (f"INSERT INTO layer_stat ({', '.join(_LAYER_STAT_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(_LAYER_STAT_COLUMNS))})")
        t0 = time.perf_counter()
        for rows in prepared:
            con.execute("BEGIN")
            con.executemany(sql, rows)
            con.execute("COMMIT")
        dt = time.perf_counter() - t0
        con.close()
    else:
        import psycopg

        with psycopg.connect(_libpq(url)) as con:
            t0 = time.perf_counter()
            for i, rows in enumerate(prepared):
                with con.cursor() as cur, cur.copy(_PG_COPY) as cp:
                    if stream:
                        cp.write(streams[i])
                        continue
                    cp.set_types(_PG_TYPES)
                    for r in rows:
                        cp.write_row(r)
                con.commit()
            dt = time.perf_counter() - t0
    return n / dt


# ------------------------------------------------------------------ part 2: queries

def build_big_run(kind: str, url: str, rows: int) -> tuple[str, int]:
    """One run of ``rows`` layer rows (200 layers, step-major), built inside the database."""
    steps = rows // LAYERS
    run_id = "big"
    if kind == "sqlite":
        import sqlite3

        con = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("BEGIN")
        con.execute("INSERT INTO run (id, project, status, world_size, created_at, updated_at, last_step, "
                    "coarse_through) VALUES (?, 'bench', 'finished', 1, 0, 0, ?, ?)", (run_id, steps, _mark(steps)))
        con.executemany("INSERT INTO layer (run_id, idx, name, dtype, sparse) VALUES (?, ?, ?, '', 0)",
                        [(run_id, i, f"model.layers.{i}.weight") for i in range(LAYERS)])
        con.execute("COMMIT")
        ids = [r[0] for r in con.execute("SELECT id FROM layer WHERE run_id = ? ORDER BY idx", (run_id,))]
        sql = ("INSERT INTO layer_stat (layer_id, step, rank, numel, mean, m2, l2, maxabs, nonfinite, l2_post, "
               "wnorm, nan_mask) VALUES (?, ?, 0, 65536, ?, ?, ?, ?, 0, NULL, ?, 0)")
        rnd = random.Random(1)
        chunk = 500
        for s0 in range(1, steps + 1, chunk):
            data = []
            for s in range(s0, min(s0 + chunk, steps + 1)):
                for lid in ids:
                    v = rnd.random() + (100.0 if s % 9973 == 0 else 0.0)
                    data.append((lid, s, v, v * 65536, v, v, v))
            con.execute("BEGIN")
            con.executemany(sql, data)
            con.execute("COMMIT")
        _rollup_sqlite(con, ids, steps)
        con.execute("ANALYZE")
        con.close()
    else:
        import psycopg

        with psycopg.connect(_libpq(url), autocommit=True) as con:
            con.execute("INSERT INTO run (id, project, status, world_size, created_at, updated_at, last_step, "
                        "coarse_through) VALUES (%s, 'bench', 'finished', 1, 0, 0, %s, %s)", (run_id, steps, _mark(steps)))
            con.execute("INSERT INTO layer (run_id, idx, name, dtype, sparse) "
                        "SELECT %s, i, 'model.layers.' || i || '.weight', '', false FROM generate_series(0, %s) i",
                        (run_id, LAYERS - 1))
            con.execute(
                "INSERT INTO layer_stat (layer_id, step, rank, numel, mean, m2, l2, maxabs, nonfinite, "
                "l2_post, wnorm, nan_mask) SELECT l.id, s, 0, 65536, v, v * 65536, v, v, 0, NULL, v, 0 "
                "FROM generate_series(1, %s) s "
                "CROSS JOIN layer l CROSS JOIN LATERAL (SELECT random() + CASE WHEN s %% 9973 = 0 THEN 100 ELSE 0 END "
                "+ 0 * l.id AS v) x WHERE l.run_id = %s ORDER BY s, l.idx", (steps, run_id))
            ids = ",".join(str(r[0]) for r in con.execute("SELECT id FROM layer WHERE run_id = %s", (run_id,)))
            for sql in rollup_sql(ids, steps):
                con.execute(sql)
            for table in ("layer_stat", "layer_stat_block", "layer_stat_coarse"):
                con.execute(f"VACUUM ANALYZE {table}")
            # the build's WAL flushed now, not by a checkpoint in the middle of the timed queries
            con.execute("CHECKPOINT")
    return run_id, steps


def _rollup_sqlite(con: object, ids: list[int], steps: int) -> None:
    """The rollup blocks that ingest maintains (the direct build above bypasses ingest)."""
    con.execute("BEGIN")  # type: ignore[attr-defined]
    for sql in rollup_sql(",".join(map(str, ids)), steps):
        con.execute(sql)  # type: ignore[attr-defined]
    con.execute("COMMIT")  # type: ignore[attr-defined]


def _mark(steps: int) -> int:
    """The coarse level's watermark ingest leaves after steps [0, ``steps``]: the start of the
    coarse block holding the last step (``run.coarse_through``)."""
    from gradwatch.server.db.models import COARSE_STEPS

    return steps // COARSE_STEPS * COARSE_STEPS


def rollup_sql(ids: str, steps: int, per: int = 20) -> list[str]:
    """The statements that build both rollup levels of steps [0, ``steps``] of layers ``ids`` as
    ingest leaves them (coarse blocks below the watermark), ``per`` layers a statement (one
    statement over 50M rows spilled a 4.7 GB hash join and had not finished after 40 minutes on
    the 2-core box)."""
    from gradwatch.server.repo.ingest import _COARSE_ROLLUP, _ROLLUP

    split = ids.split(",")
    out = []
    for k in range(0, len(split), per):
        chunk = ",".join(split[k:k + per])
        out += [_ROLLUP.replace("{ids}", chunk).replace(":lo", "0").replace(":hi", str(steps + 64)),
                _COARSE_ROLLUP.replace("{ids}", chunk).replace(":lo", "0").replace(":hi", str(_mark(steps) // 64 - 1))]
    return out


def _query_times(url: str, run_id: str, steps: int, tmp: Path, env: dict[str, str] | None, repeats: int
                 ) -> tuple[float, float, float]:
    """Median ms of a 1,000-point series of one layer, a 200-layer heatmap and a count heatmap,
    from a server started on ``url`` with ``env``."""
    with server(url, tmp / "bench-query.log", env) as base:
        q = f"{base}/api/v1/runs/{run_id}/stats?layer=100&stat=l2&max_points=1000"
        ms_series, body = time_get(q, repeats)
        ser = body["series"][0]
        if ser["downsampled"]:
            b = ser["buckets"]
            assert len(b) <= 1000 and sum(x["count"] for x in b) == steps
            if steps >= 9973:
                assert max(x["max"] for x in b) >= 100  # the spikes survive downsampling
        h = f"{base}/api/v1/runs/{run_id}/heatmap?layers=all&stat=l2&max_points=200"
        ms_heat, hb = time_get(h, max(1, repeats // 2))
        assert len(hb["values"]) == LAYERS and 0 < len(hb["values"][0]) <= 200
        # a count (rolled up since migration 0009; rows before)
        ms_nf, hb = time_get(h.replace("stat=l2", "stat=nonfinite"), max(1, repeats // 2))
        assert len(hb["values"]) == LAYERS and 0 < len(hb["values"][0]) <= 200
    return ms_series, ms_heat, ms_nf


def time_get(url: str, n: int) -> tuple[float, dict]:
    times = []
    body: dict = {}
    for _ in range(n + 1):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=600) as r:
            body = json.loads(r.read())
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000, body


# ------------------------------------------------------------------ main

# ------------------------------------------------------------------ scale-out: 1 vs 2 server processes

def scale_out(total_rows: int, repeats: int, tmp: Path, streams: int = 4) -> None:
    """``streams`` agents' websocket streams (one run each) into one PostgreSQL, through one server
    process or spread over two (as behind a load balancer); rows/s of the whole, and a check
    that every row was stored exactly once."""
    import psycopg
    from websockets.sync.client import connect

    runs = [make_batches(total_rows // streams, f"scale-{i}", seed=i) for i in range(streams)]
    encoded = [[wire.encode_batch(b) for b in bs] for bs in runs]
    n_rows = sum(b.row_count for bs in runs for b in bs)

    def stream(base: str, frames: list[bytes], errors: list[str], window: int = 8) -> None:
        try:
            with connect(base.replace("http", "ws") + "/api/v1/ingest/ws", max_size=None, compression=None) as ws:
                acked = sent = 0
                while acked < len(frames):
                    while sent < len(frames) and sent - acked < window:
                        ws.send(frames[sent])
                        sent += 1
                    msg = json.loads(ws.recv(timeout=300))
                    if msg.get("type") != "ack":
                        raise RuntimeError(msg)
                    acked = max(acked, int(msg["acked"]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    print(f"\n## scale-out: {streams} agent streams, {n_rows:,} layer rows in all, into one PostgreSQL")
    print(f"{'server processes':<20}{'rows/s':>14}{'stored':>14}   per repeat")
    for n_proc in (1, 2):
        rates: list[float] = []
        stored = 0
        for _ in range(repeats):
            with database("postgresql", tmp) as url, contextlib.ExitStack() as stack:
                bases = [stack.enter_context(server(url, tmp / f"scale-{k}.log")) for k in range(n_proc)]
                errors: list[str] = []
                threads = [threading.Thread(target=stream, args=(bases[i % n_proc], encoded[i], errors))
                           for i in range(streams)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(900)
                dt = time.perf_counter() - t0
                if errors:
                    raise RuntimeError(errors)
                with psycopg.connect(_libpq(url)) as conn:
                    stored = conn.execute("SELECT COUNT(*) FROM layer_stat").fetchone()[0]  # type: ignore[index]
                    dup = conn.execute("SELECT COUNT(*) - COUNT(DISTINCT (layer_id, step, rank)) FROM layer_stat"
                                       ).fetchone()[0]  # type: ignore[index]
                assert stored == n_rows and dup == 0, (stored, n_rows, dup)
                rates.append(n_rows / dt)
        print(f"{n_proc:<20}{statistics.median(rates):>14,.0f}{stored:>14,}   "
              f"{' '.join(f'{r:,.0f}' for r in rates)}")


# ------------------------------------------------------------------ part 3: server memory


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak so far) of a process, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def memory_figure(tmp: Path, n: int, size_mb: float, pythonpath: str | None = None,
                  kind: str = "sqlite") -> dict[str, float]:
    """Server RSS while ``n`` batches of about ``size_mb`` MB each are POSTed at once, as the
    agent sends them (503 + Retry-After: wait and resend). A one-step batch first creates the run
    and its layers and warms every code path, so "idle" holds no large batch's leftover heap and
    peak − idle is what the large batches cost. Returns idle, peak and settled RSS."""
    import dataclasses

    rows_per_batch = max(LAYERS, int(size_mb * 1e6 / 95))  # ~95 bytes of encoded JSON per layer row
    global STEPS_PER_BATCH
    saved, STEPS_PER_BATCH = STEPS_PER_BATCH, max(1, rows_per_batch // LAYERS)
    try:
        batches = make_batches(rows_per_batch * (n + 1), "mem")
    finally:
        STEPS_PER_BATCH = saved
    batches[0] = dataclasses.replace(batches[0], steps=batches[0].steps[:1])
    bodies = [wire.encode_batch(b) for b in batches]
    del batches
    busy = [0]
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    with database(kind, tmp) as url, server(url, tmp / "bench-mem.log", env) as base:
        pid = server.pid  # type: ignore[attr-defined]
        post(base, bodies[0])  # the run and its layers exist
        time.sleep(1.0)
        idle = _rss_mb(pid)

        def send(body: bytes) -> None:
            while True:
                try:
                    post(base, body)
                    return
                except urllib.error.HTTPError as e:
                    if e.code != 503:
                        raise
                    busy[0] += 1
                    time.sleep(float(e.headers.get("Retry-After") or 1))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=send, args=(b,)) for b in bodies[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        peak = _rss_mb(pid, "VmHWM")
        settled = _rss_mb(pid)
        for _ in range(20):  # the heap is trimmed right after the burst; give it a moment
            time.sleep(0.25)
            settled = min(settled, _rss_mb(pid))
    return {"batch_mb": sum(map(len, bodies[1:])) / len(bodies[1:]) / 1e6, "idle": idle,
            "peak": peak, "after": settled, "seconds": dt, "busy_503": busy[0]}


def post(base: str, body: bytes) -> dict:
    req = urllib.request.Request(base + "/api/v1/ingest", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ingest-rows", type=int, default=500_000, help="layer rows for the ingest comparison")
    ap.add_argument("--rows", type=int, default=20_000_000, help="layer rows of the query run (0: skip)")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--repeats", type=int, default=5, help="calls per query latency")
    ap.add_argument("--detectors-off-too", action="store_true",
                    help="also measure the server with its detectors switched off, in the same repeats")
    ap.add_argument("--ingest-repeats", type=int, default=3, help="side-by-side ingest measurements")
    ap.add_argument("--before-pythonpath", default=None,
                    help="also measure a server run with this PYTHONPATH (a checkout of another commit, e.g. "
                         "main's) in the same repeats, detectors on; and its queries on the same big run")
    ap.add_argument("--scale-out", action="store_true",
                    help="only the 1-process vs 2-process ingest comparison on PostgreSQL (--ingest-rows in all)")
    ap.add_argument("--memory", action="store_true",
                    help="only the memory figure: server RSS for concurrent large batches (SQLite)")
    ap.add_argument("--memory-batches", type=int, default=6, help="batches POSTed at once for --memory")
    ap.add_argument("--memory-mb", type=float, default=29.0, help="size of each of them, MB of JSON")
    ap.add_argument("--memory-backend", default="sqlite", choices=("sqlite", "postgresql"),
                    help="database of the --memory server")
    ap.add_argument("--server-pythonpath", default=None,
                    help="PYTHONPATH of the server process (a checkout of another commit, to compare)")
    args = ap.parse_args()
    if args.memory:
        tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        m = memory_figure(tmp, args.memory_batches, args.memory_mb, args.server_pythonpath, args.memory_backend)
        print(f"# gradwatch bench/ingest.py --memory  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
              f"server={args.server_pythonpath or 'this checkout'}  db={args.memory_backend}")
        print(f"{args.memory_batches} concurrent POSTs of {m['batch_mb']:.1f} MB: RSS idle {m['idle']:.0f} MB, "
              f"peak {m['peak']:.0f} MB (+{m['peak'] - m['idle']:.0f} MB = "
              f"{(m['peak'] - m['idle']) / m['batch_mb']:.1f}x one batch), after {m['after']:.0f} MB; "
              f"{m['busy_503']} answers 503 (resent after Retry-After); {m['seconds']:.1f} s")
        return
    kinds = args.backends.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    if args.scale_out:
        print(f"# gradwatch bench/ingest.py --scale-out  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
              f"cpus={os.cpu_count()}")
        scale_out(args.ingest_rows, args.ingest_repeats, tmp)
        return
    print(f"# gradwatch bench/ingest.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"cpus={os.cpu_count()}  ingest_rows={args.ingest_rows}  rows={args.rows}  "
          f"load={' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    batches = make_batches(args.ingest_rows, "bench")
    encoded = [wire.encode_batch(b) for b in batches]
    n_rows = sum(b.row_count for b in batches)
    print(f"\n## ingest: {n_rows} layer rows in {len(batches)} batches of {LAYERS}x{STEPS_PER_BATCH}, "
          f"{sum(map(len, encoded)) / len(encoded) / 1024:.0f} KiB each")
    print(f"(each repeat measures the raw driver and the server back to back, alternating which goes first; "
          f"{args.ingest_repeats} repeats, median ratio)")
    print(f"{'database':<28}{'raw driver rows/s':>20}{'server ws rows/s':>20}{'ratio':>8}   per repeat")
    for kind in kinds:
        raws: list[float] = []
        srvs: list[float] = []
        raw_modes: list[tuple[float, float]] = []
        offs: list[float] = []
        befores: list[float] = []
        for rep in range(args.ingest_repeats):
            order: tuple[str, ...] = ("raw", "srv") if rep % 2 == 0 else ("srv", "raw")
            if args.before_pythonpath:
                order = (order[0], "before", order[1])
            if args.detectors_off_too:
                order = (*order, "off") if rep % 2 == 0 else ("off", *order)
            for what in order:
                with database(kind, tmp) as u:
                    if what == "raw":
                        r = ingest_raw(kind, u, batches)
                        if kind != "sqlite":
                            with database(kind, tmp) as u2:
                                r2 = ingest_raw(kind, u2, batches, stream=True)
                            raw_modes.append((r, r2))
                            r = max(r, r2)
                        raws.append(r)
                    elif what == "before":
                        # (the database is at this checkout's head, which an older server's
                        # migrations do not know: it must not try to migrate it)
                        befores.append(ingest_via_server(u, encoded, n_rows, tmp, env={
                            "PYTHONPATH": args.before_pythonpath, "GRADWATCH_SERVER_MIGRATE_ON_START": "false"}))
                    elif what == "off":
                        offs.append(ingest_via_server(u, encoded, n_rows, tmp,
                                                      env={"GRADWATCH_SERVER_DETECTORS_ENABLED": "false"}))
                    else:
                        srvs.append(ingest_via_server(u, encoded, n_rows, tmp))
        ratios = [s / r for s, r in zip(srvs, raws)]
        method = "executemany" if kind == "sqlite" else "COPY binary"
        print(f"{kind + ' (' + method + ')':<28}{statistics.median(raws):>20,.0f}{statistics.median(srvs):>20,.0f}"
              f"{statistics.median(ratios):>8.2f}   {' '.join(f'{x:.2f}' for x in ratios)}")
        if befores:
            b_ratios = [b / r for b, r in zip(befores, raws)]
            print(f"{'  before (' + os.path.basename(args.before_pythonpath.rstrip('/')) + ')':<28}{'':>20}"
                  f"{statistics.median(befores):>20,.0f}{statistics.median(b_ratios):>8.2f}   "
                  f"{' '.join(f'{x:.2f}' for x in b_ratios)}")
            print(f"{'':<28}(this server / before, per repeat: "
                  f"{' '.join(f'{a / b:.2f}' for a, b in zip(srvs, befores))})")
        if offs:
            off_ratios = [o / r for o, r in zip(offs, raws)]
            print(f"{'  same, detectors off':<28}{'':>20}{statistics.median(offs):>20,.0f}"
                  f"{statistics.median(off_ratios):>8.2f}   {' '.join(f'{x:.2f}' for x in off_ratios)}")
            print(f"{'':<28}(detectors on / off, per repeat: {' '.join(f'{a / b:.2f}' for a, b in zip(srvs, offs))})")
        if raw_modes:
            print(f"{'':<28}(raw = the faster of COPY write_row tuples, median "
                  f"{statistics.median(m[0] for m in raw_modes):,.0f}, and COPY of a pre-built binary stream, "
                  f"median {statistics.median(m[1] for m in raw_modes):,.0f})")

    if args.rows:
        print(f"\n## queries on one run of {args.rows:,} layer rows ({LAYERS} layers, step-major)")
        print(f"{'database':<12}{'build s':>10}{'series 1000 pts ms':>20}{'heatmap 200x200 ms':>20}"
              f"{'nonfinite heatmap ms':>22}")
        for kind in kinds:
            with database(kind, tmp) as url:
                t0 = time.perf_counter()
                run_id, steps = build_big_run(kind, url, args.rows)
                build = time.perf_counter() - t0
                # this checkout's server, and the --before-pythonpath one on the same database,
                # alternately (A B B A: the first turn after the build runs colder), each figure the
                # mean of its turns' medians
                envs = [("", {"PYTHONPATH": args.server_pythonpath} if args.server_pythonpath else None)]
                if args.before_pythonpath:
                    envs.append((" (before)", {"PYTHONPATH": args.before_pythonpath,
                                               "GRADWATCH_SERVER_MIGRATE_ON_START": "false"}))
                times: dict[str, list[tuple[float, float, float]]] = {tag: [] for tag, _ in envs}
                for turn in range(2 if args.before_pythonpath else 1):
                    for tag, env in (envs if turn % 2 == 0 else envs[::-1]):
                        times[tag].append(_query_times(url, run_id, steps, tmp, env, args.repeats))
                for tag, _ in envs:
                    ms_series, ms_heat, ms_nf = (statistics.mean(t[k] for t in times[tag]) for k in range(3))
                    turns = "  ".join("/".join(f"{x:.1f}" for x in t) for t in times[tag])
                    print(f"{kind + tag:<12}{build:>10.0f}{ms_series:>20.1f}{ms_heat:>20.1f}{ms_nf:>22.1f}"
                          + (f"   per turn: {turns}" if len(times[tag]) > 1 else ""))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets: ratio >= 0.50; series < 100 ms at 20M rows")


if __name__ == "__main__":
    main()
