"""``gradwatch upload`` and the rejected-batch path, against a real ``gradwatch serve``."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent import watch
from gradwatch.agent.transport import make_sink
from gradwatch.agent.transport.buffered import TransportWarning
from gradwatch.agent.transport.spool import read_batches
from gradwatch.agent.wire import Event

from .conftest import ServerProc, assert_exactly_once, db_counts, layers_of, new_run, run_cli, step_record
from .train import N_LAYERS, build, train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")]


def test_file_recording_uploads_later_and_tolerates_a_truncated_tail(server: ServerProc, tmp_path: Path) -> None:
    rec = tmp_path / "runs" / "r1.jsonl"
    model, opt = build()
    w = watch(model, opt, server=f"file:{rec}")
    train(model, opt, w, 40)
    w.close()
    # a writer killed mid-line leaves half a batch at the end
    raw = rec.read_bytes()
    rec.write_bytes(raw + raw.splitlines()[0][:100])
    p = run_cli("upload", str(rec), "--server", server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "truncated last line" in p.stdout and "Traceback" not in p.stderr
    assert_exactly_once(server.db, w.run_id, range(40), N_LAYERS, status="finished")
    assert rec.exists()  # the user's recording is kept
    again = run_cli("upload", str(rec), "--server", server.url)
    assert again.returncode == 0 and "0 rows stored" in again.stdout
    assert_exactly_once(server.db, w.run_id, range(40), N_LAYERS)


def test_upload_errors_are_clear(tmp_path: Path) -> None:
    p = run_cli("upload", str(tmp_path / "nope"), "--server", "http://127.0.0.1:9")
    assert p.returncode != 0 and "no such file" in p.stderr
    (tmp_path / "empty.jsonl").write_text("")
    p = run_cli("upload", str(tmp_path / "empty.jsonl"), "--server", "http://127.0.0.1:9")
    assert p.returncode != 0 and "no readable batches" in p.stderr
    p = run_cli("upload", "--help")
    assert p.returncode == 0 and "SPOOL_OR_FILE" in p.stdout


def test_refused_batch_stops_the_sink_and_upload_stores_the_rest_and_names_it(server: ServerProc,
                                                                              tmp_path: Path) -> None:
    """A 4xx for a batch is fatal for the sink (issue 10): everything from it on stays in the
    spool; ``gradwatch upload`` then stores what the server takes and reports the refused batch."""
    run = new_run()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        b = make_sink(server.url, run=run, layers=lambda: layers_of(3), spool_dir=tmp_path / "spool",
                      flush_interval=0.05, backoff_base=0.05, backoff_max=0.2)
        for i in range(5):
            b.put(step_record(i, 3))
        assert b.flush(20)
        # a batch the server's schema refuses (422): the websocket is closed with 1007
        b.put(Event(kind="not-a-kind", step=5, time=time.time()))
        assert b.flush(20)
        for i in range(6, 10):
            b.put(step_record(i, 3))  # spooled, not sent: the sink stopped at the refusal
        assert b.flush(20)
        st = b.stats()
        b.close(timeout=10)
    assert st["sent"] == 5 and st["spooled"] == 5, st
    msgs = [str(g.message) for g in got if g.category is TransportWarning]
    assert len(msgs) == 1 and "refused" in msgs[0] and "not-a-kind" in msgs[0]
    assert set(db_counts(server.db, run.run_id)["steps"]) == {(i, 0) for i in range(5)}
    p = run_cli("upload", str(tmp_path / "spool"), "--server", server.url)
    assert p.returncode == 1 and "not-a-kind" in p.stderr and "1 rejected" in p.stdout
    c = db_counts(server.db, run.run_id)
    assert set(c["steps"]) == {(i, 0) for i in (0, 1, 2, 3, 4, 6, 7, 8, 9)}
    assert c["status"] == "finished"
    assert read_batches(tmp_path / "spool")  # the files are kept for inspection


def test_upload_a_spool_of_several_ranks(server: ServerProc, tmp_path: Path) -> None:
    run = new_run()
    spool = tmp_path / "spool"
    sinks: list[Any] = [make_sink("http://127.0.0.1:9", run=run, layers=lambda: layers_of(2), rank=r,
                                  spool_dir=spool, connect_timeout=0.5) for r in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(30):
            for r, s in enumerate(sinks):
                s.put(step_record(i, 2, rank=r))
        for s in sinks:
            s.close(timeout=2)
    assert {p.name.split("-")[0] for p in spool.glob("*.jsonl")} == {"0", "1"}
    p = run_cli("upload", str(spool), "--server", server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_exactly_once(server.db, run.run_id, range(30), 2, ranks=(0, 1), scalars_per_step=0)


def test_next_process_of_the_run_sends_the_spool_left_behind(server: ServerProc, tmp_path: Path) -> None:
    run = new_run()
    spool = tmp_path / "spool"
    a = make_sink("http://127.0.0.1:9", run=run, layers=lambda: layers_of(2), spool_dir=spool, connect_timeout=0.5)
    for i in range(20):
        a.put(step_record(i, 2))
    a.close(timeout=2, status="crashed")
    assert spool.exists()
    # the resumed process (same run, same machine) adopts the spool, sends it first, continues the seqs
    b = make_sink(server.url, run=run, layers=lambda: layers_of(2), spool_dir=spool)
    for i in range(20, 40):
        b.put(step_record(i, 2))
    assert b.flush(20)
    b.close(timeout=20)
    assert b.stats()["sent"] == 40 + 0 and b.stats()["rejected"] == 0
    assert_exactly_once(server.db, run.run_id, range(40), 2, scalars_per_step=0, status="finished")
    assert not spool.exists()


def test_acknowledged_segments_are_deleted_while_streaming(server: ServerProc, tmp_path: Path) -> None:
    run = new_run()
    spool = tmp_path / "spool"
    s = make_sink(server.url, run=run, layers=lambda: layers_of(4), spool_dir=spool, segment_bytes=4000,
                  flush_interval=0.02, batch_max_steps=2)
    most = 0
    for i in range(300):
        s.put(step_record(i, 4))
        if i % 5 == 0:
            time.sleep(0.03)
            most = max(most, len(list(spool.glob("*.jsonl"))) if spool.exists() else 0)
    assert s.flush(30)
    st = s.stats()
    s.close(timeout=20)
    made = len(s.writer.segments)
    assert st["sent"] == 300 and st["batches"] > 100 and made > 30
    assert most <= made // 2, (most, made)  # the live segments, not every one ever written
    assert not spool.exists()
    assert_exactly_once(server.db, run.run_id, range(300), 4, scalars_per_step=0)


def test_upload_of_a_recording_that_lost_records_reports_the_servers_count(server: ServerProc,
                                                                          tmp_path: Path) -> None:
    """The end-of-run record says what the disk refused; after the upload the server's run holds
    that count, and the upload prints it."""
    from .conftest import DiskQuota

    run = new_run()
    spool = tmp_path / "spool"
    with DiskQuota(spool, limit=12_000) as disk:
        sink = make_sink(f"file:{spool / '0-000000000001.jsonl'}", run=run, layers=lambda: layers_of(3),
                         quiet=True, flush_interval=0.02, batch_max_steps=5)
        for i in range(60):
            sink.put(step_record(i, 3))
            if i % 5 == 4:
                assert sink.flush(60)
        assert disk.failures > 0
        disk.limit = 10 << 20  # room again for the end-of-run record
        sink.close()
    lost = sink.stats()["lost"]
    assert lost > 0 and sink.lost_reasons() == {"ENOSPC": lost}
    p = run_cli("upload", str(spool), "--server", server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"status finished; the agent lost {lost} records ({lost} ENOSPC)" in p.stdout, p.stdout
    r = server.get(f"/api/v1/runs/{run.run_id}")
    assert (r["lost_records"], r["lost_reasons"]) == (lost, {"ENOSPC": lost})
    assert len(db_counts(server.db, run.run_id)["steps"]) + lost == 60
