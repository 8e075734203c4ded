"""``gradwatch serve`` says where it serves (and nothing of Alembic's); ``gradwatch export`` downloads
a run's table with a progress bar and says what is wrong when it cannot."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

GW = [sys.executable, "-m", "gradwatch.cli"]


def test_serve_prints_its_urls_and_no_alembic_chatter(gw: Any, tmp_path: Path) -> None:
    port = gw.free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(GW + ["serve", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'gw.db'}"],
                                stdout=out, stderr=subprocess.STDOUT, env=gw.clean_env())
    try:
        gw.wait_healthy(f"http://127.0.0.1:{port}", proc, log)
    finally:
        gw.stop_proc(proc)
    text = log.read_text()
    assert f"dashboard http://127.0.0.1:{port}/  API docs http://127.0.0.1:{port}/docs" in text
    assert "alembic" not in text.lower(), text


def test_export_downloads_a_table_with_a_progress_line(gw: Any, tmp_path: Path) -> None:
    base = gw.serve(f"sqlite:///{tmp_path / 'gw.db'}")
    demo = subprocess.run(GW + ["demo", "--steps", "10", "--no-serve"], capture_output=True, text=True,
                          timeout=300, env=gw.clean_env(GRADWATCH_URL=base), cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    run_id = re.search(r"run ([0-9a-f]{32}) finished", demo.stdout).group(1)  # type: ignore[union-attr]
    exp = subprocess.run(GW + ["export", run_id, "--table", "steps", "--server", base], capture_output=True,
                         text=True, timeout=120, env=gw.clean_env(), cwd=tmp_path)
    assert exp.returncode == 0, exp.stderr
    out = tmp_path / f"{run_id}-steps.csv"
    assert f"wrote {out.name}" in exp.stdout and re.search(r"exporting \d+ KiB", exp.stderr)
    rows = list(csv.DictReader(out.open()))
    assert [int(r["step"]) for r in rows] == list(range(10))
    missing = subprocess.run(GW + ["export", "0" * 32, "--server", base], capture_output=True, text=True,
                             timeout=120, env=gw.clean_env(), cwd=tmp_path)
    assert missing.returncode == 1 and "the server answered 404" in missing.stderr
    assert not list(tmp_path.glob("0000*"))  # no partial file left
