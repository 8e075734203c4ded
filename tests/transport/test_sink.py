"""Unit tests of the buffered sinks: batching, spool format, truncation, backoff, warn-once,
non-blocking put under a wedged writer, bounded close. No server needed (or a closed port)."""

from __future__ import annotations

import json
import math
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest

from gradwatch.agent.transport import make_sink
from gradwatch.agent.transport.buffered import TransportWarning, WarnOnce
from gradwatch.agent.transport.file import FileSink
from gradwatch.agent.transport.network import backoff_delay, classify_http_error, endpoints
from gradwatch.agent.transport.spool import ReadReport, read_batches
from gradwatch.agent.wire import decode_batch

from .conftest import event, free_port, layers_of, new_run, scalar_record, step_record


class Wedge:
    """A Pending whose device copy never completes until released (a stuck sender thread)."""

    def __init__(self, gate: threading.Event, step: int = 0) -> None:
        self.gate, self.step = gate, step

    def resolve(self):  # noqa: ANN201
        self.gate.wait()
        return [step_record(self.step, 2)]


def _batches(path: Path) -> list:
    return [decode_batch(ln.raw) for ln in read_batches(path)]


def test_batches_by_size(tmp_path: Path) -> None:
    run = new_run()
    sink = make_sink(f"file:{tmp_path / 'r.jsonl'}", run=run, layers=lambda: layers_of(3),
                     flush_interval=30.0, batch_max_steps=10, quiet=True)
    for i in range(35):
        sink.put(step_record(i, 3))
    assert sink.flush(10)
    sink.close()
    bs = _batches(tmp_path / "r.jsonl")
    data = [b for b in bs if b.steps]
    assert [s.step for b in data for s in b.steps] == list(range(35))
    assert all(len(b.steps) <= 10 for b in data)
    assert len(data) >= 4
    assert [b.seq for b in bs] == list(range(1, len(bs) + 1))
    assert bs[-1].status == "finished" and not bs[-1].steps
    assert all(b.layers == layers_of(3) for b in bs)  # every batch carries the layer table


def test_batches_by_time_without_flush(tmp_path: Path) -> None:
    sink = make_sink(f"file:{tmp_path / 'r.jsonl'}", run=new_run(), layers=lambda: layers_of(2),
                     flush_interval=0.1, batch_max_steps=1000, quiet=True)
    try:
        for i in range(3):
            sink.put(step_record(i, 2))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (tmp_path / "r.jsonl").exists():
            time.sleep(0.02)
        time.sleep(0.3)
        bs = _batches(tmp_path / "r.jsonl")
        assert [s.step for b in bs for s in b.steps] == [0, 1, 2]
        assert len(bs) == 1
    finally:
        sink.close()


def test_spool_round_trip_keeps_records_and_non_finite(tmp_path: Path) -> None:
    run = new_run()
    sink = make_sink(f"file:{tmp_path / 'r.jsonl'}", run=run, layers=lambda: layers_of(4), quiet=True)
    recs = []
    for i in range(20):
        recs.append(step_record(i, 4, nan=(i == 7)))
        sink.put(recs[-1])
        sink.put(scalar_record(i))
    sink.put(event(7))
    sink.close(status="crashed")
    bs = _batches(tmp_path / "r.jsonl")
    steps = [s for b in bs for s in b.steps]
    assert len(steps) == 20
    for a, b in zip(recs, steps):
        assert a.step == b.step and a.layer_ids == b.layer_ids and a.total_norm == b.total_norm
        for k, col in a.layers.items():
            for x, y in zip(col, b.layers[k]):
                assert (x is None and y is None) or x == y or (math.isnan(x) and math.isnan(y))
    assert math.isnan(steps[7].layers["l2"][0])
    evs = [e for b in bs for e in b.events]
    assert evs[0].data["l2"] == math.inf
    assert sum(len(b.scalars) for b in bs) == 20
    assert bs[-1].status == "crashed"
    assert {b.run.run_id for b in bs} == {run.run_id}


