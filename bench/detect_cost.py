"""What the detectors add to storing a batch (issue 14): ``store_batch`` with and without them, in
one process, alternating, on SQLite and PostgreSQL. Not a test.

    .venv/bin/python bench/detect_cost.py --batches 40 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from gradwatch.agent import wire

LAYERS, STEPS_PER_BATCH = 200, 25


def make_batches(n: int, run_id: str) -> list[wire.Batch]:
    out = []
    for k in range(n):
        recs = []
        for s in range(k * STEPS_PER_BATCH, (k + 1) * STEPS_PER_BATCH):
            v = [(i + 1) * (1 + math.exp(-s / 300)) * (1 + 0.1 * math.sin(1.7 * s + i)) for i in range(LAYERS)]
            recs.append(wire.StepRecord(step=s, time=float(s), layer_ids=list(range(LAYERS)), layers={
                "numel": [100] * LAYERS, "mean": v, "m2": v, "l2": v, "maxabs": v, "nonfinite": [0] * LAYERS,
                "l2_post": [None] * LAYERS, "wnorm": v}, total_norm=float(sum(x * x for x in v)) ** 0.5,
                clip_coef=1.0, loss_scale=65536.0))
        out.append(wire.Batch(run=wire.RunInfo(run_id=run_id), seq=k + 1, steps=recs,
                              layers=[wire.LayerInfo(i, f"l{i}", [10, 10], "float32") for i in range(LAYERS)]))
    return out


_IN_DETECT = [0.0]


def _timed_on_batch() -> None:
    """Time the detectors' own share (state lock/load, evaluation, save, events) inside store_batch."""
    from gradwatch.server.detect import store

    inner = store.on_batch

    def timed(*a: object, **kw: object) -> int:
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)  # type: ignore[arg-type]
        finally:
            _IN_DETECT[0] += time.perf_counter() - t0

    store.on_batch = timed  # type: ignore[assignment]


def store_all(url: str, batches: list[wire.Batch], detect: bool) -> tuple[float, float]:
    """(seconds storing every batch, of which in the detectors)."""
    from gradwatch.server.db.engine import Database, make_engine
    from gradwatch.server.repo.ingest import store_batch

    db = Database(make_engine(url))
    try:
        _IN_DETECT[0] = 0.0
        t0 = time.perf_counter()
        for b in batches:
            with db.write() as conn:
                store_batch(conn, b, detect=detect)
        return time.perf_counter() - t0, _IN_DETECT[0]
    finally:
        db.engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="sqlite,postgresql")
    args = ap.parse_args()
    import os
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from ingest import database  # the same fresh, migrated databases as bench/ingest.py

    print(f"# bench/detect_cost.py {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.1f}: {args.batches} batches of {LAYERS} layers x {STEPS_PER_BATCH} steps")
    _timed_on_batch()
    for kind in args.backends.split(","):
        on, off, share = [], [], []
        for rep in range(args.repeats):
            for detect in ((True, False) if rep % 2 == 0 else (False, True)):
                with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
                    total, in_detect = store_all(url, make_batches(args.batches, f"r{rep}"), detect)
                    (on if detect else off).append(total)
                    if detect:
                        share.append(in_detect / total)
        ratios = [a / b for a, b in zip(on, off)]
        print(f"{kind:<12} store_batch s: detectors off {statistics.median(off):.3f}, on {statistics.median(on):.3f}; "
              f"on/off median {statistics.median(ratios):.3f} (per repeat {' '.join(f'{r:.3f}' for r in ratios)}); "
              f"time inside the detectors: median {statistics.median(share):.1%} of store_batch "
              f"(per repeat {' '.join(f'{x:.1%}' for x in share)})")


if __name__ == "__main__":
    main()
