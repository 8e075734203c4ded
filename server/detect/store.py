"""Detectors against the database: per-run state locked in the storing transaction, project
rules, detector events and their alert outbox rows.

:func:`on_batch` runs inside ``store_batch``'s transaction, after the batch's rows are written,
with the run's ``detector_state`` row created-or-locked by :func:`lock_statements` (``INSERT ...
ON CONFLICT DO UPDATE`` takes the row lock on PostgreSQL; SQLite has one writer): it evaluates
the batch's new steps and hands back the statement that writes the state. Both statements ride
in round trips ``store_batch`` makes anyway. So a step is evaluated exactly once whichever
server process stores it, the state commits or rolls back with the rows it describes, and a
restart loses nothing.
Only rank :data:`DETECTED_RANK` is evaluated: after data-parallel all-reduce every rank holds
the same gradient, and rank 0 exists in every run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
from sqlalchemy import Connection, insert

from gradwatch.agent.spec import LAYER_FIELDS
from gradwatch.agent.wire import Batch
from gradwatch.server.db.models import LAYER_FLOAT_COLUMNS, STEP_FLOAT_COLUMNS, AlertOutbox, Event
from gradwatch.server.db.raw import run_raw
from gradwatch.server.detect import engine
from gradwatch.server.detect.engine import SEVERITIES, TOTAL_KEY, TOTAL_NAME, Found, State, StepInput
from gradwatch.server.detect.rules import Rules
from gradwatch.server.repo.frame import LayerFrame

log = logging.getLogger(__name__)

DETECTED_RANK = 0
_L2 = LAYER_FLOAT_COLUMNS.index("l2")
_NF = [f.name for f in LAYER_FIELDS if not f.is_float].index("nonfinite")
_LOCK = ("INSERT INTO detector_state (run_id, state, last_step, updated_at) VALUES (?, '', NULL, ?) "
         "ON CONFLICT (run_id) DO UPDATE SET updated_at = detector_state.updated_at RETURNING state")
_SAVE = "UPDATE detector_state SET state = ?, last_step = ?, updated_at = ? WHERE run_id = ?"


_RULES = "SELECT rules, updated_at FROM project_rules WHERE project = ?"


def load_rules(conn: Connection, project: str) -> tuple[Rules, float | None]:
    """The project's rules (defaults without a row) and when they were last set."""
    return _rules_of(run_raw(conn, _RULES, (project,)))


def _rules_of(rows: list[tuple[Any, ...]]) -> tuple[Rules, float | None]:
    if not rows:
        return Rules(), None
    raw, at = rows[0]
    return Rules.model_validate(json.loads(raw) if isinstance(raw, str) else raw), at


def save_rules(conn: Connection, project: str, rules: Rules, now: float) -> None:
    body = rules.model_dump_json()
    run_raw(conn, "INSERT INTO project_rules (project, rules, updated_at) VALUES (?, ?, ?) ON CONFLICT (project) "
                  "DO UPDATE SET rules = excluded.rules, updated_at = excluded.updated_at", (project, body, now))


def _lock_state(conn: Connection, run_id: str, now: float) -> State:
    raw = run_raw(conn, _LOCK, (run_id, now))[0][0]
    return State.from_json(json.loads(raw) if raw else None)


