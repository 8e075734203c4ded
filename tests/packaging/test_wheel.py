"""Test the package, not just the code: a built wheel, installed in a clean venv, imports every
module (an editable install hides subpackages missing from `packages`; STYLE.md §4.2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = {"agent": "gradwatch.agent", "server": "gradwatch.server", "dashboard": "gradwatch.dashboard",
               "migrations": "gradwatch.migrations", "cli": "gradwatch.cli"}


def _source_modules() -> set[str]:
    mods = set()
    for folder, pkg in SOURCE_DIRS.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods.add(".".join([pkg, *parts]))
    return mods


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the checkout: an in-tree build writes build/ and *.egg-info into it.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True)
    (whl,) = out.glob("gradwatch-*.whl")
    return whl


def test_wheel_contains_every_source_module_and_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {m.replace(".", "/") for m in _source_modules()}
    have = {n[: -len(".py")].removesuffix("/__init__") for n in names if n.endswith(".py")}
    missing = sorted(expected - have)
    assert not missing, f"modules missing from the wheel (list them in pyproject packages): {missing}"
    assert "gradwatch/agent/py.typed" in names
    if (ROOT / "migrations" / "script.py.mako").exists():
        assert "gradwatch/migrations/script.py.mako" in names
    assert not any(n.startswith(("agent/", "server/", "tests/")) for n in names), "bare top-level folders leaked"


@pytest.mark.slow
def test_wheel_in_clean_venv_imports_every_module(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Install the wheel alone by unpacking it (pip --no-deps into the bare venv, offline).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    # Third-party dependencies come read-only from this interpreter's site-packages; the project
    # itself must come from the wheel (the dev venv's editable finder is not activated this way).
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # migrations/env.py runs migrations when imported (alembic's design): it only runs inside alembic.
    mods = sorted(m for m in _source_modules() if m != "gradwatch.migrations.env" and not m.endswith(".__main__"))
    code = (
        "import importlib, json, sys\n"
        f"mods = {mods!r}\n"
        "bad = {}\n"
        "for m in mods:\n"
        "    try: importlib.import_module(m)\n"
        "    except Exception as e: bad[m] = repr(e)\n"
        "import gradwatch.agent\n"
        "print(json.dumps({'bad': bad, 'where': gradwatch.agent.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bad"] == {}
    assert str(out["where"]).startswith(str(site)), f"imported from {out['where']}, not the installed wheel"
    cli = subprocess.run([str(py), "-m", "gradwatch.cli", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert cli.returncode == 0 and "gradwatch" in cli.stdout
