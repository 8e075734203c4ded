"""The declared torch range is the tested range: its floor is the torch CI installs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gradwatch.agent._torch import MIN_TORCH, TORCH_VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_declared_floor_is_the_ci_torch_and_the_import_check() -> None:
    extra = re.search(r'^torch = \["torch>=(\d+)\.(\d+)"\]$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra is not None
    floor = tuple(int(x) for x in extra.groups())
    ci = re.search(r"^TORCH_SPEC \?= torch==(\d+)\.(\d+)\.\d+$", (ROOT / "Makefile").read_text(), re.M)
    assert ci is not None
    assert floor == MIN_TORCH == tuple(int(x) for x in ci.groups())
    assert TORCH_VERSION >= MIN_TORCH, torch.__version__
