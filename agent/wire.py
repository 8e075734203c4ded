"""The versioned wire schema between the agent and the server (stdlib only).

The agent produces :class:`Batch` objects and the server decodes them with :func:`decode_batch`;
both import this one module, so the two sides cannot drift. Nothing here imports torch.

Encoding: UTF-8 JSON. Strict JSON cannot carry NaN or ±inf, and gradwatch exists to report them,
so every float field may hold the strings ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``; the
decoder turns them back into floats. ``null`` means "not measured", never NaN.

Per-layer statistics travel column-wise (one column per field, in the order of ``layer_ids``),
which lets the server bulk-insert by zipping. A column is either a JSON list of numbers (easy to
write by hand) or, as the agent sends it, ``{"dtype": "f8"|"i8", "b64": ...}``: the values as
little-endian float64/int64 in base64. The packed form is exact, carries NaN/±inf natively, and
encodes and decodes in C (``array`` + ``base64``) several times faster than float text, which
is most of the cost of ingest on both sides.

Idempotency: a batch is identified by ``(run.run_id, source, seq)``; the server stores a batch at
most once, so the agent may resend freely after a reconnect.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

from .spec import LAYER_FIELDS as _LAYER_SPEC

__all__ = [
    "WIRE_VERSION",
    "ACCEPTED_VERSIONS",
    "LAYER_FIELDS",
    "V1_LAYER_FIELDS",
    "EVENT_KINDS",
    "RUN_STATUSES",
    "MAX_LAYERS",
    "MAX_RANK",
    "MAX_DEPTH",
    "INT64_MAX",
    "WireError",
    "RunInfo",
    "LayerInfo",
    "StepRecord",
    "ScalarRecord",
    "Event",
    "Batch",
    "encode_batch",
    "decode_batch",
    "batch_to_dict",
    "batch_from_dict",
    "encode_float",
    "decode_float",
    "validate_run_id",
]

#: Version of the schema the agent writes. Version 2 sends exact moments (``m2``, the centred
#: second moment, instead of finished var/std) and the weight norm ``wnorm``.
WIRE_VERSION = 2
#: Versions the decoder takes. A version-1 batch (spools and ``.gwrec`` files of earlier agents)
#: is converted on decode: ``m2 = var · numel``, ``wnorm`` null. Others get a clear 4xx.
ACCEPTED_VERSIONS: tuple[int, ...] = (1, 2)

#: Per-layer columns of a step record (declared in :mod:`gradwatch.agent.spec`), in this order.
#: ``numel`` and ``nonfinite`` are integers; the nullable ones (``l2_post``: no transform ran;
#: ``wnorm``: not measured) may be left out or hold nulls.
LAYER_FIELDS: tuple[str, ...] = tuple(f.name for f in _LAYER_SPEC)
#: The per-layer columns of wire version 1.
V1_LAYER_FIELDS: tuple[str, ...] = ("numel", "mean", "var", "std", "l2", "maxabs", "nonfinite", "l2_post")

#: Event kinds. ``overflow``: the loss scaler found inf/NaN (data: scale_before, scale_after,
#: layers). ``scale_growth``: the scale grew. ``skipped``: the optimizer step was skipped.
#: ``clip``: a clipper changed the gradients. ``nonfinite``: non-finite gradients without a
#: scaler. ``spike``: a statistic jumped. ``manual_scale``: update(new_scale=...) was called.
EVENT_KINDS: frozenset[str] = frozenset(
    {"overflow", "scale_growth", "skipped", "clip", "nonfinite", "spike", "manual_scale"}
)

_INT_FIELDS = frozenset(f.name for f in _LAYER_SPEC if not f.is_float)
_NULLABLE = frozenset(f.name for f in _LAYER_SPEC if f.nullable) | {"l2_post"}

#: Run statuses a batch may set.
RUN_STATUSES: frozenset[str] = frozenset({"running", "finished", "crashed"})

#: Upper bounds that keep a malformed or hostile payload from exhausting the server.
MAX_LAYERS = 100_000
MAX_NAME = 512
_MAX_KEY = 128
#: Largest rank, source or world size (stored as 32-bit integers; this keeps them far inside).
MAX_RANK = 1 << 20
#: Free-form values (config, event data, transforms) hold values at most this many levels below
#: the top object; deeper ones are refused, which also keeps every recursive walk of them short.
MAX_DEPTH = 8
#: Steps, seqs and the integer columns are stored as signed 64-bit integers.
INT64_MAX = 2**63 - 1


class WireError(ValueError):
    """A payload that does not follow the schema; the message names the offending field."""


# --------------------------------------------------------------------------------------------
# floats


def encode_float(x: float | None) -> float | str | None:
    """Encode one float for JSON: non-finite values become "NaN"/"Infinity"/"-Infinity"."""
    if x is None:
        return None
    if x != x:
        return "NaN"
    if x == math.inf:
        return "Infinity"
    if x == -math.inf:
        return "-Infinity"
    return x


_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "nan": math.nan,
            "inf": math.inf, "-inf": -math.inf}


def decode_float(v: Any, where: str, *, nullable: bool = True) -> float | None:
    """Decode one float encoded by :func:`encode_float`, raising WireError on anything else."""
    t = type(v)
    if t is float:
        return v
    if t is int:
        try:
            return float(v)
        except OverflowError:  # JSON integers are unbounded; float64 stops near 1.8e308
            raise WireError(f"{where}: integer of {len(str(v))} digits is too large for a float") from None
    if v is None:
        if nullable:
            return None
        raise WireError(f"{where}: null is not allowed here")
    if t is str:
        try:
            return _SPECIAL[v]
        except KeyError:
            raise WireError(f"{where}: expected a number or 'NaN'/'Infinity'/'-Infinity', got {v!r:.40}") from None
    raise WireError(f"{where}: expected a number, got {t.__name__}")


_BIG_ENDIAN = sys.byteorder == "big"


def _pack(typecode: str, xs: list[Any]) -> dict[str, str]:
    arr = array(typecode, xs)
    if _BIG_ENDIAN:
        arr.byteswap()
    return {"dtype": "f8" if typecode == "d" else "i8", "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def _enc_column(name: str, xs: list[Any]) -> Any:
    """A per-layer column in its packed form; a column holding nulls stays a JSON list."""
    try:
        return _pack("q" if name in _INT_FIELDS else "d", xs)
    except TypeError:  # None present (l2_post not measured): plain list
        return [encode_float(v) for v in xs]


if sys.version_info >= (3, 11):
    def _b64decode_strict(data: str) -> bytes:
        return binascii.a2b_base64(data, strict_mode=True)  # validates in C (b64decode's validate is a regex)
else:  # pragma: no cover
    def _b64decode_strict(data: str) -> bytes:
        return base64.b64decode(data, validate=True)


def _unpack(v: dict[str, Any], where: str, n: int, integer: bool, as_array: bool = False) -> Any:
    if v.keys() != {"dtype", "b64"}:
        raise WireError(f"{where}: a packed column is {{\"dtype\": \"f8\"|\"i8\", \"b64\": ...}}, got keys {sorted(v)[:5]}")
    dtype, data = v["dtype"], v["b64"]
    want = "i8" if integer else "f8"
    if dtype != want:
        raise WireError(f"{where}: dtype must be {want!r}, got {dtype!r:.20}")
    if type(data) is not str:
        raise WireError(f"{where}: b64 must be a base64 string")
    try:
        raw = _b64decode_strict(data)
    except (binascii.Error, ValueError):
        raise WireError(f"{where}: b64 is not valid base64") from None
    if len(raw) != 8 * n:
        raise WireError(f"{where}: expected {n} values (one per entry of layer_ids), got {len(raw) / 8:g}")
    arr = array("q" if integer else "d")
    arr.frombytes(raw)
    if _BIG_ENDIAN:
        arr.byteswap()
    if integer and n and min(arr) < 0:
        raise WireError(f"{where}: expected non-negative integers")
    return arr if as_array else arr.tolist()


def _may_be_negative(xs: Any) -> bool:
    """False when no value of a packed float column has its sign bit set (read in C from the
    bytes: a large batch has hundreds of thousands of values); True otherwise, and for lists."""
    if type(xs) is not array:
        return True
    signs = memoryview(xs).cast("B")[0 if _BIG_ENDIAN else 7::8]
    return bool(len(signs)) and max(signs) >= 0x80


def _dec_list(v: Any, where: str, n: int, *, integer: bool = False, nullable: bool = False,
              as_array: bool = False) -> Any:
    if type(v) is dict:
        return _unpack(v, where, n, integer, as_array)
    if type(v) is not list:
        raise WireError(f"{where}: expected a list of {n} numbers, got {type(v).__name__}")
    if len(v) != n:
        raise WireError(f"{where}: expected {n} values (one per entry of layer_ids), got {len(v)}")
    if integer:
        for i, x in enumerate(v):
            if type(x) is not int or not 0 <= x <= INT64_MAX:
                if nullable and x is None:
                    continue
                if type(x) is int and x > 0:
                    raise WireError(f"{where}[{i}]: {str(x)[:40]} is out of range [0, {INT64_MAX}] (a 64-bit integer)")
                raise WireError(f"{where}[{i}]: expected a non-negative integer, got {x!r:.40}")
        return v
    # Fast path: all plain floats/ints (an int too big for a float falls through to be named).
    if all(type(x) is float or type(x) is int for x in v):
        try:
            return [float(x) for x in v]
        except OverflowError:
            pass
    return [decode_float(x, f"{where}[{i}]", nullable=nullable) for i, x in enumerate(v)]


# --------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Identity and metadata of a run. ``run_id`` is made by the agent (32 hex chars) and adopted
    by the server as the run's id, so offline files and spools upload to the same run."""

    run_id: str
    project: str = "default"
    name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    started_at: float | None = None
    world_size: int = 1


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One parameter tensor of the model; ``index`` is its position in the run's layer table."""

    index: int
    name: str
    shape: list[int] = field(default_factory=list)
    dtype: str = ""
    sparse: bool = False


