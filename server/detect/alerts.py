"""Webhook delivery: the ``alert_outbox`` rows written with detector events, sent by worker threads.

Ingest only inserts an outbox row in its own transaction, so a slow or dead receiver never holds
a batch up. A worker claims one due row in a short transaction (PostgreSQL: ``FOR UPDATE SKIP
LOCKED``; SQLite: the single writer) by moving its ``next_attempt_at`` past the delivery's
timeout (a lease: if the process dies mid-delivery, another worker retries it later), then POSTs
outside any transaction and records the attempt. A failure is retried after
``alert_backoff_seconds`` doubled per attempt (capped), until ``alert_max_attempts``. Delivery is
at least once: a receiver may see a message twice if a process dies after sending it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from sqlalchemy import Connection

from gradwatch.server.db.engine import Database, is_sqlite, make_engine
from gradwatch.server.db.raw import run_raw
from gradwatch.server.settings import ServerSettings

log = logging.getLogger(__name__)

#: Extra seconds of lease beyond the POST's timeout.
LEASE_MARGIN = 30.0


def backoff(settings: ServerSettings, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return float(min(settings.alert_backoff_max_seconds, settings.alert_backoff_seconds * 2 ** (attempt - 1)))


def post_json(url: str, payload: dict[str, Any], timeout: float) -> tuple[bool, int | None, str | None]:
    """POST ``payload``; (succeeded, HTTP status, error text)."""
    body = json.dumps(payload, allow_nan=False).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", "User-Agent": "gradwatch"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read(65536)
            return True, int(r.status), None
    except urllib.error.HTTPError as e:
        return False, int(e.code), f"HTTP {e.code} {e.reason}"[:500]
    except Exception as e:  # connection refused, timeout, DNS...: all mean "try again later"
        reason = getattr(e, "reason", e)
        return False, None, f"{type(e).__name__}: {reason}"[:500]


class AlertWorkers:
    """``settings.alert_workers`` threads delivering due outbox rows until :meth:`stop`. They use
    their own engine (a small pool), so polling never takes a connection ingest or queries wait for."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.db = Database(make_engine(settings.database_url, pool_size=settings.alert_workers, max_overflow=0)
                           if not is_sqlite(settings.database_url) else make_engine(settings.database_url))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.settings.alert_workers):
            t = threading.Thread(target=self._loop, name=f"gradwatch-alerts-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self.db.engine.dispose()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the database is down, say: wait and look again
                log.warning("alert delivery failed; retrying", exc_info=True)
                busy = False
            if not busy:
                self._stop.wait(self.settings.alert_poll_seconds)

    def _claim(self) -> tuple[int, str, dict[str, Any], int] | None:
        now = time.time()
        lock = " FOR UPDATE SKIP LOCKED" if not self.db.sqlite else ""
        with self.db.write() as conn:
            rows = run_raw(conn, "SELECT id, url, payload, attempts FROM alert_outbox WHERE status = 'pending' AND "
                                 f"next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT 1{lock}", (now,))
            if not rows:
                return None
            oid, url, payload, attempts = rows[0]
            lease = now + self.settings.alert_timeout_seconds + LEASE_MARGIN
            run_raw(conn, "UPDATE alert_outbox SET next_attempt_at = ?, attempts = attempts + 1 WHERE id = ?",
                    (lease, oid))
        return int(oid), str(url), json.loads(payload) if isinstance(payload, str) else payload, int(attempts) + 1

    def run_once(self) -> bool:
        """Deliver one due row, if any; whether there was one."""
        claimed = self._claim()
        if claimed is None:
            return False
        oid, url, payload, attempt = claimed
        t0 = time.time()
        ok, code, err = post_json(url, payload, self.settings.alert_timeout_seconds)
        t1 = time.time()
        with self.db.write() as conn:
            run_raw(conn, "INSERT INTO alert_attempt (outbox_id, attempt, time, duration, ok, status_code, error) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)", (oid, attempt, t0, t1 - t0, ok if not self.db.sqlite else
                                                          int(ok), code, err))
            if ok:
                run_raw(conn, "UPDATE alert_outbox SET status = 'delivered', delivered_at = ?, last_error = NULL "
                              "WHERE id = ?", (t1, oid))
            elif attempt >= self.settings.alert_max_attempts:
                run_raw(conn, "UPDATE alert_outbox SET status = 'failed', last_error = ? WHERE id = ?", (err, oid))
            else:
                run_raw(conn, "UPDATE alert_outbox SET next_attempt_at = ?, last_error = ? WHERE id = ?",
                        (t1 + backoff(self.settings, attempt), err, oid))
        if not ok:
            log.info("alert %s to %s failed (attempt %s): %s", oid, url, attempt, err)
        return True


_DELIVERY_COLS = ("id", "run_id", "event_id", "url", "status", "attempts", "next_attempt_at", "created_at",
                  "delivered_at", "last_error", "payload")


def list_deliveries(conn: Connection, project: str, *, status: str | None, run_id: str | None, limit: int,
                    offset: int) -> tuple[list[dict[str, Any]], int]:
    """A project's deliveries, newest first, each with its attempts in order."""
    where, params = "WHERE project = ?", [project]
    if status is not None:
        where += " AND status = ?"
        params.append(status)
    if run_id is not None:
        where += " AND run_id = ?"
        params.append(run_id)
    count = int(run_raw(conn, f"SELECT count(*) FROM alert_outbox {where}", tuple(params))[0][0])
    rows = run_raw(conn, f"SELECT {', '.join(_DELIVERY_COLS)} FROM alert_outbox {where} ORDER BY id DESC "
                         f"LIMIT {int(limit)} OFFSET {int(offset)}", tuple(params))
    out = [dict(zip(_DELIVERY_COLS, r)) for r in rows]
    for d in out:
        if isinstance(d["payload"], str):
            d["payload"] = json.loads(d["payload"])
        d["attempt_log"] = []
    if out:
        by_id = {d["id"]: d for d in out}
        ph = ", ".join("?" * len(by_id))
        for oid, attempt, t, dur, ok, code, err in run_raw(
                conn, f"SELECT outbox_id, attempt, time, duration, ok, status_code, error FROM alert_attempt "
                      f"WHERE outbox_id IN ({ph}) ORDER BY outbox_id, attempt, id", tuple(by_id)):
            by_id[oid]["attempt_log"].append({"attempt": attempt, "time": t, "duration": dur, "ok": bool(ok),
                                              "status_code": code, "error": err})
    return out, count
