"""Faults seen through the user's API (issue 13 point 1): ``watch()`` on a real model against a
real ``gradwatch serve``, with a spool directory that cannot be written (read-only mount, no
permission). The run degrades to memory, keeps sending, and ``Watcher.stats()``, the end-of-run
line and the server's run all account for every record."""

from __future__ import annotations

import errno
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent import watch
from gradwatch.agent.transport.buffered import TransportWarning

from .conftest import ReadOnlySpool, assert_exactly_once, db_counts, summary_line, wait_for
from .train import N_LAYERS, build, train


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES], ids=["EROFS", "EACCES"])
def test_unwritable_spool_degrades_to_memory_and_delivers_everything(server_factory: Any, tmp_path: Path,
                                                                     err: int) -> None:
    srv = server_factory().start()
    spool = tmp_path / "spool"
    spool.mkdir()
    model, opt = build()
    with ReadOnlySpool(spool, err) as ro, warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        w = watch(model, opt, server=srv.url, transport={"spool_dir": str(spool), "flush_interval": 0.02,
                                                         "batch_max_steps": 10, "close_timeout": 60})
        train(model, opt, w, 60)
        assert w.flush(60)
        mid = w.stats()
        w.close()
    st = w.stats()
    assert ro.failures > 0  # the disk was tried and refused
    msgs = [str(g.message) for g in got if g.category is TransportWarning]
    assert any(errno.errorcode[err] in m and "holding" in m for m in msgs), msgs
    assert mid["lost"] == 0 and mid["dropped"] == 0 and mid["spooled"] == 0  # nothing waits, nothing lost
    c = assert_exactly_once(srv.db, w.run_id, range(60), N_LAYERS)
    stored = len(c["steps"]) + sum(c["scalars"].values()) + c["events"]
    assert (st["sent"], st["lost"], st["spooled"], st["dropped"], st["rejected"]) == (stored, 0, 0, 0, 0)
    r = srv.get(f"/api/v1/runs/{w.run_id}")
    assert (r["lost_records"], r["lost_reasons"], r["status"]) == (0, {}, "finished")
    assert not list(spool.glob("*.jsonl"))


@pytest.mark.filterwarnings("ignore::gradwatch.agent.transport.buffered.TransportWarning")
def test_unwritable_spool_with_the_server_down_then_up_counts_every_record(server_factory: Any, tmp_path: Path,
                                                                          capsys: Any) -> None:
    """Memory holds a bounded tail while neither disk nor server takes the data: the oldest held
    records are lost with the disk's reason; the counters, the printed line and the server's run
    all give the same count, and stored + lost is everything the run recorded."""
    srv = server_factory()  # not started yet
    spool = tmp_path / "spool"
    spool.mkdir()
    model, opt = build()
    with ReadOnlySpool(spool, errno.EACCES) as ro:
        w = watch(model, opt, server=srv.url, transport={
            "spool_dir": str(spool), "flush_interval": 0.02, "batch_max_steps": 10, "connect_timeout": 0.5,
            "backoff_base": 0.05, "backoff_max": 0.3, "memory_bytes": 40_000, "close_timeout": 120})
        train(model, opt, w, 100, on_step=lambda i: w.flush(60) if i % 10 == 9 else None)
        down = w.stats()
        assert ro.failures > 0 and down["lost"] > 0 and down["connected"] == 0
        srv.start()
        wait_for(lambda: w.stats()["connected"] == 1 and not w.stats()["batches_unsent"])
        train(model, opt, w, 50)
        w.close()
    st = w.stats()
    summary = summary_line(capsys.readouterr().err)
    c = db_counts(srv.db, w.run_id)
    assert all(n == 1 for n in c["steps"].values())
    assert {s for s, _ in c["steps"]} >= set(range(100, 150))  # after the recovery nothing is lost
    stored = len(c["steps"]) + sum(c["scalars"].values()) + c["events"]
    assert c["events"] == 0  # (so 2 records a step: the step's statistics and its logged loss)
    assert stored + st["lost"] == 2 * 150  # every record delivered or counted lost
    assert st["lost"] == down["lost"] and st["spooled"] == 0 and st["dropped"] == 0 and st["sent"] == stored
    printed = int(re.search(r"; (\d+) records lost because the spool could not be written \((\d+) EACCES",  # type: ignore[union-attr]
                            summary).group(1))
    r = srv.get(f"/api/v1/runs/{w.run_id}")
    assert printed == st["lost"] == r["lost_records"] and r["lost_reasons"] == {"EACCES": printed}
    assert f"{stored} records delivered" in summary and c["status"] == r["status"] == "finished"
