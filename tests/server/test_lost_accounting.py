"""The agents' loss accounting on the server (issue 13 point 1): an end-of-run batch may say what
its source lost before delivery (``"lost": {"ENOSPC": 3710}``); the run keeps it per source and
shows the totals as ``lost_records`` and ``lost_reasons``. An older agent's end batch, without the
field, still ends the run; a malformed one is a 422 that names the field."""

from __future__ import annotations

import dataclasses
import json
import random

from gradwatch.agent import wire


def _end(mk, seq: int, source: int = 0, lost: dict[str, int] | None = None, status: str | None = "finished",
         run_id: str = "run1") -> wire.Batch:
    return dataclasses.replace(mk(seq, [], run_id=run_id, source=source, status=status, events=False), lost=lost)


def test_end_of_run_loss_is_stored_per_source_and_shown_on_the_run(client, mk, post):
    assert post(client, mk(1, [1, 2])).status_code == 200
    r = client.get("/api/v1/runs/run1").json()
    assert (r["lost_records"], r["lost_reasons"]) == (0, {})
    assert post(client, _end(mk, 2, lost={"ENOSPC": 3710, "buffer_full": 2})).status_code == 200
    assert post(client, _end(mk, 1, source=1, lost={"ENOSPC": 5}, status=None)).status_code == 200
    assert post(client, _end(mk, 2, lost={"ENOSPC": 3710, "buffer_full": 2})).json()["duplicate"]  # a resend
    r = client.get("/api/v1/runs/run1").json()
    assert r["status"] == "finished"
    assert (r["lost_records"], r["lost_reasons"]) == (3717, {"ENOSPC": 3715, "buffer_full": 2})
    assert r["config"] == {"lr": 0.1}  # the bookkeeping key is not the user's config
    listed = client.get("/api/v1/runs").json()["data"][0]
    assert (listed["lost_records"], listed["lost_reasons"]) == (3717, {"ENOSPC": 3715, "buffer_full": 2})
    # a user's edit of the run keeps the accounting
    assert client.patch("/api/v1/runs/run1", json={"notes": "x"}).json()["lost_records"] == 3717


def test_an_older_agents_end_batch_without_the_field_still_ends_the_run(client, mk, post):
    assert post(client, mk(1, [1, 2])).status_code == 200
    old = wire.batch_to_dict(_end(mk, 2))  # what an agent that predates the field sends
    assert "lost" not in old
    r = client.post("/api/v1/ingest", content=json.dumps(old), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    run = client.get("/api/v1/runs/run1").json()
    assert (run["status"], run["lost_records"], run["lost_reasons"]) == ("finished", 0, {})


def test_malformed_loss_accounting_is_a_422_naming_the_field(client, mk, post):
    assert post(client, mk(1, [1])).status_code == 200
    good = wire.batch_to_dict(_end(mk, 2))
    cases = [
        ([1, 2], "batch.lost: expected an object"),
        ({"ENOSPC": -1}, "batch.lost.ENOSPC: -1 is out of range"),
        ({"ENOSPC": 1.5}, "batch.lost.ENOSPC: expected an integer"),
        ({"ENOSPC": 2**64}, "batch.lost.ENOSPC"),
        ({"x" * 65: 1}, "batch.lost key: longer than 64"),
        ({f"r{i}": 1 for i in range(33)}, "batch.lost: more than 32 reasons"),
    ]
    for lost, needle in cases:
        r = client.post("/api/v1/ingest", content=json.dumps({**good, "lost": lost}),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (lost, r.status_code, r.text[:200])
        assert needle in r.json()["detail"], (lost, r.json())
    run = client.get("/api/v1/runs/run1").json()
    assert (run["status"], run["lost_records"]) == ("running", 0)


def test_random_reports_match_a_reference(client, mk, post):
    """Many sources reporting (and re-reporting after a resume) in random order: the run shows
    the sum over sources of each source's latest report."""
    rnd = random.Random(13)
    reasons = ["ENOSPC", "EROFS", "EACCES", "buffer_full", "EIO"]
    latest: dict[int, dict[str, int]] = {}
    seqs: dict[int, int] = {}
    for _ in range(40):
        src = rnd.randrange(6)
        lost = {r: rnd.randrange(1, 10_000) for r in rnd.sample(reasons, rnd.randrange(1, 4))}
        seqs[src] = seqs.get(src, 0) + 1
        assert post(client, _end(mk, seqs[src], source=src, lost=lost, status=None)).status_code == 200
        latest[src] = lost
        want: dict[str, int] = {}
        for by in latest.values():
            for k, n in by.items():
                want[k] = want.get(k, 0) + n
        r = client.get("/api/v1/runs/run1").json()
        assert (r["lost_records"], r["lost_reasons"]) == (sum(want.values()), want)


def test_encoding_round_trips_and_omits_an_empty_map(mk):
    b = _end(mk, 3, lost={"ENOSPC": 7})
    assert wire.decode_batch(wire.encode_batch(b)).lost == {"ENOSPC": 7}
    assert b"lost" not in wire.encode_batch(_end(mk, 3, lost={}))
    assert wire.decode_batch(wire.encode_batch(_end(mk, 3))).lost is None
