"""End-to-end: a real ``gradwatch serve`` subprocess (SQLite in tmp_path), a real training loop
with ``watch()``, and the failure scenarios of issue 5. Exact-once is checked on the server's
database, opened read-only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent import watch
from gradwatch.agent.transport.spool import read_batches
from gradwatch.agent.wire import decode_batch

from .conftest import BlockingIO, DelayRelay, ServerProc, assert_exactly_once, db_counts, free_port, run_cli
from .train import N_LAYERS, build, sink_factory, train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")]

TRAIN = str(Path(__file__).with_name("train.py"))


def _watch(url: str, spool: Path, **opts: Any) -> tuple[Any, Any, Any]:
    model, opt = build()
    w = watch(model, opt, server=url, sink=sink_factory(url, spool_dir=spool, **opts))
    return model, opt, w


def test_live_stream_every_step_exactly_once(server: ServerProc, tmp_path: Path) -> None:
    model, opt, w = _watch(server.url, tmp_path / "spool")
    train(model, opt, w, 120)
    assert w.flush(20), server.state()
    st = w.stats()
    assert st["sent"] == 240 and st["spooled"] == 0 and st["dropped"] == 0 and st["rejected"] == 0
    w.close(timeout=20)
    assert_exactly_once(server.db, w.run_id, range(120), N_LAYERS)
    assert not (tmp_path / "spool").exists()  # delivered: nothing left behind


def test_server_killed_mid_run_and_restarted(server: ServerProc, tmp_path: Path) -> None:
    model, opt, w = _watch(server.url, tmp_path / "spool", backoff_max=0.5)
    restarted = threading.Event()

    def chaos(i: int) -> None:
        if i == 80:
            server.kill()  # SIGKILL mid-run
        if i == 160:
            threading.Thread(target=lambda: (server.start(), restarted.set()), daemon=True).start()

    with BlockingIO() as io:
        train(model, opt, w, 300, sleep=0.005, on_step=chaos)
    assert restarted.wait(60)
    assert w.flush(30), server.state()
    st = w.stats()
    w.close(timeout=30)
    assert st["reconnects"] >= 1 and st["dropped"] == 0 and st["spooled"] == 0, st
    assert_exactly_once(server.db, w.run_id, range(300), N_LAYERS)
    assert io.on(threading.get_ident()) == set()  # no step can wait for the restart: no I/O in the step
    assert io.threads  # (the recorder saw the sender's calls)


def test_flush_after_the_server_is_back_delivers_without_waiting_out_the_backoff(server: ServerProc,
                                                                                  tmp_path: Path) -> None:
    # a backoff far longer than flush's timeout: only an immediate retry by flush can deliver in time
    model, opt, w = _watch(server.url, tmp_path / "spool", backoff_base=60.0, backoff_max=120.0)
    train(model, opt, w, 20)
    assert w.flush(20), server.state()
    server.kill()
    train(model, opt, w, 40)
    assert w.flush(10)  # server down: flush returns once the records are durably spooled
    spooled = w.stats()["spooled"]
    assert spooled > 0
    server.start()
    assert w.flush(20), server.state()
    st = w.stats()
    assert st["reconnects"] >= 1 and st["spooled"] == 0 and st["dropped"] == 0, st
    w.close(timeout=20)
    assert_exactly_once(server.db, w.run_id, range(60), N_LAYERS)


def test_flush_that_sees_the_connection_break_judges_a_fresh_attempt(server: ServerProc, tmp_path: Path) -> None:
    # the client learns of the server's death only after flush has started waiting on a live
    # connection; the sender then waits out a 60 s backoff: flush must have it try again now and
    # return once that attempt fails (the records are spooled), not wait out its own timeout
    relay = DelayRelay(server.port, 0.0, hold=3.0)
    try:
        model, opt, w = _watch(relay.url, tmp_path / "spool", backoff_base=60.0, backoff_max=120.0)
        train(model, opt, w, 20)
        assert w.flush(20), server.state()
        server.kill()
        train(model, opt, w, 20)
        assert w.flush(30)
        assert w.stats()["spooled"] > 0
        server.start()
        assert w.flush(20), server.state()
        w.close(timeout=20)
        assert_exactly_once(server.db, w.run_id, range(40), N_LAYERS)
    finally:
        relay.close()


def test_server_never_comes_up_then_upload(server_factory: Any, tmp_path: Path, capsys: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # baseline: the same loop with an offline file recording (no network at all)
    model, opt, w = _watch(url, tmp_path / "spool", connect_timeout=1.0)
    with BlockingIO() as io:
        train(model, opt, w, 200)
        # on a loaded machine the sender may not have tried to connect yet when the loop ends:
        # wait for its first try (checked below), without the training thread doing anything
        deadline = time.monotonic() + 30
        while not any("connect" in v for v in list(io.threads.values())) and time.monotonic() < deadline:
            time.sleep(0.05)
    st = w.stats()
    t0 = time.monotonic()
    w.close(timeout=5)
    assert time.monotonic() - t0 < 5 + 3  # close honours its timeout (a wide margin: shared machines)
    assert io.on(threading.get_ident()) == set() and "connect" in set().union(*io.threads.values())
    assert st["sent"] == 0 and st["dropped"] == 0
    line = [ln for ln in capsys.readouterr().err.splitlines() if w.run_id in ln and "not delivered" in ln]
    assert len(line) == 1 and "gradwatch upload" in line[0]
    batches = [decode_batch(ln.raw) for ln in read_batches(tmp_path / "spool")]
    assert [s.step for b in batches for s in b.steps] == list(range(200))
    assert batches[-1].status == "finished"
    # the server comes up later on that port: upload completes the run
    srv = server_factory(port=port).start()
    p = run_cli("upload", str(tmp_path / "spool"), "--server", url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 rejected" in p.stdout
    assert_exactly_once(srv.db, w.run_id, range(200), N_LAYERS)
    assert not list((tmp_path / "spool").glob("*.jsonl")) if (tmp_path / "spool").exists() else True
    again = run_cli("upload", str(tmp_path / "spool"), "--server", url)
    assert "Traceback" not in again.stderr  # re-running is harmless (nothing left to send)


def test_training_process_killed(server: ServerProc, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, TRAIN, "--server", server.url, "--steps", "100000", "--print",
                             "--spool-dir", str(spool), "--sleep", "0.002"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().split()[1]
    last = -1
    for line in proc.stdout:
        last = int(line.split()[1])
        if last >= 250:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # everything the server acknowledged is stored, each once
    before = db_counts(server.db, run_id)
    assert before["steps"] and all(n == 1 for n in before["steps"].values())
    # the spool holds the rest; a killed writer may have left a truncated last line
    assert spool.exists()
    p = run_cli("upload", str(spool), "--server", server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    after = db_counts(server.db, run_id)
    got = sorted(s for s, _ in after["steps"])
    assert got == list(range(len(got))), "stored steps must be a contiguous prefix"
    # at most the last flush interval (0.2 s) of steps can die with the process's memory
    assert len(got) >= last + 1 - 100, (len(got), last)
    assert_exactly_once(server.db, run_id, range(len(got)), N_LAYERS, status="crashed")
    # uploading again stores nothing twice
    run_cli("upload", str(spool), "--server", server.url)
    assert db_counts(server.db, run_id)["steps"] == after["steps"]


def test_slow_server_never_makes_a_step_wait(server: ServerProc, tmp_path: Path) -> None:
    relay = DelayRelay(server.port, delay=0.5)  # every client->server chunk waits 0.5 s
    try:
        model, opt, w = _watch(relay.url, tmp_path / "slow")
        backlog = []
        with BlockingIO() as io:
            train(model, opt, w, 200, sleep=0.01, on_step=lambda i: backlog.append(w.stats()["batches_unsent"]))
        t0 = time.monotonic()
        w.close(timeout=2)
        assert time.monotonic() - t0 < 2 + 3  # close honours its timeout (a wide margin: shared machines)
    finally:
        relay.close()
    assert max(backlog) > 1  # the server fell behind: the backlog lived in the spool, not in the step
    assert io.on(threading.get_ident()) == set()  # no step can wait for a server round trip
    st = w.stats()
    assert st["dropped"] == 0
    if (tmp_path / "slow").exists() and list((tmp_path / "slow").glob("*.jsonl")):
        p = run_cli("upload", str(tmp_path / "slow"), "--server", server.url)
        assert p.returncode == 0, p.stdout + p.stderr
    assert_exactly_once(server.db, w.run_id, range(200), N_LAYERS)


def test_ddp_two_gloo_processes_all_ranks_into_one_server(server: ServerProc, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, TRAIN, "--server", server.url, "--steps", "60", "--ranks", "all",
                               "--ddp", str(r), "2", str(port), "--spool-dir", str(tmp_path / "spool")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o + e
    run_ids = {o.splitlines()[0].split()[1] for o, _ in outs}
    assert len(run_ids) == 1
    run_id = run_ids.pop()
    assert_exactly_once(server.db, run_id, range(60), N_LAYERS, ranks=(0, 1))


def test_auth_rejection_warns_once_spools_and_uploads_later(server_factory: Any, tmp_path: Path) -> None:
    srv = server_factory(env={"GRADWATCH_TOKEN": "s3cret"}).start()
    model, opt = build()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        w = watch(model, opt, server=srv.url,
                  sink=sink_factory(srv.url, spool_dir=tmp_path / "spool", token="wrong"))
        train(model, opt, w, 50)
        w.close(timeout=5)
    msgs = [str(g.message) for g in got if "gradwatch" in str(g.message)]
    assert len(msgs) == 1 and "credentials" in msgs[0] and "gradwatch upload" in msgs[0], msgs
    assert w.stats()["sent"] == 0
    p = run_cli("upload", str(tmp_path / "spool"), "--server", srv.url, env={"GRADWATCH_TOKEN": "wrong"})
    assert p.returncode == 1 and "refused" in p.stderr
    p = run_cli("upload", str(tmp_path / "spool"), "--server", srv.url, "--token", "s3cret")
    assert p.returncode == 0, p.stdout + p.stderr
    assert db_counts(srv.db, w.run_id)["status"] == "finished"


def test_resume_same_run_continues_seqs(server: ServerProc, tmp_path: Path) -> None:
    model, opt, w = _watch(server.url, tmp_path / "spool")
    train(model, opt, w, 40)
    state = w.state_dict()
    w.close(timeout=20)
    # a new process resumes the run from its checkpoint: same run, steps continue
    model2, opt2 = build()
    w2 = watch(model2, opt2, server=server.url, sink=sink_factory(server.url, spool_dir=tmp_path / "spool"))
    w2.load_state_dict(state)
    assert w2.run_id == w.run_id
    train(model2, opt2, w2, 30)
    w2.close(timeout=20)
    assert w2.stats()["rejected"] == 0
    assert_exactly_once(server.db, w.run_id, range(70), N_LAYERS)


def test_http_fallback_without_websocket(server: ServerProc, tmp_path: Path) -> None:
    model, opt, w = _watch(server.url, tmp_path / "spool", ws=False)
    train(model, opt, w, 60)
    w.close(timeout=20)
    assert w.stats()["sent"] == 120
    assert_exactly_once(server.db, w.run_id, range(60), N_LAYERS)
