"""The on-disk form of undelivered batches: JSON lines, one encoded batch per line.

The same format serves three purposes, so one reader handles all of them:

- ``server="file:PATH"`` records a whole run into one file ``PATH`` (append-only);
- the network sink's spool, ``<spool_dir>/<source>-<first_seq>.jsonl`` segments, which every
  batch is written to before it is sent (a write-ahead log: when the process is killed, the
  spool still holds whatever the server had not acknowledged) and which are deleted once the
  server has acknowledged every batch in them;
- ``<spool_dir>/rejected-<source>.jsonl``: batches the server refused (4xx), kept for inspection and
  never resent automatically.

``gradwatch upload`` reads a file or a spool directory with :func:`read_batches`. A process
killed in the middle of a write leaves a truncated last line; the reader reports it and goes on.
Nothing here imports torch or any network library.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REJECTED_PREFIX",
    "rejected_name",
    "SpoolLine",
    "ReadReport",
    "Segment",
    "SegmentWriter",
    "segment_name",
    "spool_files",
    "read_batches",
    "iter_lines",
    "note_name",
    "write_note",
    "read_notes",
]

REJECTED_PREFIX = "rejected"
_SUFFIX = ".jsonl"


def rejected_name(source: int) -> str:
    """The file beside the spool segments where a source's refused batches are kept."""
    return f"{REJECTED_PREFIX}-{source}{_SUFFIX}"


def _is_segment(f: Path) -> bool:
    return f.is_file() and f.name.endswith(_SUFFIX) and not f.name.startswith(REJECTED_PREFIX)


@dataclass(frozen=True, slots=True)
class SpoolLine:
    """One batch read back from disk: its key, its status, and the raw encoded bytes."""

    run_id: str
    source: int
    seq: int
    status: str | None
    steps: int
    raw: bytes
    path: str
    line: int


@dataclass(slots=True)
class ReadReport:
    """What :func:`read_batches` found besides the batches."""

    files: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # "path:line" of an unterminated last line
    corrupt: list[str] = field(default_factory=list)  # "path:line: why" for bad lines in the middle


def segment_name(source: int, first_seq: int) -> str:
    return f"{source}-{first_seq:012d}{_SUFFIX}"


def _segment_key(p: Path) -> tuple[int, int, str]:
    stem = p.name[: -len(_SUFFIX)]
    a, _, b = stem.partition("-")
    try:
        return int(a), int(b), p.name
    except ValueError:
        return (1 << 62, 0, p.name)


def spool_files(path: str | os.PathLike[str]) -> list[Path]:
    """The batch files under ``path``: the file itself, or a spool directory's segments in
    (source, first seq) order (``rejected-*.jsonl`` excluded). Subdirectories are searched one
    level deep, so a spool root holding several runs can be given."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or directory: {p}")
    out = sorted((f for f in p.iterdir() if _is_segment(f)), key=_segment_key)
    for d in sorted(x for x in p.iterdir() if x.is_dir()):
        out.extend(sorted((f for f in d.iterdir() if _is_segment(f)), key=_segment_key))
    return out


def iter_lines(path: Path, report: ReadReport) -> Iterator[tuple[int, bytes]]:
    """Complete lines of ``path`` (1-based numbers); an unterminated last line is reported as
    truncated unless it parses as a whole JSON object (a file closed without a final newline)."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    for i, ln in enumerate(lines, 1):
        if ln.strip():
            yield i, ln
    if last.strip():
        try:
            json.loads(last)
        except ValueError:
            report.truncated.append(f"{path}:{len(lines) + 1}")
            return
        yield len(lines) + 1, last


def _parse(raw: bytes, path: Path, line: int) -> SpoolLine:
    d: Any = json.loads(raw)
    if type(d) is not dict or type(d.get("run")) is not dict:
        raise ValueError("not a gradwatch batch")
    run_id, seq, source = d["run"].get("run_id"), d.get("seq"), d.get("source", 0)
    if type(run_id) is not str or type(seq) is not int or type(source) is not int:
        raise ValueError("batch without run.run_id / seq / source")
    steps = d.get("steps") or []
    return SpoolLine(run_id, source, seq, d.get("status"), len(steps) if type(steps) is list else 0,
                     raw, str(path), line)


def read_batches(path: str | os.PathLike[str], report: ReadReport | None = None) -> list[SpoolLine]:
    """Every batch in a file or spool directory, in file order. Bad lines are reported in
    ``report`` and skipped, never raised (a killed writer must not make its data unreadable)."""
    report = report if report is not None else ReadReport()
    out: list[SpoolLine] = []
    for f in spool_files(path):
        report.files.append(str(f))
        for i, raw in iter_lines(f, report):
            try:
                out.append(_parse(raw, f, i))
            except (ValueError, KeyError, TypeError) as e:
                report.corrupt.append(f"{f}:{i}: {e}")
    return out


