"""Fixtures for the server tests: every storage/API test runs on SQLite and on PostgreSQL.

PostgreSQL: ``GRADWATCH_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
A template database is migrated once per session; each test gets a fresh copy
(``CREATE DATABASE ... TEMPLATE``) that is dropped afterwards. Unreachable PostgreSQL: the tests
fail when ``CI=true`` and are skipped (with the reason) otherwise.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent import wire

PG_URL = os.environ.get("GRADWATCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_counter = itertools.count()


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def pg_reachable() -> str | None:
    """None when PostgreSQL answers, else the reason."""
    try:
        import psycopg

        with psycopg.connect(_libpq(PG_URL), connect_timeout=3):
            return None
    except Exception as e:  # any failure means "not usable here"
        return f"PostgreSQL at {PG_URL} unreachable: {type(e).__name__}: {str(e).strip()[:200]}"


def require_pg() -> None:
    reason = pg_reachable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL is required)")
    pytest.skip(reason)


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(_libpq(PG_URL), autocommit=True) as conn:
        conn.execute(sql)


def migrated_template_sqlite(dirpath: Path) -> Path:
    from gradwatch.server.db.engine import make_engine
    from gradwatch.server.db.migrate import upgrade_to_head

    path = dirpath / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_to_head(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return migrated_template_sqlite(tmp_path_factory.mktemp("tmpl"))


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    require_pg()
    from gradwatch.server.db.engine import make_engine
    from gradwatch.server.db.migrate import upgrade_to_head

    name = f"gwt_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg_admin(f"CREATE DATABASE {name}")
    engine = make_engine(_with_db(PG_URL, name))
    upgrade_to_head(engine)
    engine.dispose()
    yield name
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def fresh_pg_db() -> tuple[str, str]:
    """A new empty (unmigrated) database: (url, name)."""
    require_pg()
    name = f"gwt_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    pg_admin(f"CREATE DATABASE {name}")
    return _with_db(PG_URL, name), name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "gw.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    tmpl = request.getfixturevalue("pg_template")
    name = f"gwt_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    pg_admin(f"CREATE DATABASE {name} TEMPLATE {tmpl}")
    try:
        yield _with_db(PG_URL, name)
    finally:
        pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def make_settings(db_url: str) -> Callable[..., Any]:
    from gradwatch.server.settings import ServerSettings

    def make(**kw: Any) -> ServerSettings:
        kw.setdefault("token", None)
        kw.setdefault("read_token", None)
        return ServerSettings(database_url=db_url, **kw)

    return make


@pytest.fixture
def client(make_settings: Callable[..., Any]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from gradwatch.server.app import create_app

    with TestClient(create_app(make_settings())) as c:
        yield c


LAYERS = 4


def make_batch(seq: int = 1, steps: range | list[int] = range(1, 4), *, run_id: str = "run1", source: int = 0,
               layers: int = LAYERS, project: str = "default", status: str | None = None,
               values: Callable[[int, int], float] | None = None, events: bool = True,
               name: str | None = "test run", skipped: Callable[[int], bool] = lambda s: False,
               counts: Callable[[int, int], tuple[int, int | None, int | None]] | None = None) -> wire.Batch:
    """A batch with ``layers`` layers per step; ``values(step, layer)`` sets every float stat
    (``m2`` to ``|v|·numel``, so the derived variance is ``|v|`` up to one rounding);
    ``counts(step, layer)`` the (nonfinite, zeros, underflow) counts (default 0, not measured, not measured)."""
    vf = values or (lambda s, i: float(s) + i / 10)
    cf = counts or (lambda s, i: (0, None, None))
    recs = []
    for s in steps:
        v = [vf(s, i) for i in range(layers)]
        c = [cf(s, i) for i in range(layers)]
        recs.append(wire.StepRecord(
            step=s, time=1000.0 + s, rank=source, layer_ids=list(range(layers)),
            layers={"numel": [10 * (i + 1) for i in range(layers)], "mean": list(v),
                    "m2": [abs(x) * 10 * (i + 1) for i, x in enumerate(v)],
                    "l2": list(v), "maxabs": list(v), "nonfinite": [x[0] for x in c], "l2_post": list(v),
                    "wnorm": list(v), **({"zeros": [x[1] for x in c], "underflow": [x[2] for x in c]} if counts else {})},
            total_norm=float(s), total_norm_post=float(s) / 2, clip_coef=0.5, loss_scale=65536.0,
            skipped=skipped(s)))
    steps = list(steps)
    evs = [wire.Event("overflow", steps[0], 1000.0 + steps[0], rank=source,
                      data={"layers": ["layer.1"], "scale_before": 65536.0, "scale_after": 32768.0})] if events and steps else []
    scal = [wire.ScalarRecord(s, 1000.0 + s, {"loss": 1.0 / s, "lr": 0.1}, rank=source) for s in steps]
    return wire.Batch(
        run=wire.RunInfo(run_id=run_id, project=project, name=name, config={"lr": 0.1}, tags=["t"]),
        seq=seq, source=source, sent_at=time.time(),
        layers=[wire.LayerInfo(i, f"layer.{i}", [i + 1, 2], "float32") for i in range(layers)],
        steps=recs, scalars=scal, events=evs, status=status)


@pytest.fixture
def mk() -> Callable[..., wire.Batch]:
    return make_batch


@pytest.fixture
def post() -> Callable[..., Any]:
    def do(client: Any, batch: wire.Batch, **kw: Any) -> Any:
        return client.post("/api/v1/ingest", content=wire.encode_batch(batch),
                           headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)

    return do


NAN, INF = math.nan, math.inf


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """An empty, unmigrated PostgreSQL database, dropped afterwards."""
    url, name = fresh_pg_db()
    try:
        yield url
    finally:
        pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def hostile_payloads() -> list[tuple[str, bytes, int, str]]:
    """Batches that once made ingest answer 500 (or 503 forever): (label, body, status, message part).
    Each refers to run ``run1`` at seq 2, so a test can check nothing stored under seq 1 changed."""
    good = wire.batch_to_dict(make_batch(2, [3]))
    step, cols = good["steps"][0], good["steps"][0]["layers"]

    def body(**kw: Any) -> bytes:
        return json.dumps({**good, **kw}).encode()

    return [
        ("deep JSON", b"[" * 100_000 + b"]" * 100_000, 422, "nested too deeply"),
        ("deep JSON object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 422, "nested too deeply"),
        ("status list", body(status=["running"]), 422, "batch.status: must be one of"),
        ("kind dict", body(events=[{**good["events"][0], "kind": {"x": 1}}]), 422, "batch.events[0].kind"),
        ("time 10**400", body(steps=[{**step, "time": 10**400}]), 422, "batch.steps[0].time: integer of 401"),
        ("scalar 10**400", body(scalars=[{**good["scalars"][0], "values": {"loss": 10**400}}]), 422,
         "batch.scalars[0].values.loss"),
        ("float column 10**400", body(steps=[{**step, "layers": {**cols, "l2": [1.0, 10**400, 1.0, 1.0]}}]), 422,
         "batch.steps[0].layers.l2[1]"),
        ("numel 2**64", body(steps=[{**step, "layers": {**cols, "numel": [1, 2**64, 1, 1]}}]), 422,
         "batch.steps[0].layers.numel[1]: 18446744073709551616 is out of range"),
        ("nonfinite 2**63", body(steps=[{**step, "layers": {**cols, "nonfinite": [2**63, 0, 0, 0]}}]), 422,
         "batch.steps[0].layers.nonfinite[0]"),
        ("source 2**70", body(source=2**70), 422, "batch.source"),
    ]


@pytest.fixture
def hostile() -> list[tuple[str, bytes, int, str]]:
    return hostile_payloads()
