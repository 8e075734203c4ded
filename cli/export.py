"""``gradwatch export RUN_ID``: download one table of a run as CSV or Parquet, with a progress bar.

A thin client of ``GET /api/v1/runs/{id}/export`` (the server streams; so does this command, to
a file, never holding the table in memory). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

_TABLES = ("layer_stats", "steps", "events", "scalars")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="download a run's table as CSV or Parquet")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--format", default="csv", choices=["csv", "parquet"], help="file format (default csv)")
    p.add_argument("--table", default="layer_stats", choices=_TABLES, help="which table (default layer_stats)")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="output file (default RUN_ID-TABLE.FORMAT in the current directory)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="server base URL (default: GRADWATCH_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", default=None, help="bearer token (default: GRADWATCH_TOKEN)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .progress import Progress

    base = (args.server or os.environ.get("GRADWATCH_URL") or "http://127.0.0.1:8000").rstrip("/")
    token = args.token if args.token is not None else os.environ.get("GRADWATCH_TOKEN")
    out = Path(args.output or f"{args.run_id}-{args.table}.{args.format}")
    query = urllib.parse.urlencode({"format": args.format, "table": args.table})
    url = f"{base}/api/v1/runs/{urllib.parse.quote(args.run_id, safe='')}/export?{query}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    part = out.with_name(out.name + ".part")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp, open(part, "wb") as f, \
                Progress(None, "exporting", unit="KiB") as bar:
            size = 0
            while chunk := resp.read(1 << 16):
                f.write(chunk)
                size += len(chunk)
                bar.update(size // 1024)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        sys.stderr.write(f"gradwatch export: the server answered {e.code}: {detail}\n")
        part.unlink(missing_ok=True)
        return 1
    except OSError as e:
        sys.stderr.write(f"gradwatch export: cannot read {url}: {e}\n")
        part.unlink(missing_ok=True)
        return 1
    part.replace(out)
    print(f"wrote {out} ({size:,} bytes)")
    return 0
