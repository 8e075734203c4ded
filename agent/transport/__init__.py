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

_FILE_OPTIONS = frozenset({"flush_interval", "batch_max_steps", "batch_max_rows", "buffer_max", "close_timeout",
                           "send_status", "quiet", "append"})
_NETWORK_OPTIONS = frozenset({"token", "spool_dir", "connect_timeout", "request_timeout", "backoff_max",
                              "backoff_base", "ws", "window", "resume", "cache_bytes", "segment_bytes",
                              "memory_bytes"})
#: Options that only mean something for another kind of target; accepted and ignored so that
#: ``watch(server=..., token=...)`` works unchanged whatever the target.
_IGNORED = _NETWORK_OPTIONS


def _known(options: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    unknown = options.keys() - allowed - _IGNORED
    if unknown:
        raise TypeError(f"unknown gradwatch transport option(s): {sorted(unknown)}")
    return {k: v for k, v in options.items() if k in allowed and v is not None}


def make_sink(target: str, *, run: RunInfo, layers: LayerTable, rank: int = 0, **options: Any) -> Sink:
    """Build the sink for ``target``. Raises ValueError for a target it cannot serve (at
    ``watch()`` time, before training starts)."""
    if target == "memory":
        from .memory import MemorySink

        return MemorySink(run, layers)
    if target.startswith("file:"):
        from .file import FileSink

        path = target[len("file:"):]
        if path.startswith("//"):  # file:///abs/path
            path = path[2:]
        if not path:
            raise ValueError("file: target needs a path, e.g. server='file:runs/run1.jsonl'")
        return FileSink(path, run, layers, rank=rank, **_known(options, _FILE_OPTIONS)).start()
    if target.startswith(("http://", "https://")):
        from .network import NetworkSink

        opts = _known(options, _FILE_OPTIONS | _NETWORK_OPTIONS)
        for file_only in ("quiet", "append"):
            opts.pop(file_only, None)
        return NetworkSink(target, run, layers, rank=rank, **opts).start()
    raise ValueError(f"unsupported gradwatch target {target!r}: expected 'memory', 'file:PATH' or an http(s):// URL")
