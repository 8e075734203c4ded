"""``gradwatch upload PATH``: send a spool directory or a ``file:PATH`` recording to a server.

Reads JSON lines of encoded batches (a truncated last line left by a killed process is reported
and skipped), asks the server which seqs of each (run, source) it already stored, POSTs the rest
in seq order, and completes the run's status. Ingest is idempotent, so running the command twice
is harmless. After a complete upload of a spool directory its segment files are removed (a
``file:`` recording is the user's file and is kept). Imports only the standard library and the
agent's transport helpers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upload", help="send a spool directory or a file:PATH recording to a server",
        description="Send batches recorded offline (server='file:PATH') or left in a spool directory "
                    "to a gradwatch server, then complete the run. Safe to run again: the server "
                    "stores every batch at most once.")
    p.add_argument("path", metavar="SPOOL_OR_FILE", help="a spool directory or a JSON-lines recording")
    p.add_argument("--server", default=None, metavar="URL",
                   help="server base URL (default: GRADWATCH_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", default=None, help="bearer token (default: GRADWATCH_TOKEN)")
    p.add_argument("--status", default="auto", choices=["auto", "finished", "crashed", "keep"],
                   help="run status to set when the recording has no end-of-run record: auto marks it "
                        "crashed (the writer never closed), keep leaves it as it is (default: auto)")
    p.add_argument("--keep", action="store_true", help="keep the spool files after a complete upload")
    p.add_argument("--retries", type=int, default=5, help="attempts per batch on network errors (default 5)")
    p.set_defaults(func=run)


def _err(msg: str) -> None:
    sys.stderr.write(f"gradwatch upload: {msg}\n")


def run(args: argparse.Namespace) -> int:
    from gradwatch.agent.transport.spool import ReadReport, read_batches, read_notes

    url = args.server or os.environ.get("GRADWATCH_URL") or "http://127.0.0.1:8000"
    token = args.token if args.token is not None else os.environ.get("GRADWATCH_TOKEN")
    report = ReadReport()
    try:
        lines = read_batches(args.path, report)
    except FileNotFoundError as e:
        _err(str(e))
        return 2
    notes = read_notes(args.path)
    for t in report.truncated:
        print(f"note: {t}: truncated last line ({_truncation_cause(t, notes)}); skipped")
    for n in notes:
        lost = n.get("lost") or {}
        if lost:
            why = ", ".join(f"{c} {r}" for r, c in sorted(lost.items()))
            print(f"note: run {n['run_id']} source {n.get('source')}: the agent lost {sum(lost.values())} records "
                  f"it could not spool ({why}{': ' + n['disk_error'] if n.get('disk_error') else ''})")
    args.notes = notes
    for c in report.corrupt:
        print(f"note: {c}; skipped")
    if not lines:
        if not report.files:
            _err(f"nothing to upload in {args.path} (no batch files; already uploaded?)")
        else:
            _err(f"no readable batches in {args.path}")
        return 1
    return _upload(args, url, token, lines, report)


def _truncation_cause(where: str, notes: list[dict[str, Any]]) -> str:
    """Why a spool line is cut short: the agent's own note when it left one (a failed write, with
    its error), else the one cause that leaves no note (the process was killed mid-write)."""
    from pathlib import Path

    name = Path(where.rsplit(":", 1)[0]).name
    for n in notes:
        if n.get("disk_error") and name.startswith(f"{n.get('source')}-") and \
                Path(n["path"]).parent == Path(where.rsplit(":", 1)[0]).parent:
            return f"the agent's write failed: {n['disk_error']}"
    return "the writer was killed mid-write"


def _server_lost(base: str, headers: dict[str, str], run_id: str) -> str:
    """What the server's run says its agents lost (from their end-of-run records), as a suffix."""
    import json
    import urllib.request

    try:
        req = urllib.request.Request(f"{base}/api/v1/runs/{run_id}", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            d = json.loads(resp.read())
    except (OSError, ValueError):
        return ""
    n, why = d.get("lost_records"), d.get("lost_reasons") or {}
    if not isinstance(n, int) or not n:
        return ""
    return f"; the agent lost {n} records ({', '.join(f'{c} {r}' for r, c in sorted(why.items()))})"


def _upload(args: argparse.Namespace, url: str, token: str | None, lines: list[Any], report: Any) -> int:
    import json
    import urllib.error
    import urllib.request
    from pathlib import Path

    from gradwatch.agent.transport.network import (
        _Fatal,
        _Http,
        _Rejected,
        _Transient,
        backoff_delay,
        endpoints,
    )

    try:
        eps = endpoints(url)
    except ValueError as e:
        _err(str(e))
        return 2
    headers = {"User-Agent": "gradwatch-upload"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http = _Http(eps, headers, timeout=60.0, connect_timeout=10.0)

    groups: dict[tuple[str, int], dict[int, Any]] = {}
    for ln in lines:
        groups.setdefault((ln.run_id, ln.source), {}).setdefault(ln.seq, ln)
    runs: dict[str, dict[str, Any]] = {}
    for (run_id, _), by_seq in groups.items():
        r = runs.setdefault(run_id, {"status": None, "batches": 0, "steps": 0, "noted": None})
        for ln in by_seq.values():
            if ln.status:
                r["status"] = ln.status
    for n in getattr(args, "notes", []):
        # the end-of-run record may have been lost with a full disk; the agent's note still says
        # how the run ended, so a finished run is not marked crashed
        if n["run_id"] in runs and n.get("status") in ("finished", "crashed"):
            runs[n["run_id"]]["noted"] = n["status"]
    totals = {"batches": 0, "rows": 0, "stored_before": 0, "duplicates": 0, "rejected": 0}
    rejected_msgs: list[str] = []

    def call(fn: Any, *a: Any) -> Any:
        for attempt in range(max(1, args.retries)):
            try:
                return fn(*a)
            except _Transient as e:
                if attempt + 1 >= max(1, args.retries):
                    raise
                _err(f"{e}; retrying")
                time.sleep(backoff_delay(attempt, 0.5, 5.0))
        return None

    from .progress import Progress

    t0 = time.monotonic()
    bar = Progress(sum(len(g) for g in groups.values()), "uploading", unit="batches")
    try:
        for (run_id, source), by_seq in groups.items():
            acked = call(http.hello, run_id, source)
            for seq in sorted(by_seq):
                ln = by_seq[seq]
                totals["batches"] += 1
                bar.update(totals["batches"])
                runs[run_id]["batches"] += 1
                runs[run_id]["steps"] += ln.steps
                if seq <= acked:
                    totals["stored_before"] += 1
                    continue
                try:
                    res = call(http.send, seq, ln.raw)
                except _Rejected as e:
                    totals["rejected"] += 1
                    rejected_msgs.append(f"{ln.path}:{ln.line} (run {run_id} source {source} seq {seq}): "
                                         f"HTTP {e.status}: {e}")
                    continue
                totals["rows"] += int(res.get("rows") or 0)
                if res.get("duplicate"):
                    totals["duplicates"] += 1
    except _Fatal as e:
        _err(f"the server at {url} refused the upload: {e}")
        return 1
    except _Transient as e:
        _err(f"cannot reach the server at {url} ({e}); nothing is lost: run the same command again")
        return 1
    finally:
        bar.close()

    # complete the runs whose recording has no end-of-run record
    status_notes = []
    for run_id, r in runs.items():
        st = r["status"]
        if st is None and args.status != "keep":
            st = (r["noted"] or "crashed") if args.status == "auto" else args.status
            req = urllib.request.Request(f"{eps['base']}/api/v1/runs/{run_id}", method="PATCH",
                                         data=json.dumps({"status": st}).encode(),
                                         headers={**headers, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                how = "as the agent's note says" if r["noted"] and args.status == "auto" else "marked"
                status_notes.append(f"run {run_id}: no end-of-run record, {how} {st}")
            except (urllib.error.URLError, OSError) as e:
                _err(f"could not set the status of run {run_id}: {e}")
                return 1
        r["final"] = st or "unchanged"

    dt = time.monotonic() - t0
    for run_id, r in runs.items():
        print(f"run {run_id}: {r['batches']} batches, {r['steps']} steps; status {r['final']}"
              f"{_server_lost(eps['base'], headers, run_id)}")
    for n in status_notes:
        print(n)
    print(f"uploaded to {eps['base']} in {dt:.1f} s: {totals['batches']} batches, {totals['rows']} rows stored, "
          f"{totals['stored_before']} already stored, {totals['duplicates']} duplicates, "
          f"{totals['rejected']} rejected")
    if rejected_msgs:
        for m in rejected_msgs[:20]:
            _err(f"rejected: {m}")
        _err(f"{totals['rejected']} batches were rejected by the server; the files are kept")
        return 1
    p = Path(args.path)
    if p.is_dir() and not args.keep:
        for f in report.files:
            try:
                Path(f).unlink()
            except OSError:
                pass
        for f in [*p.glob("*.last"), *p.glob("*/*.last"), *p.glob("*.note.json"), *p.glob("*/*.note.json")]:
            try:
                f.unlink()
            except OSError:
                pass
        for d in sorted({Path(f).parent for f in report.files}, key=lambda x: -len(str(x))):
            try:
                d.rmdir()
            except OSError:
                pass
        print(f"removed the uploaded spool files from {p}")
    return 0
