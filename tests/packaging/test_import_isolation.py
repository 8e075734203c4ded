"""The one-way import rules of STYLE.md §4.3, checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SERVER_DEPS = ("fastapi", "starlette", "sqlalchemy", "alembic", "pydantic_settings", "uvicorn", "dash", "httpx")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_agent_package_import_loads_neither_torch_nor_server_deps() -> None:
    mods = _modules_after("import gradwatch.agent, gradwatch.agent.wire")
    assert "torch" not in mods
    assert not [m for m in SERVER_DEPS if m in mods]


@pytest.mark.parametrize("name", ["watch", "GradScaler", "ClipNorm", "AutoscaledNorm", "ZClip"])
def test_agent_public_api_loads_no_server_deps(name: str) -> None:
    mods = _modules_after(f"from gradwatch.agent import {name}")
    assert "torch" in mods  # sanity: the name really was resolved
    leaked = [m for m in SERVER_DEPS if m in mods]
    assert not leaked, f"`from gradwatch.agent import {name}` imported {leaked}"


def test_server_app_never_imports_torch() -> None:
    mods = _modules_after("import gradwatch.server.app")
    assert "fastapi" in mods
    assert "torch" not in mods


def test_cli_help_is_light() -> None:
    mods = _modules_after("from gradwatch.cli import build_parser; build_parser()")
    assert "torch" not in mods
    assert "fastapi" not in mods and "sqlalchemy" not in mods


def test_unknown_public_name_raises_attribute_error() -> None:
    import gradwatch.agent as agent

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        agent.nope  # noqa: B018


def test_no_source_imports_a_bare_folder_name() -> None:
    """`agent`, `server`... import under their bare names from the repo root, which would work in
    development and break in the wheel; every import must go through `gradwatch.*` or be relative."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bare = re.compile(r"^\s*(from|import)\s+(agent|server|dashboard|migrations|cli)(\.|\s|$)", re.M)
    offenders = []
    for folder in ("agent", "server", "dashboard", "migrations", "cli", "tests", "bench", "examples"):
        for f in (root / folder).rglob("*.py"):
            if bare.search(f.read_text(encoding="utf-8")):
                offenders.append(str(f.relative_to(root)))
    assert not offenders, f"bare-folder imports: {offenders}"
