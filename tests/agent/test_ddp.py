"""DistributedDataParallel with 2 gloo processes on CPU: the watcher records the all-reduced gradient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("_watch_ddp_worker.py")


def _run(run_ranks: Any, tmp_path: Path, ranks: str, world: int = 2) -> list[dict]:  # type: ignore[type-arg]
    return run_ranks(WORKER, world, [tmp_path / f"rank{r}.json" for r in range(world)], [ranks], timeout=240)


def _check_steps(res: dict) -> None:  # type: ignore[type-arg]
    assert len(res["steps"]) == len(res["expected"]) == 3
    for rec, exp in zip(res["steps"], res["expected"]):
        assert rec["rank"] == res["rank"]
        assert rec["names"] == res["names"]  # DDP's "module." prefix is stripped
        for j, name in enumerate(rec["names"]):
            for k, v in exp[name].items():
                assert rec["layers"][k][j] == pytest.approx(v, rel=1e-4, abs=1e-8), (name, k)


@pytest.mark.slow
def test_ddp_rank_zero_records_the_all_reduced_gradient(tmp_path: Path, run_ranks: Any) -> None:
    r0, r1 = _run(run_ranks, tmp_path, "zero")
    assert r0["run_id"] == r1["run_id"]  # one run, id broadcast from rank 0
    assert r0["recording"] and not r1["recording"] and "steps" not in r1
    assert r0["params_match"] and r1["params_match"]  # ClipNorm ran on both ranks
    assert r0["world_size"] == 2
    _check_steps(r0)
    assert r0["scalar_ranks"] == [0, 0, 0]


@pytest.mark.slow
def test_ddp_all_ranks_record_with_their_rank(tmp_path: Path, run_ranks: Any) -> None:
    r0, r1 = _run(run_ranks, tmp_path, "all")
    assert r0["run_id"] == r1["run_id"]
    for res in (r0, r1):
        assert res["recording"] and res["params_match"]
        _check_steps(res)
        assert res["scalar_ranks"] == [res["rank"]] * 3
    # both ranks saw the same averaged gradient
    assert r0["steps"][1]["layers"]["l2"] == pytest.approx(r1["steps"][1]["layers"]["l2"], rel=1e-6)