def lock_statements(batch: Batch, now: float) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements that create-or-lock the run's state row and read the project's rules,
    in that order: the caller runs them in one of its own round trips (PostgreSQL pipeline
    mode: the lock statement runs first) and hands their rows to :func:`on_batch`."""
    return [(_LOCK, (batch.run.run_id, now)), (_RULES, (batch.run.project,))]


def detects(batch: Batch) -> bool:
    """Whether the batch holds steps the detectors evaluate (of rank :data:`DETECTED_RANK`)."""
    return any(s.rank == DETECTED_RANK for s in batch.steps)


def _save_statement(run_id: str, st: State, now: float) -> tuple[str, tuple[Any, ...]]:
    return _SAVE, (json.dumps(st.to_json(), separators=(",", ":")), st.last_step, now, run_id)


def _save_state(conn: Connection, run_id: str, st: State, now: float) -> None:
    run_raw(conn, *_save_statement(run_id, st, now))


def _opt(v: float | None) -> float | None:
    return None if v is None else float(v)


def batch_inputs(batch: Batch, frame: LayerFrame) -> list[StepInput]:
    """The detected rank's steps of a batch, layer values taken from its columnar frame."""
    recs = {s.step: s for s in batch.steps if s.rank == DETECTED_RANK}
    if not recs:
        return []
    sel = frame.rank == DETECTED_RANK
    keys, steps = frame.layer_id[sel], frame.step[sel]
    l2, nf = frame.floats[_L2][sel], frame.ints[_NF][sel]
    chunks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if len(steps):
        cuts = np.flatnonzero(np.diff(steps)) + 1
        starts = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), len(steps)]
        for a, b in zip(starts, ends):
            chunks[int(steps[a])] = (keys[a:b], l2[a:b], nf[a:b])
    empty = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    return [StepInput(step, s.time, *chunks.get(step, empty), total_norm=_opt(s.total_norm),
                      clip_coef=_opt(s.clip_coef), loss_scale=_opt(s.loss_scale), skipped=s.skipped)
            for step, s in recs.items()]


def on_batch(conn: Connection, batch: Batch, frame: LayerFrame, now: float,
             locked: list[list[tuple[Any, ...]]]) -> tuple[str, tuple[Any, ...]] | None:
    """Evaluate a stored batch's new steps in the storing transaction, the state row locked by
    :func:`lock_statements` (``locked``: their rows); writes the events and returns the
    statement that saves the state (the caller runs it in its next round trip), or None."""
    inputs = batch_inputs(batch, frame)
    if not inputs:
        return None
    run_id = batch.run.run_id
    raw = locked[0][0][0]
    st, rules = State.from_json(json.loads(raw) if raw else None), _rules_of(locked[1])[0]
    try:
        found = engine.evaluate(rules, st, inputs)
    except Exception:  # a detector bug must never cost the batch its rows: skip, keep the old state
        log.exception("detectors failed on run %s (steps %s..%s); batch stored without detection", run_id,
                      inputs[0].step, inputs[-1].step)
        return None
    _emit(conn, run_id, batch.run.project, rules, found, now, alert=True)
    return _save_statement(run_id, st, now)


def _names(conn: Connection, run_id: str, found: list[Found]) -> dict[int, str]:
    keys = {k for f in found for k in f.keys if k != TOTAL_KEY}
    names = {TOTAL_KEY: TOTAL_NAME}
    if keys:
        ph = ", ".join("?" * len(keys))
        names.update({int(i): n for i, n in run_raw(conn, f"SELECT id, name FROM layer WHERE run_id = ? AND id IN "
                                                          f"({ph})", (run_id, *sorted(keys)))})
    return names


