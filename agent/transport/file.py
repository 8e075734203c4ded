"""``server="file:PATH"``: record a run offline into one JSON-lines file.

Each line is one encoded :class:`~gradwatch.agent.wire.Batch`, exactly what the network sink
would have sent; ``gradwatch upload PATH`` sends the file to a server later. The training
thread only appends to the buffer (see :mod:`.buffered`); the drainer thread writes. The file is
appended to, so a resumed run (same ``run_id``) continues in the same file with its seqs
continuing after the ones already there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..wire import RunInfo
from .base import LayerTable
from .buffered import BufferedSink, _say, upload_hint
from .spool import SegmentWriter, max_seq

__all__ = ["FileSink"]


class FileSink(BufferedSink):
    """Writes every batch to ``path`` (fsync on flush and close).

    Args:
        path: the file; created with its parent directories; appended to if it exists.
        run, layers, rank: as for every sink.
        **options: ``flush_interval``, ``batch_max_steps``, ``batch_max_rows``, ``buffer_max``,
            ``close_timeout`` (see :data:`~gradwatch.agent.transport.buffered.DEFAULTS`).

    Starts one daemon thread (the writer) when started by :func:`make_sink`.
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike[str], run: RunInfo, layers: LayerTable | None = None, *,
                 rank: int = 0, quiet: bool = False, **options: Any) -> None:
        super().__init__(run, layers, rank=rank, **options)
        self.path = Path(path).expanduser()
        self.quiet = quiet
        if self.path.is_dir():
            raise ValueError(f"file:{path} is a directory; give a file path (e.g. file:{path}/run.jsonl)")

    def _open_writer(self) -> tuple[SegmentWriter, int]:
        last = max_seq(self.path, self.run.run_id, self.source) if self.path.exists() else 0
        return SegmentWriter(self.path, source=self.source, segmented=False), last

    def stats(self) -> dict[str, int]:
        s = super().stats()
        s["written"] = s["spooled"]
        return s

    def _finish(self, deadline: float, lost_in_memory: int) -> None:
        st = self.stats()
        lost = st["dropped"] + lost_in_memory
        failed = self.lost_reasons()
        if self.quiet and not lost and not failed:
            return
        extra = ""
        if lost:
            extra = f"; {lost} record(s) could not be written (writer stalled or closed too early)"
        if failed:
            extra += f"; {sum(failed.values())} record(s) lost to failed writes (" + \
                ", ".join(f"{n} {r}" for r, n in sorted(failed.items())) + ")"
        if self._drainer.is_alive():
            extra += f"; the writer did not finish within the close timeout ({self.close_timeout:g} s)"
        if not st["spooled"] and not self._drainer.is_alive():  # nothing reached the file and nothing will
            where = "" if self.path.exists() else f" ({self.path} does not exist)"
            _say(f"gradwatch: run {self.run.run_id}: nothing was written to {self.path}{where}{extra}")
            return
        _say(f"gradwatch: run {self.run.run_id} recorded to {self.path} ({st['spooled']} records in {st['batches']} batches){extra}; "
             f"send it with: {upload_hint(self.path)}")
        _ = time  # (kept for symmetry with the network sink's deadline handling)
