"""Offline recording as a user meets it: one run per file unless --append, the end-of-run line and
``gradwatch upload`` counting in the same unit (batches), and upload's progress bar."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch.agent.wire import decode_batch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def record(gw: Any, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py"), "--out", str(out),
                           "--epochs", "1", *extra], capture_output=True, text=True, timeout=300,
                          env=gw.clean_env(), cwd=out.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_ids(path: Path) -> set[str]:
    return {decode_batch(line).run.run_id for line in path.read_bytes().splitlines() if line.strip()}


def test_one_run_per_file_unless_append_and_upload_counts_the_same_batches(gw: Any, tmp_path: Path) -> None:
    out = tmp_path / "digits.gwrec"
    first = record(gw, out)
    assert "replacing" not in first.stderr and len(run_ids(out)) == 1
    second = record(gw, out)
    assert f"replacing the earlier recording {out}" in second.stderr
    assert len(run_ids(out)) == 1  # the second run replaced the first
    kept = run_ids(out.with_name(out.name + ".prev"))  # the first run, moved aside, not deleted
    assert len(kept) == 1 and not kept & run_ids(out)
    third = record(gw, out, "--append")
    assert "replacing" not in third.stderr
    ids = run_ids(out)
    assert len(ids) == 2

    written = [re.search(r"run ([0-9a-f]{32}) recorded to .* \((\d+) records in (\d+) batches\)", p.stderr)
               for p in (second, third)]
    assert all(written), second.stderr + third.stderr
    per_run = {m.group(1): int(m.group(3)) for m in written if m}
    base = gw.serve(f"sqlite:///{tmp_path / 'gw.db'}")
    up = subprocess.run([sys.executable, "-m", "gradwatch.cli", "upload", str(out), "--server", base],
                        capture_output=True, text=True, timeout=300, env=gw.clean_env(), cwd=tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr
    for rid, batches in per_run.items():
        assert f"run {rid}: {batches} batches," in up.stdout  # the same unit, the same number
    total = sum(per_run.values())
    assert f"uploading [{'#' * 24}] {total}/{total} batches 100%" in up.stderr  # the progress bar
    for rid in per_run:
        assert gw.get_json(f"{base}/api/v1/runs/{rid}")["status"] == "finished"
