"""The example job (`make run`): trains, prints progress, and leaves a decodable record file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.agent.wire import decode_batch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_digits_one_epoch_writes_decodable_batches(tmp_path: Path) -> None:
    out = tmp_path / "digits.gwrec"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GRADWATCH_DISABLED", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--out", str(out), "--epochs", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch 1/1" in proc.stdout and "final test accuracy" in proc.stdout
    assert str(out) in proc.stdout
    acc = float(proc.stdout.split("final test accuracy ")[1].split(";")[0])
    assert acc > 0.7  # one epoch of a small CNN on digits is already far above chance (0.1)

    batches = [decode_batch(line) for line in out.read_bytes().splitlines() if line.strip()]
    assert batches
    run_ids = {b.run.run_id for b in batches}
    assert len(run_ids) == 1 and run_ids.pop() in proc.stdout
    steps = sorted(s.step for b in batches for s in b.steps)
    assert steps == list(range(len(steps))) and len(steps) == 45  # 1437 images / batch 32
    assert all(s.total_norm_post is not None and s.total_norm_post <= 1.0 + 1e-5 for b in batches for s in b.steps)
    names = {la.name for b in batches for la in b.layers}
    assert "conv1.weight" in names and "fc.bias" in names
    scalars = [s for b in batches for s in b.scalars]
    assert {"loss", "accuracy", "lr"} <= set().union(*(s.values for s in scalars))
    assert any("test_accuracy" in s.values for s in scalars)
    assert batches[-1].status == "finished" and batches[0].run.project == "examples"
