"""docker-compose.yml and the Dockerfile: their structure, then each service's command run natively.

No Docker engine runs on these machines, so the files are parsed and what they would run is run
here: the server image's command (migrations, then serve) and both healthchecks, with the
environment the compose file gives the server, pointed at the local PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` substitution."""
    def sub(m: re.Match[str]) -> str:
        return env.get(m.group(1)) or (m.group(3) or "")
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extras_closure(names: list[str]) -> list[str]:
    """Every requirement the named extras pull in, self-references expanded."""
    extras = pyproject()["project"]["optional-dependencies"]
    reqs: list[str] = []
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for r in extras[name]:
            m = re.fullmatch(r"gradwatch\[([\w,]+)\]", r)
            if m:
                todo.extend(m.group(1).split(","))
            else:
                reqs.append(r)
    return reqs


def test_compose_file_structure() -> None:
    c = compose()
    db, server = c["services"]["db"], c["services"]["server"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    vol, _, mount = db["volumes"][0].partition(":")
    assert mount == "/var/lib/postgresql/data" and vol in c["volumes"]  # a named volume, not a host path
    assert server["build"] == "."
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    assert "command" not in server and "entrypoint" not in server  # the image's own command
    env = {k: interpolate(str(v), {}) for k, v in server["environment"].items()}
    assert set(env) <= {"GRADWATCH_DATABASE_URL", "GRADWATCH_TOKEN", "GRADWATCH_READ_TOKEN"}
    assert env["GRADWATCH_DATABASE_URL"] == "postgresql+psycopg://gradwatch:gradwatch@db:5432/gradwatch"
    assert db["environment"]["POSTGRES_USER"] == "gradwatch" and db["environment"]["POSTGRES_DB"] == "gradwatch"
    assert server["ports"] == ["127.0.0.1:8000:8000"]


def test_dockerfile_structure() -> None:
    ins = dockerfile()
    words = [w for w, _ in ins]
    assert words[0] == "FROM" and ins[0][1].startswith("python:3.1")
    install = next(a for w, a in ins if w == "RUN" and "pip install" in a)
    extras = re.search(r'"\.\[([\w,]+)\]"', install)
    assert extras, install
    reqs = extras_closure(extras.group(1).split(","))
    assert "torch" not in install and not any(r.startswith("torch") for r in reqs)
    assert {"fastapi", "psycopg", "dash", "alembic"} <= {re.split(r"[<>=\[]", r)[0] for r in reqs}
    copied = {a.split()[0] for w, a in ins if w == "COPY"}
    package_dirs = set(pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= copied and {"pyproject.toml", "README.md"} <= set(" ".join(
        a for w, a in ins if w == "COPY").split())
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0")
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    assert "/healthz" in health
    cmd = next(a for w, a in ins if w == "CMD")
    assert cmd.index("gradwatch db upgrade") < cmd.index("gradwatch serve")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for w, a in dockerfile():
        if w == "ENV":
            for part in shlex.split(a):
                k, _, v = part.partition("=")
                env[k] = v
    return env


@pytest.mark.slow
def test_services_commands_run_natively_against_local_postgresql(gw: Any, pg_database: str, tmp_path: Path) -> None:
    server = compose()["services"]["server"]
    env = gw.clean_env(**_image_env())
    env.update({k: interpolate(str(v), {}) for k, v in server["environment"].items()})
    # the compose file's URL with the service name and credentials of the local test PostgreSQL
    assert env["GRADWATCH_DATABASE_URL"].startswith("postgresql+psycopg://gradwatch:gradwatch@db:5432/")
    env["GRADWATCH_DATABASE_URL"] = pg_database
    env["GRADWATCH_HOST"], env["GRADWATCH_PORT"] = "127.0.0.1", str(gw.free_port())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # gradwatch of this venv
    ins = dict(dockerfile())
    health = ins["HEALTHCHECK"].split(" CMD ", 1)[1]
    db_health = compose()["services"]["db"]["healthcheck"]["test"]
    assert db_health[0] == "CMD-SHELL"
    assert subprocess.run(["sh", "-c", db_health[1]], timeout=30).returncode == 0  # local PostgreSQL is ready

    argv = json.loads(ins["CMD"])  # exec form
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{env['GRADWATCH_PORT']}"
        gw.wait_healthy(base, proc, log)
        assert subprocess.run(["sh", "-c", health], env=env, timeout=30).returncode == 0
        text = log.read_text()
        assert "is at revision head" in text and f"dashboard {base}/" in text
        assert gw.get_json(f"{base}/api/v1/runs")["count"] == 0
        with psycopg.connect(pg_database.replace("postgresql+psycopg", "postgresql")) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone()
    finally:
        gw.stop_proc(proc)
    assert subprocess.run(["sh", "-c", health], env=env, timeout=30).returncode != 0  # the healthcheck can fail
