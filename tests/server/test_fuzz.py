"""schemathesis against the app's own /openapi.json: no 5xx, responses match the documented schema.

Bounded (a few examples per operation) to stay within the test budget; runs on both databases
because PostgreSQL rejects inputs (NUL bytes, out-of-range integers) that SQLite accepts.
(``schemathesis.pytest.from_fixture`` breaks on pytest 9, so the operations are driven directly.)
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from gradwatch.agent import wire
from gradwatch.server.app import create_app

EXAMPLES = int(os.environ.get("GRADWATCH_FUZZ_EXAMPLES", "10"))


def test_api_fuzz(make_settings: Any, mk: Any) -> None:
    app = create_app(make_settings())
    with TestClient(app) as c:  # runs the lifespan: engine, migrations, state
        assert c.post("/api/v1/ingest", content=wire.encode_batch(mk(1, range(1, 30)))).status_code == 200
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        labels = []
        for result in schema.get_all_operations():
            op = result.ok()
            labels.append(op.label)

            @given(case=op.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case: Any) -> None:
                case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

            run()
        assert "POST /api/v1/ingest" in labels and "GET /api/v1/runs/{run_id}/stats" in labels
