"""Prometheus text-format counters and an ingest-latency histogram (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Process-local counters; thread-safe (ingest runs in the threadpool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = 0
        self.duplicates = 0
        self.rows = 0
        self.errors: dict[str, int] = defaultdict(int)
        self._hist = [0] * len(_BUCKETS)
        self._sum = 0.0
        self._count = 0

    def observe_batch(self, rows: int, seconds: float, duplicate: bool) -> None:
        with self._lock:
            self.batches += 1
            self.duplicates += duplicate
            self.rows += rows
            self._sum += seconds
            self._count += 1
            for i, b in enumerate(_BUCKETS):
                if seconds <= b:
                    self._hist[i] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP gradwatch_ingest_batches_total Batches accepted (duplicates included).",
                "# TYPE gradwatch_ingest_batches_total counter",
                f"gradwatch_ingest_batches_total {self.batches}",
                "# HELP gradwatch_ingest_duplicate_batches_total Batches that were already stored.",
                "# TYPE gradwatch_ingest_duplicate_batches_total counter",
                f"gradwatch_ingest_duplicate_batches_total {self.duplicates}",
                "# HELP gradwatch_ingest_rows_total Per-layer statistic rows stored.",
                "# TYPE gradwatch_ingest_rows_total counter",
                f"gradwatch_ingest_rows_total {self.rows}",
                "# HELP gradwatch_ingest_errors_total Rejected ingest payloads by kind.",
                "# TYPE gradwatch_ingest_errors_total counter",
            ]
            for kind in sorted(self.errors):
                lines.append(f'gradwatch_ingest_errors_total{{kind="{kind}"}} {self.errors[kind]}')
            lines += [
                "# HELP gradwatch_ingest_seconds Time to decode and store one batch.",
                "# TYPE gradwatch_ingest_seconds histogram",
            ]
            for b, n in zip(_BUCKETS, self._hist):
                lines.append(f'gradwatch_ingest_seconds_bucket{{le="{b}"}} {n}')
            lines += [
                f'gradwatch_ingest_seconds_bucket{{le="+Inf"}} {self._count}',
                f"gradwatch_ingest_seconds_sum {self._sum}",
                f"gradwatch_ingest_seconds_count {self._count}",
            ]
        return "\n".join(lines) + "\n"
