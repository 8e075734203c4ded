"""Per-project detector rules and alert deliveries: ``/projects/{project}/rules``,
``/projects/{project}/rules/replay`` and ``/projects/{project}/alerts``.

Rules take effect for steps stored after the change; the past is re-evaluated only by replay.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from gradwatch.server.api.deps import ERRORS, require_read, require_write, state
from gradwatch.server.db.raw import run_raw
from gradwatch.server.detect import alerts
from gradwatch.server.detect import store as detect
from gradwatch.server.detect.rules import Rules
from gradwatch.server.errors import NotFound
from gradwatch.server.schemas import RUN_ID_PATTERN

router = APIRouter(tags=["rules"])
read = [Depends(require_read)]
write = [Depends(require_write)]

Project = Annotated[str, Path(min_length=1, max_length=512, pattern=r"^[^\x00]*$")]


class RulesRead(BaseModel):
    project: str
    #: When the rules were last set (epoch seconds); null: never set, the defaults apply.
    updated_at: float | None
    rules: Rules


class ReplayResult(BaseModel):
    run: str
    project: str
    steps: int = Field(description="recorded steps of rank 0 evaluated")
    last_step: int | None
    events: int = Field(description="detector events the run now has")


class AttemptRead(BaseModel):
    attempt: int
    time: float
    duration: float
    ok: bool
    status_code: int | None
    error: str | None


class DeliveryRead(BaseModel):
    id: int
    run_id: str
    event_id: int | None
    url: str
    status: str = Field(description="'pending', 'delivered' or 'failed' (attempts exhausted)")
    attempts: int
    next_attempt_at: float
    created_at: float
    delivered_at: float | None
    last_error: str | None
    payload: dict[str, Any]
    attempt_log: list[AttemptRead]


class DeliveryPage(BaseModel):
    data: list[DeliveryRead]
    count: int


@router.get("/projects/{project}/rules", response_model=RulesRead, dependencies=read, responses=ERRORS)
def get_rules(request: Request, project: Project) -> Any:
    """The project's detector thresholds and alert webhook (the defaults until set)."""
    with state(request).db.read() as conn:
        rules, at = detect.load_rules(conn, project)
    return {"project": project, "updated_at": at, "rules": rules}


@router.put("/projects/{project}/rules", response_model=RulesRead, dependencies=write, responses=ERRORS)
def put_rules(request: Request, project: Project, rules: Rules) -> Any:
    """Replace the project's rules (omitted sections and fields take their defaults). Applies to
    steps stored from now on; use ``/rules/replay`` to re-evaluate a run's past."""
    now = time.time()
    with state(request).db.write() as conn:
        detect.save_rules(conn, project, rules, now)
    return {"project": project, "updated_at": now, "rules": rules}


@router.post("/projects/{project}/rules/replay", response_model=ReplayResult, dependencies=write, responses=ERRORS)
def replay(request: Request, project: Project,
           run: Annotated[str, Query(pattern=RUN_ID_PATTERN, description="the run to re-evaluate")]) -> Any:
    """Re-evaluate one run's stored steps under the project's current rules: its detector events
    are replaced (no alerts are sent for them) and its detector state rebuilt."""
    with state(request).db.write() as conn:
        found = run_raw(conn, "SELECT project FROM run WHERE id = ?", (run,))
        if not found:
            raise NotFound(f"run {run!r} not found")
        if found[0][0] != project:
            raise NotFound(f"run {run!r} is not in project {project!r} (it is in {found[0][0]!r})")
        return detect.replay(conn, run, project)


@router.get("/projects/{project}/alerts", response_model=DeliveryPage, dependencies=read, responses=ERRORS)
def list_alerts(request: Request, project: Project,
                status: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
                run: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> Any:
    """The project's webhook deliveries, newest first, each with every attempt made."""
    with state(request).db.read() as conn:
        data, count = alerts.list_deliveries(conn, project, status=status, run_id=run, limit=limit, offset=offset)
    return {"data": data, "count": count}
