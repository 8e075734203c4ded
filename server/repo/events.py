"""Events of a run: the agent's (sent in batches) and the detectors' (``server/detect``), one table.

Agent events get a severity by kind and the layers their data names, so both kinds of source
read alike (``docs/detectors.md``).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, text

#: Severity of each agent event kind (the kinds of ``agent.wire.EVENT_KINDS``); others: ``info``.
AGENT_SEVERITY = {"nonfinite": "warning", "spike": "warning", "overflow": "info", "scale_growth": "info",
                  "clip": "info"}
SEVERITIES = ("info", "warning", "critical")


def agent_event_fields(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """``source``, ``severity`` and ``layers`` of an event the agent sent."""
    layers = data.get("layers") if isinstance(data, dict) else None
    names = [x for x in layers if isinstance(x, str)][:1000] if isinstance(layers, list) else None
    return {"source": "agent", "severity": AGENT_SEVERITY.get(kind, "info"), "layers": names or None}


def list_events(conn: Connection, run_id: str, *, kinds: list[str], start: int | None, end: int | None,
                limit: int, offset: int, source: str | None = None,
                min_severity: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """A page of a run's events in step order, and how many match."""
    where = "FROM event WHERE run_id = :r"
    params: dict[str, Any] = {"r": run_id, "lim": limit, "off": offset}

    def any_of(col: str, values: list[str], tag: str) -> str:
        names = []
        for i, v in enumerate(values):
            params[f"{tag}{i}"] = v
            names.append(f":{tag}{i}")
        return f" AND {col} IN ({', '.join(names)})"

    if kinds:
        where += any_of("kind", kinds, "k")
    if source is not None:
        where += " AND source = :src"
        params["src"] = source
    if min_severity is not None:
        where += any_of("severity", list(SEVERITIES[SEVERITIES.index(min_severity):]), "sev")
    if start is not None:
        where += " AND step >= :a"
        params["a"] = start
    if end is not None:
        where += " AND step <= :b"
        params["b"] = end
    count = conn.execute(text(f"SELECT count(*) {where}"), params).scalar_one()
    rows = conn.execute(text(f"SELECT id, kind, step, rank, time, data, source, severity, layers, message {where} "
                             "ORDER BY step, id LIMIT :lim OFFSET :off"), params).all()
    out = []
    for i, kind, step, rank, t, data, src, sev, layers, msg in rows:
        if isinstance(data, str):  # SQLite text() results are not JSON-decoded
            data = json.loads(data)
        if isinstance(layers, str):
            layers = json.loads(layers)
        out.append({"id": i, "kind": kind, "step": step, "rank": rank, "time": t, "data": data or {},
                    "source": src, "severity": sev, "layers": layers or [], "message": msg})
    return out, int(count)
