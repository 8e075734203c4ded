"""The `gradwatch` console script.

Each subcommand lives in its own module of this package exposing ``add_parser(subparsers)``,
which registers the parser and sets ``func``. Those modules import nothing heavy at import time
(FastAPI, SQLAlchemy and torch load inside the command), so `gradwatch --help` stays instant and
works with only the agent installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand modules, in help order
_COMMANDS = ("demo", "serve", "db", "upload", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Gradient-dynamics monitoring and control for PyTorch.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"gradwatch {version('gradwatch')}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
