"""The network sink at the edges (issue 13 points 1-2, issue 10 point 2), against a real
``gradwatch serve``: a full spool disk, a server failing at close, a server refusing the run."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.transport import make_sink
from gradwatch.agent.transport.buffered import TransportWarning
from gradwatch.agent.transport.spool import read_batches
from gradwatch.agent.wire import Event, RunInfo

from .conftest import (
    DiskQuota,
    FlakyProxy,
    ServerProc,
    db_counts,
    layers_of,
    new_run,
    run_cli,
    scalar_record,
    step_record,
    summary_line,
    wait_for,
)

N = 3  # layers per step record


def _transport_warnings(got: list[Any]) -> list[str]:
    return [str(g.message) for g in got if g.category is TransportWarning]


# ------------------------------------------------------------------ 1. the spool never dies


@pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")
def test_full_spool_with_the_server_down_then_up_every_record_delivered_or_counted_lost(
        server_factory: Any, tmp_path: Path, capsys: Any) -> None:
    srv = server_factory()
    run = new_run()
    spool = tmp_path / "spool"
    with DiskQuota(spool, limit=24_000) as disk:
        sink = make_sink(srv.url, run=run, layers=lambda: layers_of(N), spool_dir=spool, flush_interval=0.02,
                         batch_max_steps=10, connect_timeout=0.5, backoff_base=0.05, backoff_max=0.3,
                         memory_bytes=60_000, close_timeout=120)
        for i in range(400):  # server down: the disk fills, then memory, then the oldest held go
            sink.put(step_record(i, N))
            sink.put(scalar_record(i))
            if i % 10 == 9:
                assert sink.flush(60)
        assert disk.failures > 0
        lost_while_down = sink.stats()["lost"]
        assert lost_while_down > 0
        assert sink.lost_reasons() == {"ENOSPC": lost_while_down}
        srv.start()  # the server comes back: held batches go straight from memory
        wait_for(lambda: sink.stats()["connected"] == 1 and not sink.stats()["batches_unsent"])
        disk.limit = 10 << 20  # space is freed: spooling resumes
        for i in range(400, 800):
            sink.put(step_record(i, N))
            sink.put(scalar_record(i))
        assert sink.flush(60)
        st = sink.stats()
        sink.close()
    summary = summary_line(capsys.readouterr().err)
    c = db_counts(srv.db, run.run_id)
    stored = len(c["steps"]) + sum(c["scalars"].values())
    assert all(n == 1 for n in c["steps"].values())
    assert set(range(400, 800)) <= {s for s, _ in c["steps"]}  # after the recovery nothing is lost
    assert stored + st["lost"] == 1600  # every record delivered or counted lost
    assert st["lost"] == lost_while_down and st["spooled"] == 0
    assert f"{stored} records delivered" in summary
    assert f"{st['lost']} records lost because the spool could not be written ({st['lost']} ENOSPC" in summary
    assert c["status"] == "finished"
    assert not [p for p in spool.glob("*.jsonl")]  # all delivered or lost: nothing left to upload
    # the server learnt the loss from the end-of-run record: its run says what the line printed
    printed = int(re.search(r"; (\d+) records lost because the spool", summary).group(1))  # type: ignore[union-attr]
    r = srv.get(f"/api/v1/runs/{run.run_id}")
    assert (r["lost_records"], r["lost_reasons"]) == (printed, {"ENOSPC": printed})
    assert "_gradwatch_lost" not in r["config"]
    listed = [x for x in srv.get("/api/v1/runs")["data"] if x["run_id"] == run.run_id]
    assert listed[0]["lost_records"] == printed


@pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")
def test_full_spool_and_no_server_then_upload_keeps_the_finished_status(server_factory: Any, tmp_path: Path,
                                                                        capsys: Any) -> None:
    srv = server_factory()
    run = new_run()
    spool = tmp_path / "spool"
    with DiskQuota(spool, limit=12_000) as disk:
        sink = make_sink(srv.url, run=run, layers=lambda: layers_of(N), spool_dir=spool, flush_interval=0.02,
                         batch_max_steps=10, connect_timeout=0.3, close_timeout=1)
        for i in range(200):
            sink.put(step_record(i, N))
        assert sink.flush(60)
        assert disk.failures > 0 and sink.stats()["lost"] == 0  # all of it held in memory
        disk.limit = 10 << 20  # space is back by the end of the run: what was held goes to disk
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            sink.close()
    summary = summary_line(capsys.readouterr().err)
    assert "200 records" in summary and "gradwatch upload" in summary and "lost" not in summary
    assert any("ENOSPC" in m for m in _transport_warnings(got)) or disk.failures  # warned at the failure
    assert read_batches(spool)[-1].status == "finished"
    srv.start()
    p = run_cli("upload", str(spool), "--server", srv.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "killed" not in p.stdout
    c = db_counts(srv.db, run.run_id)
    assert set(c["steps"]) == {(i, 0) for i in range(200)} and c["status"] == "finished"


def test_upload_names_a_failed_write_and_takes_the_status_from_the_agents_note(server: ServerProc,
                                                                               tmp_path: Path) -> None:
    """The end-of-run record was lost with a full disk (the note, written once space returned,
    says so): upload reports the write failure, not a kill, and does not mark the run crashed."""
    run = new_run()
    spool = tmp_path / "spool"
    sink = make_sink(f"file:{spool / '0-000000000001.jsonl'}", run=run, layers=lambda: layers_of(N),
                     quiet=True, send_status=False)
    for i in range(20):
        sink.put(step_record(i, N))
    sink.close()
    with open(spool / "0-000000000001.jsonl", "ab") as f:
        f.write(b'{"wire_version": 1, "run": {"run_id": "' + run.run_id.encode() + b'", "pro')
    (spool / "0.note.json").write_text(json.dumps({
        "source": 0, "run_id": run.run_id, "status": "finished", "lost": {"ENOSPC": 5},
        "disk_error": "ENOSPC: No space left on device"}))
    p = run_cli("upload", str(spool), "--server", server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "truncated last line (the agent's write failed: ENOSPC: No space left on device)" in p.stdout
    assert "lost 5 records" in p.stdout and "as the agent's note says finished" in p.stdout
    assert db_counts(server.db, run.run_id)["status"] == "finished"
    assert not spool.exists() or not list(spool.iterdir())


def test_a_vanished_spool_directory_is_recreated_and_the_drainer_lives_on(server: ServerProc,
                                                                          tmp_path: Path) -> None:
    import shutil

    run = new_run()
    spool = tmp_path / "spool"
    sink = make_sink(server.url, run=run, layers=lambda: layers_of(N), spool_dir=spool, flush_interval=0.02,
                     batch_max_steps=5, segment_bytes=2_000, close_timeout=60)
    for i in range(50):
        sink.put(step_record(i, N))
    assert sink.flush(60)
    shutil.rmtree(spool, ignore_errors=True)
    for i in range(50, 100):
        sink.put(step_record(i, N))
    assert sink.flush(60)
    st = sink.stats()
    sink.close()
    assert st["sent"] == 100 and st["lost"] == 0
    assert set(db_counts(server.db, run.run_id)["steps"]) == {(i, 0) for i in range(100)}


# ------------------------------------------------------------------ 2. close() honours its timeout


@pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")
@pytest.mark.parametrize("ws", [True, False], ids=["websocket", "http"])
def test_server_503_at_close_then_200_close_keeps_retrying_within_its_timeout(
        server: ServerProc, tmp_path: Path, capsys: Any, ws: bool) -> None:
    proxy = FlakyProxy(server.port, failing=False)
    run = new_run()
    sink = make_sink(proxy.url, run=run, layers=lambda: layers_of(N), spool_dir=tmp_path / "spool", ws=ws,
                     flush_interval=0.02, batch_max_steps=10, close_timeout=300)
    for i in range(40):
        sink.put(step_record(i, N))
    assert sink.flush(60)
    proxy.fail()  # a restart behind the load balancer, right at the end of the run
    import threading

    def recover() -> None:
        wait_for(lambda: proxy.refused >= 4, 120)
        proxy.failing = False

    t = threading.Thread(target=recover, daemon=True)
    for i in range(40, 120):
        sink.put(step_record(i, N))
    t.start()
    t0 = time.monotonic()
    sink.close()
    elapsed = time.monotonic() - t0
    t.join(5)
    assert proxy.refused >= 4
    assert elapsed < 150  # it stopped once delivered, far before its timeout
    c = db_counts(server.db, run.run_id)
    assert set(c["steps"]) == {(i, 0) for i in range(120)} and c["status"] == "finished"
    assert "not delivered" not in capsys.readouterr().err
    proxy.close()


@pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")
def test_server_failing_throughout_close_retries_for_its_timeout_and_says_failing(
        server: ServerProc, tmp_path: Path, capsys: Any) -> None:
    proxy = FlakyProxy(server.port, failing=True)
    run = new_run()
    sink = make_sink(proxy.url, run=run, layers=lambda: layers_of(N), spool_dir=tmp_path / "spool",
                     flush_interval=0.02, close_timeout=3)
    for i in range(30):
        sink.put(step_record(i, N))
    assert sink.flush(60)
    before = proxy.refused
    t0 = time.monotonic()
    sink.close()
    elapsed = time.monotonic() - t0
    assert elapsed >= 2.5  # it did not give up after one try
    assert proxy.refused - before >= 3  # several tries with short backoff within the timeout
    summary = summary_line(capsys.readouterr().err)
    assert "server failing: HTTP 503: maintenance" in summary and "unreachable" not in summary
    assert "close timeout of 3 s" in summary and "gradwatch upload" in summary
    proxy.close()


# ------------------------------------------------------------------ issue 10.2: refusals are fatal


def _refused_run(kind: str) -> tuple[RunInfo, list[Any]]:
    if kind == "hello":
        # an id the wire refuses (trailing newline); built by hand: watch() refuses it up front
        return RunInfo(run_id="abc\n", project="transport-tests"), [step_record(i, N) for i in range(5)]
    records: list[Any] = [step_record(i, N) for i in range(5)]
    return new_run(), records + [Event(kind="not-a-kind", step=5, time=time.time())] + \
        [step_record(i, N) for i in range(6, 10)]


@pytest.mark.parametrize("ws", [True, False], ids=["websocket", "http"])
@pytest.mark.parametrize("kind", ["hello", "batch"])
def test_a_refusal_is_fatal_warns_once_with_the_reason_and_close_returns_at_once(
        server: ServerProc, tmp_path: Path, capsys: Any, ws: bool, kind: str) -> None:
    run, records = _refused_run(kind)
    spool = tmp_path / "spool"
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sink = make_sink(server.url, run=run, layers=lambda: layers_of(N), spool_dir=spool, ws=ws,
                         flush_interval=0.02, batch_max_steps=5, close_timeout=300)
        for r in records:
            sink.put(r)
            if kind == "batch":
                assert sink.flush(60)
        wait_for(lambda: sink.warn.seen & {"refused"}, 60)
        for i in range(20, 30):
            sink.put(step_record(i, N))  # after the refusal: spooled, never sent, never retried
        t0 = time.monotonic()
        sink.close()
        elapsed = time.monotonic() - t0
    msgs = _transport_warnings(got)
    assert len(msgs) == 1, msgs
    reason = "run_id" if kind == "hello" else "not-a-kind"
    assert "refused" in msgs[0] and "HTTP 422" in msgs[0] and reason in msgs[0], msgs[0]
    assert f"gradwatch upload {spool}" in msgs[0]
    assert elapsed < 60  # at once, not after its 300 s timeout
    summary = capsys.readouterr().err  # (one line, but the refused run id "abc\n" breaks it)
    assert summary.count("gradwatch: run ") == 1
    assert "the server refused them: HTTP 422" in summary and reason in summary
    assert f"gradwatch upload {spool}" in summary
    kept = read_batches(spool)
    assert {s["step"] for ln in kept for s in _steps(ln.raw)} >= set(range(20, 30))  # the spool is kept
    if kind == "batch":
        assert set(db_counts(server.db, run.run_id)["steps"]) == {(i, 0) for i in range(5)}


def _steps(raw: bytes) -> list[Any]:
    return list(json.loads(raw).get("steps") or [])


def test_one_run_id_rule_everywhere() -> None:
    from gradwatch.agent.config import AgentConfig
    from gradwatch.agent.wire import WireError, validate_run_id
    from gradwatch.server.schemas import RUN_ID_PATTERN

    for bad in ["abc\n", "", "a" * 65, "é", "a b", "a/b", "abc\r"]:
        with pytest.raises(WireError):
            validate_run_id(bad, "run_id")
        with pytest.raises(ValueError):
            AgentConfig(run_id=bad)
        assert re.fullmatch(RUN_ID_PATTERN, bad) is None
    for good in ["abc", "A-b_9", "a" * 64]:
        assert validate_run_id(good, "run_id") == good
        assert AgentConfig(run_id=good).run_id == good
        assert re.fullmatch(RUN_ID_PATTERN, good)


# ------------------------------------------------------------------ 3. two servers on one SQLite file


def test_two_servers_started_together_on_a_new_sqlite_file_then_under_load(server_factory: Any,
                                                                           tmp_path: Path) -> None:
    for trial in range(3):  # started together on a fresh file: both come up every time
        db = tmp_path / f"shared-{trial}.db"
        a, b = server_factory(), server_factory()
        for s in (a, b):
            s.db = db
            s.start(wait=False)
        a.wait_ready()
        b.wait_ready()
        if trial < 2:
            a.stop()
            b.stop()
    runs = [new_run() for _ in range(4)]
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sinks = [make_sink((a, b)[i % 2].url, run=r, layers=lambda: layers_of(N), spool_dir=tmp_path / f"sp{i}",
                           flush_interval=0.02, batch_max_steps=8, close_timeout=120) for i, r in enumerate(runs)]
        for step in range(300):
            for s in sinks:
                s.put(step_record(step, N))
                s.put(scalar_record(step))
        for s in sinks:
            s.close()
    assert not _transport_warnings(got)  # no 503, no refused or broken stream
    for r in runs:
        c = db_counts(a.db, r.run_id)
        assert set(c["steps"]) == {(i, 0) for i in range(300)} and all(n == 1 for n in c["steps"].values())
        assert c["stats"] == {(i, 0): N for i in range(300)} and c["status"] == "finished"
    logs = "".join(p.read_text() for s in (a, b) for p in s.root.glob("server-*.log"))
    assert "database is locked" not in logs and "Traceback" not in logs


# ------------------------------------------------------------------ 4. idle streams


def test_an_idle_stream_closed_by_the_server_reconnects_quietly(server_factory: Any, tmp_path: Path) -> None:
    srv = server_factory(env={"GRADWATCH_SERVER_INGEST_IDLE_TIMEOUT": "0.5"}).start()
    run = new_run()

    def idle_closes() -> int:
        import urllib.request

        with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
            m = re.search(r'^gradwatch_ingest_errors_total\{kind="idle"\} (\d+)$', r.read().decode(), re.M)
        return int(m.group(1)) if m else 0

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sink = make_sink(srv.url, run=run, layers=lambda: layers_of(N), spool_dir=tmp_path / "spool",
                         flush_interval=0.02, close_timeout=60)
        for i in range(10):
            sink.put(step_record(i, N))
        assert sink.flush(60)
        wait_for(lambda: idle_closes() >= 1)  # the server closed the quiet stream
        for i in range(10, 20):
            sink.put(step_record(i, N))
        assert sink.flush(60)
        st = sink.stats()
        sink.close()
    assert not _transport_warnings(got)
    assert st["sent"] == 20 and st["reconnects"] >= 1
    assert set(db_counts(srv.db, run.run_id)["steps"]) == {(i, 0) for i in range(20)}


def test_a_segment_whose_first_write_fails_leaves_no_file(tmp_path: Path) -> None:
    """A write refused at a segment's first line (the disk full just then) must not leave an empty
    file that no one tracks: a spool of junk that neither the sink's cleanup nor an upload removes."""
    import errno

    from gradwatch.agent.transport.spool import SegmentWriter

    spool = tmp_path / "spool"
    w = SegmentWriter(spool, source=0, max_segment_bytes=200)
    with DiskQuota(spool, limit=150) as disk:
        w.append(1, b"x" * 100)
        for seq in range(2, 6):  # the first segment fills; each new one is refused at its first line
            with pytest.raises(OSError) as e:
                w.append(seq, b"y" * 100)
            assert e.value.errno == errno.ENOSPC
        assert disk.failures == 4
    assert sorted(p.name for p in spool.iterdir()) == ["0-000000000001.jsonl"]
    assert [s.first_seq for s in w.segments] == [1]
    w.append(6, b"z" * 10)  # space is back: the writer goes on
    w.close()
    assert [ln.split(b" ")[0] for ln in (spool / "0-000000000006.jsonl").read_bytes().splitlines()] == [b"z" * 10]
