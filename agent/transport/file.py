"""``server="file:PATH"``: record a run offline into one JSON-lines file.

Each line is one encoded :class:`~gradwatch.agent.wire.Batch`, exactly what the network sink
would have sent; ``gradwatch upload PATH`` sends the file to a server later. The training
thread only appends to the buffer (see :mod:`.buffered`); the drainer thread writes.

A file holds one run: a new run aimed at a file that holds other runs moves that recording aside
to ``PATH.prev`` (so a second execution of a script does not silently merge two runs, and nothing
is deleted), unless ``append=True``. A resumed run (same ``run_id``) always continues in its file,
its seqs after the ones already there. ``{run_id}`` in the path is replaced by the run's id, for
one file per run in a directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..wire import RunInfo
from .base import LayerTable
from .buffered import BufferedSink, _say, upload_hint
from .spool import SegmentWriter, max_seq, read_batches

__all__ = ["FileSink"]


class FileSink(BufferedSink):
    """Writes every batch to ``path`` (fsync on flush and close).

    Args:
        path: the file; created with its parent directories. ``{run_id}`` in it becomes the run's id.
        run, layers, rank: as for every sink.
        append: keep other runs already in the file and add this one after them (default: move
            such a recording aside to ``PATH.prev`` first). Only rank 0 moves a file aside: the
            other ranks of a run add to the file rank 0 writes.
        **options: ``flush_interval``, ``batch_max_steps``, ``batch_max_rows``, ``buffer_max``,
            ``close_timeout`` (see :data:`~gradwatch.agent.transport.buffered.DEFAULTS`).

    Starts one daemon thread (the writer) when started by :func:`make_sink`.
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike[str], run: RunInfo, layers: LayerTable | None = None, *,
                 rank: int = 0, quiet: bool = False, append: bool = False, **options: Any) -> None:
        super().__init__(run, layers, rank=rank, **options)
        self.path = Path(str(path).replace("{run_id}", run.run_id)).expanduser()
        self.quiet = quiet
        if self.path.is_dir():
            raise ValueError(f"file:{path} is a directory; give a file path (e.g. file:{path}/run.jsonl)")
        if not append and rank == 0:
            self._set_aside_other_runs()

    def _set_aside_other_runs(self) -> None:
        """Move a recording of other runs to ``PATH.prev`` (at ``watch()``, before any write)."""
        if not self.path.is_file():
            return
        others = sorted({ln.run_id for ln in read_batches(self.path)} - {self.run.run_id})
        if not others:
            return
        prev = self.path.with_name(self.path.name + ".prev")
        os.replace(self.path, prev)
        held = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        _say(f"gradwatch: replacing the earlier recording {self.path} (run {held}), kept as {prev}; "
             f"transport={{'append': True}} adds runs to one file instead")

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
