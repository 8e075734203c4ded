"""``gradwatch db upgrade``: bring the database to the latest migration."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("db", help="database maintenance")
    sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = sub.add_parser("upgrade", help="run the migrations up to the latest revision")
    up.add_argument("--db", default=None, metavar="URL",
                    help="database URL (default: GRADWATCH_DATABASE_URL or sqlite:///./gradwatch.db)")
    up.add_argument("--revision", default="head", help="target revision (default head)")
    up.set_defaults(func=upgrade)


def upgrade(args: argparse.Namespace) -> int:
    from gradwatch.server.db.engine import make_engine
    from gradwatch.server.db.migrate import upgrade_to_head
    from gradwatch.server.settings import ServerSettings

    settings = ServerSettings(database_url=args.db) if args.db else ServerSettings()
    engine = make_engine(settings.database_url)
    try:
        upgrade_to_head(engine, args.revision)
    finally:
        engine.dispose()
    print(f"database {engine.url.render_as_string(hide_password=True)} is at revision {args.revision}")
    return 0
