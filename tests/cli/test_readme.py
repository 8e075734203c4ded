"""The README's configuration section names every command-line flag and every setting a user can
set, so that it cannot fall behind the code (issue 12: "a configuration table, every flag and
environment variable")."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gradwatch.cli import build_parser
from gradwatch.server.settings import ServerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _flags(parser: argparse.ArgumentParser, path: str = "gradwatch") -> dict[str, list[str]]:
    """``{"gradwatch demo": ["--steps", ...], ...}``: the long flags of every (sub)command."""
    out: dict[str, list[str]] = {path: []}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_flags(sub, f"{path} {name}"))
        elif action.option_strings and "--help" not in action.option_strings:
            out[path].append(max(action.option_strings, key=len))
    return out


def test_every_command_has_a_usage_line_in_the_readme_with_all_its_flags() -> None:
    flags = _flags(build_parser())
    assert {"gradwatch demo", "gradwatch serve", "gradwatch upload", "gradwatch export",
            "gradwatch db upgrade"} <= flags.keys()
    prose = re.sub(r"```.*?```", "", README, flags=re.S)  # code blocks would pair the backticks wrongly
    spans = re.findall(r"`([^`]+)`", prose)
    missing = []
    for cmd, fs in flags.items():
        usages = [s for s in spans if s == cmd or s.startswith(cmd + " ")]
        if fs and not any(all(re.search(rf"{re.escape(f)}\b", u) for f in fs) for u in usages):
            missing.append(f"{cmd} {' '.join(fs)}")
    assert not missing, f"commands without a README usage line naming all their flags: {missing}"


def test_every_server_setting_is_in_the_readme() -> None:
    names = [f"GRADWATCH_SERVER_{n.upper()}" for n in ServerSettings.model_fields
             if n not in ("database_url", "token", "read_token")]
    assert names
    missing = [n for n in names if f"`{n}`" not in README]
    assert not missing, f"settings the README's table does not list: {missing}"