def _clean(v: Any) -> Any:
    """JSON-safe numbers: ±inf as the strings the API uses, NaN as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def _emit(conn: Connection, run_id: str, project: str, rules: Rules, found: list[Found], now: float,
          alert: bool) -> int:
    if not found:
        return 0
    names = _names(conn, run_id, found)
    webhook = rules.alerts.webhook_url if alert else None
    floor = SEVERITIES.index(rules.alerts.min_severity)
    for f in found:
        layer_names = [names.get(k, f"#{k}") for k in f.keys]
        named = dict(f.data)
        if "layers" in named:
            named["layers"] = {names.get(k, f"#{k}"): v for k, v in named["layers"].items()}
        msg = engine.message(f.kind, f.step, layer_names, named)
        data = _clean(named)
        row = {"run_id": run_id, "kind": f.kind, "step": f.step, "rank": DETECTED_RANK, "time": f.time,
               "data": data, "source": "detector", "severity": f.severity, "layers": layer_names, "message": msg}
        event_id = conn.execute(insert(Event).values(**row).returning(Event.id)).scalar_one()
        if webhook and SEVERITIES.index(f.severity) >= floor:
            payload = {"text": f"[gradwatch] {f.severity.upper()} {project}/{run_id}: {msg}",
                       "event": {"id": event_id, **{k: row[k] for k in ("run_id", "kind", "step", "severity",
                                                                       "layers", "message", "data")},
                                 "project": project}}
            conn.execute(insert(AlertOutbox).values(project=project, run_id=run_id, event_id=event_id, url=webhook,
                                                    payload=payload, status="pending", attempts=0,
                                                    next_attempt_at=now, created_at=now))
    return len(found)


# -- replay ---------------------------------------------------------------------------------

_REPLAY_CHUNK = 2000


def _float(v: float | None) -> float:
    return math.nan if v is None else float(v)  # NULL: NaN (mask bit) or not measured, alike here


def _replay_inputs(conn: Connection, run_id: str, lo: int, layer_ids: list[int]) -> tuple[list[StepInput], int | None]:
    """The next chunk of stored steps (from ``lo``) of the detected rank, and where the next starts."""
    cols = ", ".join(("step", "time", "total_norm", "clip_coef", "loss_scale", "skipped", "nan_mask"))
    recs = run_raw(conn, f"SELECT {cols} FROM step_record WHERE run_id = ? AND rank = ? AND step >= ? "
                         f"ORDER BY step LIMIT {_REPLAY_CHUNK}", (run_id, DETECTED_RANK, lo))
    if not recs:
        return [], None
    hi = int(recs[-1][0])
    per: dict[int, tuple[list[int], list[float], list[int]]] = {}
    if layer_ids:
        ph = ", ".join("?" * len(layer_ids))
        for lid, step, l2, nf in run_raw(
                conn, f"SELECT layer_id, step, l2, nonfinite FROM layer_stat WHERE layer_id IN ({ph}) "
                      "AND rank = ? AND step BETWEEN ? AND ? ORDER BY step, layer_id",
                (*layer_ids, DETECTED_RANK, lo, hi)):
            k, v, n = per.setdefault(int(step), ([], [], []))
            k.append(int(lid))
            v.append(_float(l2))
            n.append(int(nf or 0))
    bits = {c: STEP_FLOAT_COLUMNS.index(c) for c in ("total_norm", "clip_coef", "loss_scale")}
    out = []
    for step, t, total, coef, scale, skipped, mask in recs:
        k, v, n = per.get(int(step), ([], [], []))
        vals = {c: (math.nan if (mask >> b & 1) else x) for (c, b), x in zip(bits.items(), (total, coef, scale))}
        out.append(StepInput(int(step), float(t), np.array(k, np.int64), np.array(v, float), np.array(n, np.int64),
                             total_norm=_opt(vals["total_norm"]), clip_coef=_opt(vals["clip_coef"]),
                             loss_scale=_opt(vals["loss_scale"]), skipped=bool(skipped)))
    return out, (hi + 1 if len(recs) == _REPLAY_CHUNK else None)


def replay(conn: Connection, run_id: str, project: str, now: float | None = None) -> dict[str, Any]:
    """Re-evaluate a whole run under the project's current rules: its detector events are
    replaced and its state rebuilt (in the caller's transaction; ingest of the run waits on the
    state row meanwhile). Replayed events send no alerts: they describe the past."""
    now = time.time() if now is None else now
    _lock_state(conn, run_id, now)
    run_raw(conn, "DELETE FROM event WHERE run_id = ? AND source = 'detector'", (run_id,))
    rules, _ = load_rules(conn, project)
    layer_ids = [int(r[0]) for r in run_raw(conn, "SELECT id FROM layer WHERE run_id = ? ORDER BY id", (run_id,))]
    st = State()
    events = 0
    lo: int | None = 0
    while lo is not None:
        inputs, lo = _replay_inputs(conn, run_id, lo, layer_ids)
        found = engine.evaluate(rules, st, inputs)
        events += _emit(conn, run_id, project, rules, found, now, alert=False)
    _save_state(conn, run_id, st, now)
    return {"run": run_id, "project": project, "steps": st.steps, "last_step": st.last_step, "events": events}