# --------------------------------------------------------------------------------------------
# writing


@dataclass(slots=True)
class Segment:
    """One spool file and the seqs written to it."""

    path: Path
    first_seq: int
    last_seq: int = 0
    size: int = 0
    closed: bool = False


class SegmentWriter:
    """Appends encoded batches to one file (``file:PATH``) or to rolling segments in a spool
    directory. Used by exactly one thread (the sink's drainer). Every append is written through
    to the OS (so a killed process loses nothing already appended); ``sync`` adds an fsync."""

    def __init__(self, path: str | os.PathLike[str], *, source: int = 0, segmented: bool = True,
                 max_segment_bytes: int = 8 << 20) -> None:
        self.path = Path(path)
        self.source = source
        self.segmented = segmented
        self.max_segment_bytes = max_segment_bytes
        self._f: Any = None
        self.current: Segment | None = None
        self.segments: list[Segment] = []  # segments written by this writer, oldest first

    def _open(self, seq: int) -> None:
        if self.segmented:
            self.path.mkdir(parents=True, exist_ok=True)
            p = self.path / segment_name(self.source, seq)
        else:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            p = self.path
        # unbuffered: a failed write leaves nothing queued in a Python buffer that a later
        # flush or close could half-write
        f = open(p, "ab", buffering=0)
        try:
            # A previous writer killed mid-line leaves an unterminated line: start on a fresh one.
            if f.tell() > 0:
                with open(p, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        _write_all(f, b"\n")
        except OSError:
            f.close()
            raise
        self._f = f
        self.current = Segment(p, seq, seq - 1, f.tell())
        self.segments.append(self.current)

    def append(self, seq: int, raw: bytes) -> tuple[Segment, int, int]:
        """Append one batch; returns (segment, offset, length) of its line.

        Raises OSError (a full disk, a read-only or vanished directory) with nothing of the line
        left behind where the file can be cut back; the segment is then closed and the next append
        opens a fresh one, so one failure never wedges the writer.
        """
        if self._f is None or (self.segmented and self.current is not None
                               and self.current.size >= self.max_segment_bytes):
            self.roll()
            self._open(seq)
        assert self.current is not None
        off = self._f.tell()
        try:
            _write_all(self._f, raw + b"\n")
        except OSError:
            try:
                os.ftruncate(self._f.fileno(), off)
            except OSError:
                pass
            empty = self.current if off == 0 and self.segmented else None
            self.roll()
            if empty is not None:  # a file this failure created and left empty: nobody tracks it
                self.segments.remove(empty)
                try:
                    empty.path.unlink()
                except OSError:
                    pass
            raise
        seg = self.current
        seg.last_seq = seq
        seg.size = off + len(raw) + 1
        return seg, off, len(raw)

    def roll(self) -> None:
        """Close the current segment (the next append opens a new one)."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        if self.current is not None:
            self.current.closed = True
            self.current = None

    def sync(self) -> None:
        if self._f is not None:
            try:
                os.fsync(self._f.fileno())
            except OSError:
                pass

    def close(self) -> None:
        self.sync()
        self.roll()


def _write_all(f: Any, data: bytes) -> None:
    """Write ``data`` to an unbuffered file (a raw write may take only part of it)."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def note_name(source: int) -> str:
    """The file beside a spool's segments where a closing sink leaves what it could not deliver."""
    return f"{source}.note.json"


def write_note(spool_dir: Path, source: int, note: dict[str, Any]) -> None:
    """Best effort (the disk may still be full): the run's final status, what was lost and why,
    for ``gradwatch upload`` to report instead of guessing from the files."""
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        (spool_dir / note_name(source)).write_text(json.dumps({"source": source, **note}))
    except OSError:
        pass


def read_notes(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The notes in a spool directory (and its subdirectories one level deep)."""
    p = Path(path)
    if not p.is_dir():
        return []
    out = []
    for f in sorted([*p.glob("*.note.json"), *p.glob("*/*.note.json")]):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("run_id"), str):
            out.append({**d, "path": str(f)})
    return out


def max_seq(path: str | os.PathLike[str], run_id: str, source: int) -> int:
    """The highest seq of ``(run_id, source)`` found in a file or spool directory (0 if none)."""
    p = Path(path)
    if not p.exists():
        return 0
    best = 0
    for ln in read_batches(p):
        if ln.run_id == run_id and ln.source == source and ln.seq > best:
            best = ln.seq
    rej = p / rejected_name(source) if p.is_dir() else None
    if rej is not None and rej.exists():
        for ln in read_batches(rej):
            if ln.run_id == run_id and ln.source == source and ln.seq > best:
                best = ln.seq
    return best