def test_truncated_last_line_is_reported_and_the_writer_resumes(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    run = new_run()
    s1 = FileSink(path, run, lambda: layers_of(2), quiet=True).start()
    for i in range(5):
        s1.put(step_record(i, 2))
    s1.close()
    n1 = len(_batches(path))
    good = path.read_bytes()
    # a writer killed mid-line
    path.write_bytes(good + good.splitlines()[0][:57])
    report = ReadReport()
    lines = read_batches(path, report)
    assert len(lines) == n1 and len(report.truncated) == 1 and not report.corrupt
    # the same run appends after the damage: new line, seqs continue
    s2 = FileSink(path, run, lambda: layers_of(2), quiet=True).start()
    for i in range(5, 8):
        s2.put(step_record(i, 2))
    s2.close()
    report = ReadReport()
    bs = [decode_batch(ln.raw) for ln in read_batches(path, report)]
    assert len(report.corrupt) == 1  # the damaged line, now in the middle, is skipped
    seqs = [b.seq for b in bs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [s.step for b in bs for s in b.steps] == list(range(8))


def _record(path: Path, run, steps: range, **options) -> None:  # noqa: ANN001
    sink = FileSink(path, run, lambda: layers_of(2), quiet=True, **options).start()
    for i in steps:
        sink.put(step_record(i, 2))
    sink.close()


def _run_ids(path: Path) -> list[str]:
    return [decode_batch(ln.raw).run.run_id for ln in read_batches(path)]


def test_a_file_holds_one_run_an_earlier_recording_is_kept_aside(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "r.gwrec"
    first, second, third = new_run(), new_run(), new_run()
    _record(path, first, range(3))
    assert "replacing" not in capsys.readouterr().err
    _record(path, first, range(3, 6))  # the same run resumed: continues in its file, nothing moved
    assert "replacing" not in capsys.readouterr().err and not (tmp_path / "r.gwrec.prev").exists()
    assert set(_run_ids(path)) == {first.run_id}
    _record(path, second, range(4))
    err = capsys.readouterr().err
    assert f"replacing the earlier recording {path} (run {first.run_id}), kept as {path}.prev" in err
    assert set(_run_ids(path)) == {second.run_id}
    kept = [decode_batch(ln.raw) for ln in read_batches(tmp_path / "r.gwrec.prev")]
    assert {b.run.run_id for b in kept} == {first.run_id}
    assert [s.step for b in kept for s in b.steps] == list(range(6))  # nothing of the first run lost
    _record(path, third, range(2), append=True)  # asked to append: both runs in one file
    assert "replacing" not in capsys.readouterr().err
    assert set(_run_ids(path)) == {second.run_id, third.run_id}


def test_other_ranks_add_to_the_file_rank_0_writes(tmp_path: Path) -> None:
    path = tmp_path / "r.gwrec"
    old, run = new_run(), new_run()
    _record(path, old, range(2))
    _record(path, run, range(2), rank=1)  # a non-zero rank never moves the file aside
    assert set(_run_ids(path)) == {old.run_id, run.run_id}
    assert not (tmp_path / "r.gwrec.prev").exists()


def test_run_id_in_the_path_makes_one_file_per_run(tmp_path: Path) -> None:
    runs = [new_run(), new_run()]
    for run in runs:
        sink = make_sink(f"file:{tmp_path}/{{run_id}}.gwrec", run=run, layers=lambda: layers_of(2), quiet=True)
        sink.put(step_record(0, 2))
        sink.close()
    for run in runs:
        assert _run_ids(tmp_path / f"{run.run_id}.gwrec") and set(_run_ids(tmp_path / f"{run.run_id}.gwrec")) == {run.run_id}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{r.run_id}.gwrec" for r in runs)


def test_append_is_a_file_option_a_network_target_accepts_and_ignores(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransportWarning)  # nothing listens there: not the point here
        sink = make_sink(f"http://127.0.0.1:{free_port()}", run=new_run(), layers=lambda: layers_of(1),
                         spool_dir=str(tmp_path / "spool"), append=True, close_timeout=0.2)
        sink.close()
    assert sink.stats()["dropped"] == 0


def test_backoff_is_exponential_capped_and_jittered() -> None:
    hi = [backoff_delay(i, base=0.5, cap=10.0, rand=1.0) for i in range(10)]
    assert hi[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert hi[5:] == [10.0] * 5
    assert backoff_delay(3, base=0.5, cap=10.0, rand=0.0) == 2.0  # jitter: upper half
    assert backoff_delay(10_000, base=0.5, cap=10.0) <= 10.0
    ds = {backoff_delay(4, 0.5, 10.0) for _ in range(20)}
    assert len(ds) > 1 and all(4.0 <= d <= 8.0 for d in ds)


def test_endpoints_and_error_classes() -> None:
    e = endpoints("https://gw.example.com:8443/prefix/")
    assert e["ws"] == "wss://gw.example.com:8443/prefix/api/v1/ingest/ws"
    assert e["ingest"] == "https://gw.example.com:8443/prefix/api/v1/ingest"
    with pytest.raises(ValueError):
        endpoints("gw.example.com")
    assert type(classify_http_error(401, "no")).__name__ == "_Fatal"
    assert type(classify_http_error(422, "batch.wire_version: this server speaks 1")).__name__ == "_Fatal"
    assert type(classify_http_error(422, "batch.steps[0].step: missing")).__name__ == "_Rejected"
    assert type(classify_http_error(409, "conflict")).__name__ == "_Rejected"
    assert type(classify_http_error(503, "storage")).__name__ == "_Transient"


def test_warn_once_per_kind() -> None:
    w = WarnOnce()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(100):
            w("unreachable", "server away")
        w("auth", "bad token")
    assert [str(g.message) for g in got] == ["server away", "bad token"]
    assert all(g.category is TransportWarning for g in got)


def test_unreachable_server_warns_once_and_spools_everything(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    run = new_run()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sink = make_sink(f"http://127.0.0.1:{port}", run=run, layers=lambda: layers_of(3),
                         spool_dir=tmp_path / "spool", backoff_max=0.2, backoff_base=0.05, connect_timeout=1,
                         flush_interval=0.05)
        for i in range(200):
            sink.put(step_record(i, 3))
            time.sleep(0.005)
        assert sink.flush(5)
        st = sink.stats()
        sink.close(timeout=2)
    msgs = [str(g.message) for g in got if g.category is TransportWarning]
    assert len(msgs) == 1 and "cannot reach" in msgs[0], msgs
    assert st["sent"] == 0 and st["spooled"] == 200 and st["dropped"] == 0
    steps = [s.step for ln in read_batches(tmp_path / "spool") for s in decode_batch(ln.raw).steps]
    assert steps == list(range(200))


def test_put_never_blocks_and_memory_stays_bounded_while_the_writer_is_wedged(tmp_path: Path) -> None:
    gate = threading.Event()
    sink = make_sink(f"file:{tmp_path / 'r.jsonl'}", run=new_run(), layers=lambda: layers_of(2),
                     buffer_max=1000, flush_interval=0.01, quiet=True)
    sink.put(Wedge(gate))  # the drainer takes it and blocks in resolve()
    time.sleep(0.2)
    rec = step_record(1, 2)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        tracemalloc.start()
        for _ in range(100_000):  # a put that waited for the wedged drainer would never return
            sink.put(rec)
        assert not gate.is_set()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    st = sink.stats()
    assert st["dropped"] == 100_000 - 1000  # oldest dropped, counted
    assert st["pending"] <= 1000 + 1
    assert peak < 2_000_000, peak  # bounded: no growth with the number of puts
    assert sum(1 for g in got if g.category is TransportWarning) == 1
    gate.set()
    sink.close(timeout=5)
    assert len([s for ln in read_batches(tmp_path / "r.jsonl") for s in decode_batch(ln.raw).steps]) == 1001


def test_close_respects_its_timeout_when_the_writer_is_wedged(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    gate = threading.Event()
    sink = make_sink(f"file:{tmp_path / 'r.jsonl'}", run=new_run(), layers=lambda: layers_of(2),
                     flush_interval=0.01)
    sink.put(Wedge(gate))
    time.sleep(0.1)
    for i in range(10):
        sink.put(step_record(i, 2))
    assert sink.flush(0.3) is False
    t0 = time.monotonic()
    sink.close(timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + 3  # bounded by its timeout (wide margin: shared machines)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gradwatch upload" in err and "could not be written" in err
    sink.close()  # idempotent
    sink.put(step_record(99, 2))  # after close: ignored, counted, never raises
    gate.set()


@pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")
def test_network_close_timeout_with_unreachable_server(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    sink = make_sink(f"http://127.0.0.1:{free_port()}", run=new_run(), layers=lambda: layers_of(2),
                     spool_dir=tmp_path / "spool", connect_timeout=0.5, close_timeout=3)
    for i in range(10):
        sink.put(step_record(i, 2))
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink.close()
    assert time.monotonic() - t0 < 3 + 3  # bounded by its timeout (wide margin: shared machines)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "10 records" in err[0] and f"gradwatch upload {tmp_path / 'spool'}" in err[0]
    lines = read_batches(tmp_path / "spool")
    assert lines[-1].status == "finished"


def test_unknown_option_and_bad_target() -> None:
    with pytest.raises(TypeError):
        make_sink("file:/tmp/x.jsonl", run=new_run(), layers=list, bogus=1)
    with pytest.raises(ValueError):
        make_sink("ftp://x", run=new_run(), layers=list)


def test_file_sink_closed_at_interpreter_exit(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = f"""
from gradwatch.agent.transport import make_sink
from gradwatch.agent.wire import RunInfo, StepRecord
s = make_sink("file:{tmp_path / 'r.jsonl'}", run=RunInfo(run_id="r" * 32), layers=list, flush_interval=5)
for i in range(7):
    s.put(StepRecord(step=i, time=0.0))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "gradwatch upload" in p.stderr
    bs = [json.loads(ln.raw) for ln in read_batches(tmp_path / "r.jsonl")]
    assert sum(len(b["steps"]) for b in bs) == 7 and bs[-1]["status"] == "finished"


def test_network_sink_never_closed_is_closed_at_exit_within_its_timeout(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = f"""
import time
from gradwatch.agent.transport import make_sink
from gradwatch.agent.wire import RunInfo, StepRecord
s = make_sink("http://127.0.0.1:{free_port()}", run=RunInfo(run_id="e" * 32), layers=list,
              spool_dir="{tmp_path / 'spool'}", connect_timeout=0.5, close_timeout=3)
for i in range(9):
    s.put(StepRecord(step=i, time=0.0))
"""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 30
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("gradwatch:")]
    assert len(lines) == 1 and "9 records" in lines[0] and "gradwatch upload" in lines[0], p.stderr
    bs = read_batches(tmp_path / "spool")
    assert sum(ln.steps for ln in bs) == 9 and bs[-1].status == "finished"
