"""Agent transports: how a watcher's records leave the process.

:func:`make_sink` picks one from a target string, importing only what that target needs:
``"memory"`` (tests), ``"file:PATH"`` (offline record that ``gradwatch upload PATH`` sends later),
``http(s)://HOST:PORT`` (websocket stream with HTTP fallback, spooling to disk).
"""

from __future__ import annotations

from typing import Any

from ..wire import RunInfo
from .base import Item, LayerTable, Pending, Sink

__all__ = ["make_sink", "Sink", "Pending", "Item", "LayerTable"]


def make_sink(target: str, *, run: RunInfo, layers: LayerTable, rank: int = 0, **options: Any) -> Sink:
    """Build the sink for ``target``. Raises ValueError for a target it cannot serve (at
    ``watch()`` time, before training starts)."""
    if target == "memory":
        from .memory import MemorySink

        return MemorySink(run, layers)
    raise ValueError(f"unsupported gradwatch target {target!r}: expected 'memory', 'file:PATH' or an http(s):// URL")
