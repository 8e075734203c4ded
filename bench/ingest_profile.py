"""Where a websocket batch's server time goes (issues 9 and 14): the bench's batches decoded,
prepared and stored in one process, each part timed, beside the raw driver's COPY of the same
rows. Not a test.

The parts are those of ``server/api/ingest.py`` (decode_frame, then store in one transaction) and
of ``server/repo/ingest.py`` (store_batch's statements), timed by wrapping the module functions;
"other" is the rest of ``store`` (run row update, notify, SQLAlchemy). Per-batch medians.

    .venv/bin/python bench/ingest_profile.py --batches 40 [--backends postgresql] [--cprofile]
    PYTHONPATH=/path/to/an/archive/of/main .venv/bin/python bench/ingest_profile.py ...   (another server)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradwatch.agent import wire

#: Per part of the current batch: [wall, this process's CPU, the database backends' CPU] seconds.
_T: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
#: PIDs of the database's backends (PostgreSQL, Linux: their CPU time from /proc/PID/schedstat).
_BACKENDS: list[int] = []


def _backend_cpu() -> float:
    total = 0
    for pid in _BACKENDS:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    t0, c0, b0 = time.perf_counter(), time.thread_time(), _backend_cpu()
    try:
        yield
    finally:
        acc = _T[name]
        acc[0] += time.perf_counter() - t0
        acc[1] += time.thread_time() - c0
        acc[2] += _backend_cpu() - b0


def _wrap(module: Any, attr: str, name: str) -> None:
    inner: Callable[..., Any] | None = getattr(module, attr, None)
    if inner is None:  # an older server (``PYTHONPATH``) without this function
        return

    def outer(*a: Any, **kw: Any) -> Any:
        with timed(name):
            return inner(*a, **kw)  # type: ignore[misc]

    setattr(module, attr, outer)


def instrument() -> None:
    """Time the parts of store_batch by wrapping what it calls (looked up at call time)."""
    from gradwatch.server.detect import store as detect_store
    from gradwatch.server.repo import ingest

    for attr, name in (("ensure_run", "run row"), ("_layer_ids", "layer ids"), ("_insert_layer_rows", "layer COPY"),
                       ("_insert_step_rows", "step rows"), ("_merge_blocks", "rollup upserts"),
                       ("_lock_cursor", "cursor"), ("_advance_cursor", "cursor"), ("_raw_all", "cursor")):
        _wrap(ingest, attr, name)
    _wrap(detect_store, "on_batch", "detectors")


def store_all(url: str, encoded: list[bytes], rows: int) -> tuple[dict[str, list[list[float]]], float]:
    """Decode, prepare and store every frame as the websocket path does, one after another
    (the server overlaps decoding with storing on a second core; here they are timed apart)."""
    from types import SimpleNamespace

    from gradwatch.server.api.ingest import decode_object, store
    from gradwatch.server.db.engine import Database, make_engine
    from gradwatch.server.repo.ingest import prepare_batch

    db = Database(make_engine(url))
    gw: Any = SimpleNamespace(db=db, settings=SimpleNamespace(detectors_enabled=True),
                              hub=SimpleNamespace(origin="bench", has_subscribers=lambda _r: False),
                              metrics=SimpleNamespace(observe_batch=lambda *a: None, error=lambda *a: None))
    per: dict[str, list[list[float]]] = defaultdict(list)
    _BACKENDS.clear()
    if not db.sqlite:
        with db.read() as conn:
            name = conn.exec_driver_sql("SELECT current_database()").scalar()
        _BACKENDS.extend(_pg_backends(name))
    t_all = time.perf_counter()
    try:
        for body in encoded:
            _T.clear()
            with timed("decode (JSON + wire)"):
                batch = decode_object(gw, _json(body))
            with timed("prepare (frame, blocks)"), db.read() as conn:
                prepared = prepare_batch(conn, batch)
            with timed("store"):
                store(gw, prepared, time.perf_counter())
            whole = _T.pop("store")
            inner = [sum(v[i] for k, v in _T.items() if not k.startswith(("decode", "prepare"))) for i in range(3)]
            _T["other (txn, commit, run, notify)"] = [a - b for a, b in zip(whole, inner)]
            for k, v in _T.items():
                per[k].append(v)
    finally:
        db.engine.dispose()
    return per, rows / (time.perf_counter() - t_all)


def _server_dir() -> Path:
    import gradwatch.server

    return Path(gradwatch.server.__file__ or "").parent


def _pg_backends(dbname: str) -> list[int]:
    import psycopg
    from ingest import PG_ADMIN, _libpq

    with psycopg.connect(_libpq(PG_ADMIN), autocommit=True) as c:
        return [r[0] for r in c.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,))]


class BackendCPU:
    """CPU seconds of a PostgreSQL database's backends while the block runs (Linux): polls
    ``pg_stat_activity`` for them and keeps each one's latest ``/proc/PID/schedstat``, so backends
    that come and go are counted (up to the last poll, 20 ms)."""

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self.seen: dict[int, float] = {}
        self.start: dict[int, float] = {}
        self._stop = False

    def _poll(self, into: dict[int, float]) -> None:
        for pid in _pg_backends(self.dbname):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/schedstat") as f:
                into[pid] = int(f.read().split()[0]) / 1e9

    def __enter__(self) -> BackendCPU:
        import threading

        self._poll(self.start)

        def loop() -> None:
            while not self._stop:
                self._poll(self.seen)
                time.sleep(0.02)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self._poll(self.seen)

    @property
    def seconds(self) -> float:
        return sum(v - self.start.get(pid, 0.0) for pid, v in self.seen.items())


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ws_cpu(batches: list[wire.Batch], encoded: list[bytes], rows: int, pythonpath: str | None,
           tmp: Path) -> tuple[float, float, float]:
    """The websocket path as ``bench/ingest.py`` measures it (PostgreSQL): (rows/s, server process
    CPU seconds, database backends' CPU seconds) while the batches are ingested."""
    import ingest as bench

    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    with bench.database("postgresql", tmp) as url, bench.server(url, tmp / "ws-cpu.log", env) as base:
        pid = bench.server.pid  # type: ignore[attr-defined]
        started = bench.server

        @contextlib.contextmanager
        def running(*_a: object, **_k: object) -> Iterator[str]:
            yield base

        bench.server = running  # type: ignore[assignment]  # ingest into the server started above
        try:
            c0 = _proc_cpu(pid)
            with BackendCPU(url.rsplit("/", 1)[1]) as db:
                rate = bench.ingest_via_server(url, encoded, rows, tmp)
            return rate, _proc_cpu(pid) - c0, db.seconds
        finally:
            bench.server = started


def raw_cpu(batches: list[wire.Batch], tmp: Path) -> tuple[float, float]:
    """The raw driver's COPY of a pre-built binary stream: (rows/s, backend CPU seconds)."""
    from ingest import database, ingest_raw

    with database("postgresql", tmp) as url, BackendCPU(url.rsplit("/", 1)[1]) as db:
        rate = ingest_raw("postgresql", url, batches, stream=True)
    return rate, db.seconds


def _json(body: bytes) -> Any:
    import json

    return json.loads(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--backends", default="postgresql")
    ap.add_argument("--cprofile", action="store_true", help="also print the top functions by cumulative time")
    ap.add_argument("--ws-cpu", type=int, default=0, metavar="REPEATS",
                    help="instead: CPU per batch of the websocket path (server process + PostgreSQL backends) "
                         "and of the raw COPY, REPEATS times, alternating with --before-pythonpath's server")
    ap.add_argument("--before-pythonpath", default=None, help="with --ws-cpu: a second server to compare")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from ingest import LAYERS, STEPS_PER_BATCH, database, ingest_raw, make_batches

    batches = make_batches(args.batches * LAYERS * STEPS_PER_BATCH, "prof")
    encoded = [wire.encode_batch(b) for b in batches]
    rows = sum(b.row_count for b in batches)
    print(f"# bench/ingest_profile.py {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.2f}: {len(batches)} batches of {LAYERS} layers x {STEPS_PER_BATCH} steps; "
          f"server {_server_dir()}")
    if args.ws_cpu:
        _ws_cpu_table(args, batches, encoded, rows)
        return
    instrument()
    for kind in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            with database(kind, Path(tmp)) as url:
                raw = ingest_raw(kind, url, batches, stream=kind != "sqlite")
            with database(kind, Path(tmp)) as url:
                prof = cProfile.Profile() if args.cprofile else None
                if prof:
                    prof.enable()
                per, rate = store_all(url, encoded, rows)
                if prof:
                    prof.disable()
        raw_ms = LAYERS * STEPS_PER_BATCH / raw * 1000
        mean = {k: [statistics.fmean(x[i] for x in v) * 1000 for i in range(3)] for k, v in per.items()}
        total = [sum(m[i] for m in mean.values()) for i in range(3)]
        print(f"\n{kind}: raw COPY/executemany {raw:,.0f} rows/s = {raw_ms:.1f} ms a batch; "
              f"in process, serial: {rate:,.0f} rows/s (load {os.getloadavg()[0]:.2f})")
        print(f"{'part (mean ms per batch)':<34}{'wall':>8}{'share':>7}{'py CPU':>8}{'db CPU':>8}{'CPU x raw':>10}")
        for k, m in sorted(mean.items(), key=lambda kv: -kv[1][0]):
            print(f"{k:<34}{m[0]:>8.2f}{m[0] / total[0] * 100:>6.1f}%{m[1]:>8.2f}{m[2]:>8.2f}"
                  f"{(m[1] + m[2]) / raw_ms:>10.2f}")
        print(f"{'sum':<34}{total[0]:>8.2f}{'':>7}{total[1]:>8.2f}{total[2]:>8.2f}{(total[1] + total[2]) / raw_ms:>10.2f}")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(45)


def _ws_cpu_table(args: Any, batches: list[wire.Batch], encoded: list[bytes], rows: int) -> None:
    servers = [("this checkout", None)] + ([("before", args.before_pythonpath)] if args.before_pythonpath else [])
    got: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for rep in range(args.ws_cpu):
        with tempfile.TemporaryDirectory() as tmp:
            rate, db = raw_cpu(batches, Path(tmp))
            got["raw COPY"].append((rate, 0.0, db))
            for name, path in servers if rep % 2 == 0 else servers[::-1]:
                got[name].append(ws_cpu(batches, encoded, rows, path, Path(tmp)))
    n = len(batches)
    print(f"\npostgresql, websocket path vs raw COPY, {args.ws_cpu} repeats (load at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}); CPU ms per batch, median")
    print(f"{'':<16}{'rows/s':>10}{'server CPU':>12}{'db CPU':>10}{'total':>10}   per repeat (total)")
    for name, v in got.items():
        tot = [(s + d) / n * 1000 for _, s, d in v]
        print(f"{name:<16}{statistics.median(r for r, _, _ in v):>10,.0f}"
              f"{statistics.median(s for _, s, _ in v) / n * 1000:>12.2f}"
              f"{statistics.median(d for _, _, d in v) / n * 1000:>10.2f}{statistics.median(tot):>10.2f}   "
              f"{' '.join(f'{t:.1f}' for t in tot)}")


if __name__ == "__main__":
    main()