@dataclass(frozen=True, slots=True)
class StepRecord:
    """Everything measured at one optimizer step of one rank.

    ``layers`` maps each name of :data:`LAYER_FIELDS` to a list aligned with ``layer_ids``
    (layers whose grad was None that step are absent). ``transforms`` maps a transform's name to
    its own values (threshold, coefficient, alpha...), each a float or a list of floats.
    """

    step: int
    time: float
    rank: int = 0
    layer_ids: list[int] = field(default_factory=list)
    layers: dict[str, list[Any]] = field(default_factory=dict)
    total_norm: float | None = None
    total_norm_post: float | None = None
    clip_coef: float | None = None
    loss_scale: float | None = None
    noise_scale: float | None = None
    noise_g2: float | None = None
    noise_trace: float | None = None
    skipped: bool = False
    transforms: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScalarRecord:
    """User scalars from ``Watcher.log`` (loss, lr, accuracy...) at one step."""

    step: int
    time: float
    values: dict[str, float | None]
    rank: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """A discrete decision or anomaly (see :data:`EVENT_KINDS`); ``data`` is JSON-able."""

    kind: str
    step: int
    time: float
    rank: int = 0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Batch:
    """The unit the agent sends and the server stores atomically."""

    run: RunInfo
    seq: int
    source: int = 0
    sent_at: float = 0.0
    layers: list[LayerInfo] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    scalars: list[ScalarRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status: str | None = None
    #: On the end-of-run batch only: records this source lost before delivery, by reason
    #: (``{"ENOSPC": 3710}``), so the server can show what never reached it. Sent only when
    #: something was lost, so a server that predates the field accepts a complete run.
    lost: dict[str, int] | None = None
    wire_version: int = WIRE_VERSION

    @property
    def row_count(self) -> int:
        """Layer rows in this batch (the unit ingest throughput is measured in)."""
        return sum(len(s.layer_ids) for s in self.steps)


# --------------------------------------------------------------------------------------------
# encoding


def _enc_value(v: Any) -> Any:
    if type(v) is float:
        return encode_float(v)
    if type(v) is list:
        return [_enc_value(x) for x in v]
    if type(v) is dict:
        return {k: _enc_value(x) for k, x in v.items()}
    return v


def batch_to_dict(b: Batch) -> dict[str, Any]:
    """The JSON-ready dict of a batch (non-finite floats encoded)."""
    r = b.run
    return {
        "wire_version": b.wire_version,
        "run": {
            "run_id": r.run_id,
            "project": r.project,
            "name": r.name,
            "config": _enc_value(r.config),
            "tags": list(r.tags),
            "started_at": r.started_at,
            "world_size": r.world_size,
        },
        "seq": b.seq,
        "source": b.source,
        "sent_at": b.sent_at,
        "status": b.status,
        "layers": [
            {"index": la.index, "name": la.name, "shape": list(la.shape), "dtype": la.dtype, "sparse": la.sparse}
            for la in b.layers
        ],
        "steps": [
            {
                "step": s.step,
                "time": s.time,
                "rank": s.rank,
                "layer_ids": s.layer_ids,
                "layers": {k: _enc_column(k, v) for k, v in s.layers.items()
                           if k not in _OMIT_IF_NULL or any(x is not None for x in v)},
                "total_norm": encode_float(s.total_norm),
                "total_norm_post": encode_float(s.total_norm_post),
                "clip_coef": encode_float(s.clip_coef),
                "loss_scale": encode_float(s.loss_scale),
                "skipped": s.skipped,
                "transforms": _enc_value(s.transforms),
                **_noise_keys(s),
            }
            for s in b.steps
        ],
        "scalars": [
            {"step": s.step, "time": s.time, "rank": s.rank, "values": _enc_value(s.values)} for s in b.scalars
        ],
        "events": [
            {"kind": e.kind, "step": e.step, "time": e.time, "rank": e.rank, "data": _enc_value(e.data)}
            for e in b.events
        ],
    }


#: Step fields of the noise scale: sent only when measured, so a batch without them still decodes
#: on servers that predate them.
NOISE_STEP_FIELDS: tuple[str, ...] = ("noise_scale", "noise_g2", "noise_trace")


#: Per-layer columns left out of the encoding while all null (servers that predate them still decode it).
_OMIT_IF_NULL = frozenset({"noise_scale"})


def _noise_keys(s: StepRecord) -> dict[str, Any]:
    return {k: encode_float(getattr(s, k)) for k in NOISE_STEP_FIELDS if getattr(s, k) is not None}


def encode_batch(b: Batch) -> bytes:
    """Serialize a batch to strict JSON bytes (no NaN/Infinity tokens)."""
    d = batch_to_dict(b)
    if b.lost:
        d["lost"] = dict(b.lost)
    return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------------------------
# decoding (strict: every error names the field)


def _obj(v: Any, where: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise WireError(f"{where}: expected an object, got {type(v).__name__}")
    return v


def _int(v: Any, where: str, *, lo: int = 0, hi: int = INT64_MAX) -> int:
    if type(v) is not int:
        raise WireError(f"{where}: expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise WireError(f"{where}: {str(v)[:40]} is out of range [{lo}, {hi}]")
    return v


def _str(v: Any, where: str, *, nullable: bool = False, max_len: int = MAX_NAME) -> str | None:
    if v is None and nullable:
        return None
    if type(v) is not str:
        raise WireError(f"{where}: expected a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise WireError(f"{where}: longer than {max_len} characters")
    if "\x00" in v:
        raise WireError(f"{where}: contains a NUL character")
    return v


def _finite_time(v: Any, where: str, *, nullable: bool = False) -> float | None:
    x = decode_float(v, where, nullable=nullable)
    if x is not None and not math.isfinite(x):
        raise WireError(f"{where}: must be a finite number")
    return x


def _bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise WireError(f"{where}: expected true or false, got {type(v).__name__}")
    return v


def _dec_value(v: Any, where: str, depth: int = 0) -> Any:
    """Decode a free-form JSON value, turning encoded non-finite strings back into floats."""
    if depth > MAX_DEPTH:
        raise WireError(f"{where}: nested too deeply (at most {MAX_DEPTH} levels)")
    t = type(v)
    if t is str and v in _SPECIAL:
        return _SPECIAL[v]
    if t is list:
        return [_dec_value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
    if t is dict:
        return {_str(k, f"{where} key", max_len=_MAX_KEY): _dec_value(x, f"{where}.{k}", depth + 1) for k, x in v.items()}
    return v


def _known(d: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = d.keys() - allowed
    if extra:
        raise WireError(f"{where}: unknown field(s) {sorted(extra)[:5]}")


_BATCH_KEYS = frozenset({"wire_version", "run", "seq", "source", "sent_at", "status", "lost", "layers", "steps",
                         "scalars", "events"})
#: At most this many loss reasons in one batch's ``lost`` map.
MAX_LOST_REASONS = 32
_RUN_KEYS = frozenset({"run_id", "project", "name", "config", "tags", "started_at", "world_size"})
_LAYER_KEYS = frozenset({"index", "name", "shape", "dtype", "sparse"})
_STEP_KEYS = frozenset({"step", "time", "rank", "layer_ids", "layers", "total_norm", "total_norm_post",
                        "clip_coef", "loss_scale", "skipped", "transforms", "noise_scale", "noise_g2",
                        "noise_trace"})
_SCALAR_KEYS = frozenset({"step", "time", "rank", "values"})
_EVENT_KEYS = frozenset({"kind", "step", "time", "rank", "data"})


#: The one run-id rule (agent config, wire, server schemas), always applied as a full match:
#: ``re.match`` with ``$`` would take "abc\n".
RUN_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)


def validate_run_id(v: Any, where: str) -> str:
    """A run id as the server stores it (the stream's hello is checked with it too). Raises WireError."""
    s = _str(v, where, max_len=64)
    assert s is not None
    if _RUN_ID_RE.fullmatch(s) is None:
        raise WireError(f"{where}: must be 1-64 characters of ASCII letters, digits, '-' or '_'")
    return s


def _list(v: Any, where: str, max_len: int) -> list[Any]:
    if type(v) is not list:
        raise WireError(f"{where}: expected a list, got {type(v).__name__}")
    if len(v) > max_len:
        raise WireError(f"{where}: more than {max_len} entries")
    return v


def batch_from_dict(d: Any, *, packed_as_array: bool = False, consume: bool = False) -> Batch:
    """Validate and decode the dict form of a batch. Raises :class:`WireError`.

    ``packed_as_array``: leave packed columns as ``array.array`` (``"d"``/``"q"``, native byte
    order) instead of lists, for a reader that hands them to a columnar library without
    creating one Python number per value (the server's bulk ingest). Validation is the same.
    ``consume``: replace each entry of ``d["steps"]`` by None once it is decoded, so a caller
    that has no further use for ``d`` holds its parsed base64 text or the decoded columns of a
    step, not both (peak memory of a large batch: the larger of the two, not their sum).
    """
    d = _obj(d, "batch")
    if "wire_version" not in d:
        raise WireError("batch.wire_version: missing")
    ver = d["wire_version"]
    if type(ver) is not int:
        raise WireError("batch.wire_version: expected an integer")
    if ver not in ACCEPTED_VERSIONS:
        raise WireError(f"batch.wire_version: this server speaks wire versions {list(ACCEPTED_VERSIONS)}, "
                        f"got {ver}; upgrade the older side")
    fields = LAYER_FIELDS if ver == WIRE_VERSION else V1_LAYER_FIELDS
    _known(d, _BATCH_KEYS, "batch")
    for k in ("run", "seq"):
        if k not in d:
            raise WireError(f"batch.{k}: missing")

    rd = _obj(d["run"], "batch.run")
    _known(rd, _RUN_KEYS, "batch.run")
    if "run_id" not in rd:
        raise WireError("batch.run.run_id: missing")
    config = _dec_value(rd.get("config") or {}, "batch.run.config")
    if type(config) is not dict:
        raise WireError("batch.run.config: expected an object")
    run = RunInfo(
        run_id=validate_run_id(rd["run_id"], "batch.run.run_id"),
        project=_str(rd.get("project", "default"), "batch.run.project") or "default",
        name=_str(rd.get("name"), "batch.run.name", nullable=True),
        config=config,
        tags=[_str(t, f"batch.run.tags[{i}]", max_len=_MAX_KEY) for i, t in enumerate(_list(rd.get("tags") or [], "batch.run.tags", 256))],  # type: ignore[misc]
        started_at=_finite_time(rd.get("started_at"), "batch.run.started_at", nullable=True),
        world_size=_int(rd.get("world_size", 1), "batch.run.world_size", lo=1, hi=MAX_RANK),
    )
    status = d.get("status")
    if status is not None and (type(status) is not str or status not in RUN_STATUSES):
        got = repr(status)[:40] if type(status) is str else type(status).__name__
        raise WireError(f"batch.status: must be one of {sorted(RUN_STATUSES)} or null, got {got}")
    lost = _lost(d.get("lost"))

    layers = []
    for i, la in enumerate(_list(d.get("layers") or [], "batch.layers", MAX_LAYERS)):
        w = f"batch.layers[{i}]"
        la = _obj(la, w)
        _known(la, _LAYER_KEYS, w)
        for k in ("index", "name"):
            if k not in la:
                raise WireError(f"{w}.{k}: missing")
        shape = _list(la.get("shape") or [], f"{w}.shape", 16)
        layers.append(LayerInfo(
            index=_int(la["index"], f"{w}.index", hi=MAX_LAYERS - 1),
            name=_str(la["name"], f"{w}.name") or "",
            shape=[_int(x, f"{w}.shape[{j}]") for j, x in enumerate(shape)],
            dtype=_str(la.get("dtype", ""), f"{w}.dtype", max_len=32) or "",
            sparse=_bool(la.get("sparse", False), f"{w}.sparse"),
        ))

    steps = []
    raw_steps = _list(d.get("steps") or [], "batch.steps", 1_000_000)
    for i, s in enumerate(raw_steps):
        w = f"batch.steps[{i}]"
        s = _obj(s, w)
        _known(s, _STEP_KEYS, w)
        for k in ("step", "time"):
            if k not in s:
                raise WireError(f"{w}.{k}: missing")
        ids = _list(s.get("layer_ids") or [], f"{w}.layer_ids", MAX_LAYERS)
        try:  # C-level type check; the loop below only runs to name the offending entry
            ok = not ids or (0 <= min(array("q", ids)) and max(ids) < MAX_LAYERS)
        except (TypeError, OverflowError):
            ok = False
        if not ok:
            for j, x in enumerate(ids):
                if type(x) is not int or not 0 <= x < MAX_LAYERS:
                    raise WireError(f"{w}.layer_ids[{j}]: expected a layer index in [0, {MAX_LAYERS})")
        if len(set(ids)) != len(ids):
            raise WireError(f"{w}.layer_ids: contains duplicates")
        cols = _obj(s.get("layers") or {}, f"{w}.layers")
        unknown = cols.keys() - set(fields)
        if unknown:
            raise WireError(f"{w}.layers: unknown column(s) {sorted(unknown)[:5]}; expected {list(fields)}")
        n = len(ids)
        dec_cols: dict[str, list[Any]] = {}
        for k in fields:
            if k not in cols:
                if n and k not in _NULLABLE:
                    raise WireError(f"{w}.layers.{k}: missing")
                dec_cols[k] = [None] * n
                continue
            dec_cols[k] = _dec_list(cols[k], f"{w}.layers.{k}", n, integer=k in _INT_FIELDS,
                                    nullable=k in _NULLABLE, as_array=packed_as_array)
        if fields is V1_LAYER_FIELDS:
            dec_cols = _from_v1(dec_cols, n, packed_as_array)
        elif n and _may_be_negative(dec_cols["m2"]) and any(x < 0 for x in dec_cols["m2"] if x is not None):
            raise WireError(f"{w}.layers.m2: a centred second moment is never negative")  # (NaN compares False: data)
        tr = _dec_value(s.get("transforms") or {}, f"{w}.transforms")
        if type(tr) is not dict or any(type(v) is not dict for v in tr.values()):
            raise WireError(f"{w}.transforms: expected an object of objects")
        steps.append(StepRecord(
            step=_int(s["step"], f"{w}.step"),
            time=_finite_time(s["time"], f"{w}.time") or 0.0,
            rank=_int(s.get("rank", 0), f"{w}.rank", hi=MAX_RANK),
            layer_ids=ids,
            layers=dec_cols,
            total_norm=decode_float(s.get("total_norm"), f"{w}.total_norm"),
            total_norm_post=decode_float(s.get("total_norm_post"), f"{w}.total_norm_post"),
            clip_coef=decode_float(s.get("clip_coef"), f"{w}.clip_coef"),
            loss_scale=decode_float(s.get("loss_scale"), f"{w}.loss_scale"),
            noise_scale=decode_float(s.get("noise_scale"), f"{w}.noise_scale"),
            noise_g2=decode_float(s.get("noise_g2"), f"{w}.noise_g2"),
            noise_trace=decode_float(s.get("noise_trace"), f"{w}.noise_trace"),
            skipped=_bool(s.get("skipped", False), f"{w}.skipped"),
            transforms=tr,
        ))
        if consume:
            raw_steps[i] = None

    scalars = []
    for i, s in enumerate(_list(d.get("scalars") or [], "batch.scalars", 1_000_000)):
        w = f"batch.scalars[{i}]"
        s = _obj(s, w)
        _known(s, _SCALAR_KEYS, w)
        for k in ("step", "time", "values"):
            if k not in s:
                raise WireError(f"{w}.{k}: missing")
        vals = _obj(s["values"], f"{w}.values")
        scalars.append(ScalarRecord(
            step=_int(s["step"], f"{w}.step"),
            time=_finite_time(s["time"], f"{w}.time") or 0.0,
            rank=_int(s.get("rank", 0), f"{w}.rank", hi=MAX_RANK),
            values={_str(k, f"{w}.values key", max_len=_MAX_KEY): decode_float(v, f"{w}.values.{k}")  # type: ignore[misc]
                    for k, v in vals.items()},
        ))

    events = []
    for i, e in enumerate(_list(d.get("events") or [], "batch.events", 1_000_000)):
        w = f"batch.events[{i}]"
        e = _obj(e, w)
        _known(e, _EVENT_KEYS, w)
        for k in ("kind", "step", "time"):
            if k not in e:
                raise WireError(f"{w}.{k}: missing")
        kind = e["kind"]
        if type(kind) is not str or kind not in EVENT_KINDS:
            got = repr(kind)[:40] if type(kind) is str else type(kind).__name__
            raise WireError(f"{w}.kind: must be one of {sorted(EVENT_KINDS)}, got {got}")
        data = _dec_value(e.get("data") or {}, f"{w}.data")
        if type(data) is not dict:
            raise WireError(f"{w}.data: expected an object")
        events.append(Event(
            kind=kind,
            step=_int(e["step"], f"{w}.step"),
            time=_finite_time(e["time"], f"{w}.time") or 0.0,
            rank=_int(e.get("rank", 0), f"{w}.rank", hi=MAX_RANK),
            data=data,
        ))

    return Batch(
        run=run,
        seq=_int(d["seq"], "batch.seq"),
        source=_int(d.get("source", 0), "batch.source", hi=MAX_RANK),
        sent_at=_finite_time(d.get("sent_at", 0.0), "batch.sent_at") or 0.0,
        layers=layers,
        steps=steps,
        scalars=scalars,
        events=events,
        status=status,
        lost=lost,
        wire_version=WIRE_VERSION,  # columns converted above: a version-2 batch now
    )


def _lost(v: Any) -> dict[str, int] | None:
    """The end-of-run loss accounting: reason -> records (reasons are short names like ``ENOSPC``)."""
    if v is None:
        return None
    d = _obj(v, "batch.lost")
    if len(d) > MAX_LOST_REASONS:
        raise WireError(f"batch.lost: more than {MAX_LOST_REASONS} reasons")
    return {_str(k, "batch.lost key", max_len=64) or "": _int(n, f"batch.lost.{str(k)[:64]}")
            for k, n in d.items()} or None


def _from_v1(cols: dict[str, Any], n: int, as_array: bool) -> dict[str, Any]:
    """Version-1 columns as version-2 ones: ``m2 = var · numel`` (as exact as the var it was
    sent with), ``wnorm`` and every later nullable field not measured; ``std`` is dropped
    (derived from m2 when read)."""
    m2 = [v * k if v is not None and k is not None else None for v, k in zip(cols["var"], cols["numel"])]
    out = {k: cols[k] for k in LAYER_FIELDS if k in cols}
    out["m2"] = array("d", m2) if as_array and None not in m2 else m2
    for k in LAYER_FIELDS:  # columns version 1 did not have: not measured
        out.setdefault(k, [None] * n)
    return {k: out[k] for k in LAYER_FIELDS}


def decode_batch(data: bytes | str) -> Batch:
    """Parse and validate an encoded batch. Raises :class:`WireError` with a precise message."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"batch: not valid JSON ({e})") from None
    except RecursionError:  # the C parser's own guard, some 1000 levels down
        raise WireError(f"batch: nested too deeply (free-form values hold at most {MAX_DEPTH} levels)") from None
    return batch_from_dict(obj)
