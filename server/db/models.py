"""Tables. Timestamps are float epoch seconds (the agent's clock), identical on both databases.

The statistics columns of ``layer_stat``, ``step_record`` and ``layer_stat_block`` are derived
from the declared spec (:mod:`gradwatch.agent.spec`); a migration must follow any change there
(``tests/migrations`` fails while the migration head and the spec differ).

Layout notes (``docs/storage.md``): per-layer statistics are the big table, keyed by a
compact integer ``layer_id`` so one layer's series is one contiguous key range (SQLite stores it
``WITHOUT ROWID``, clustered on the key). Non-finite values: NaN is stored as NULL with bit *i*
of ``nan_mask`` set (SQLite cannot store NaN; PostgreSQL can, but both encode it the same way so
the API cannot differ); ±inf are stored natively. NULL without the bit means "not measured".
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from gradwatch.agent.spec import LAYER_FIELDS, LAYER_FLOAT_FIELDS, ROLLUP_STATS, STEP_FLOAT_FIELDS
from gradwatch.server.db.base import Base, BigIntPK

#: Float columns of ``layer_stat`` in nan_mask bit order.
LAYER_FLOAT_COLUMNS: tuple[str, ...] = LAYER_FLOAT_FIELDS
#: Float columns of ``step_record`` in nan_mask bit order.
STEP_FLOAT_COLUMNS: tuple[str, ...] = STEP_FLOAT_FIELDS
#: SQL type of a spec dtype.
SQL_TYPES: dict[str, Any] = {"f8": Double, "i8": BigInteger}

RUN_ID_LEN = 64


class Run(Base):
    __tablename__ = "run"

    id: Mapped[str] = mapped_column(String(RUN_ID_LEN), primary_key=True)
    project: Mapped[str] = mapped_column(String(512), default="default")
    name: Mapped[str | None] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), default="running")
    config: Mapped[dict | None] = mapped_column(JSON)
    tags: Mapped[list | None] = mapped_column(JSON)
    notes: Mapped[str | None] = mapped_column(Text)
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    #: Steps below this (a multiple of ``COARSE_STEPS``) are in ``layer_stat_coarse``, exactly;
    #: above it the coarse level is not kept and reads take the 64-step blocks (``docs/storage.md``).
    coarse_through: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    __table_args__ = (
        Index("ix_run_project_created_at", "project", "created_at"),
        Index("ix_run_created_at", "created_at"),
    )


class Layer(Base):
    __tablename__ = "layer"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(512))
    shape: Mapped[list | None] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(32), default="")
    sparse: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        UniqueConstraint("run_id", "idx"),
        Index("ix_layer_run_id_name", "run_id", "name"),
    )


#: One row per (layer, step, rank): the big table. No FK (checked per row on SQLite). Its
#: statistics columns are the spec's per-layer fields, in spec order.
layer_stat = Table(
    "layer_stat",
    Base.metadata,
    Column("layer_id", BigInteger, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("rank", Integer, nullable=False),
    *[Column(f.name, SQL_TYPES[f.dtype], nullable=True) for f in LAYER_FIELDS],
    Column("nan_mask", Integer, nullable=False, default=0),
    PrimaryKeyConstraint("layer_id", "step", "rank"),
    sqlite_with_rowid=False,
)
#: ``layer_stat``'s columns in table order (what bulk inserts write).
LAYER_STAT_COLUMNS: tuple[str, ...] = tuple(c.name for c in layer_stat.columns)


class LayerStat(Base):
    __table__ = layer_stat


class StepRecord(Base):
    __tablename__ = "step_record"

    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    time: Mapped[float] = mapped_column(Double)
    total_norm: Mapped[float | None] = mapped_column(Double)
    total_norm_post: Mapped[float | None] = mapped_column(Double)
    clip_coef: Mapped[float | None] = mapped_column(Double)
    loss_scale: Mapped[float | None] = mapped_column(Double)
    noise_scale: Mapped[float | None] = mapped_column(Double)
    noise_g2: Mapped[float | None] = mapped_column(Double)
    noise_trace: Mapped[float | None] = mapped_column(Double)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    nan_mask: Mapped[int] = mapped_column(Integer, default=0)
    transforms: Mapped[dict | None] = mapped_column(JSON)

    __table_args__ = (
        PrimaryKeyConstraint("run_id", "step", "rank"),
        {"sqlite_with_rowid": False},
    )


class Scalar(Base):
    __tablename__ = "scalar"

    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    time: Mapped[float] = mapped_column(Double)
    value: Mapped[float | None] = mapped_column(Double)
    is_nan: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        PrimaryKeyConstraint("run_id", "key", "step", "rank"),
        {"sqlite_with_rowid": False},
    )


class TransformValue(Base):
    """One scalar a transform reported at one step and rank (``agent.spec.TRANSFORM_VALUES``):
    a long table, so the server needs no per-transform schema. NaN: NULL with ``is_nan``.
    Per-layer lists stay in ``step_record.transforms``."""

    __tablename__ = "transform_value"

    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    transform: Mapped[str] = mapped_column(String(128))
    field: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    value: Mapped[float | None] = mapped_column(Double)
    is_nan: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        PrimaryKeyConstraint("run_id", "transform", "field", "step", "rank"),
        {"sqlite_with_rowid": False},
    )


class Event(Base):
    __tablename__ = "event"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    time: Mapped[float] = mapped_column(Double)
    data: Mapped[dict | None] = mapped_column(JSON)
    #: ``agent`` (sent in a batch) or ``detector`` (found by the server, ``server/detect``).
    source: Mapped[str] = mapped_column(String(16), default="agent", server_default="agent")
    #: ``info``, ``warning`` or ``critical`` (detector events; agent events: by kind).
    severity: Mapped[str | None] = mapped_column(String(16))
    #: Names of the layers the event is about.
    layers: Mapped[list | None] = mapped_column(JSON)
    #: One line a person can read.
    message: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_event_run_id_step", "run_id", "step"),
        Index("ix_event_run_id_kind_step", "run_id", "kind", "step"),
    )


class IngestBatch(Base):
    """Every stored batch, keyed for idempotency; the step range lets live readers find its rows."""

    __tablename__ = "ingest_batch"

    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    source: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[float] = mapped_column(Double)
    rows: Mapped[int] = mapped_column(Integer)
    step_min: Mapped[int | None] = mapped_column(BigInteger)
    step_max: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (PrimaryKeyConstraint("run_id", "source", "seq"),)


class IngestCursor(Base):
    """Highest contiguous seq stored per (run, source): what the server acknowledges."""

    __tablename__ = "ingest_cursor"

    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    source: Mapped[int] = mapped_column(Integer)
    acked: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (PrimaryKeyConstraint("run_id", "source"),)


#: Steps per rollup block. Downsampled reads whose bucket width is at least this read blocks
#: instead of rows (64x fewer), which keeps a 1,000-point series or a 200-layer heatmap over
#: millions of rows fast on both databases regardless of the heap's physical order.
BLOCK_STEPS = 64
#: Aggregates kept per float statistic (stored or derived: :data:`ROLLUP_STATS`) in ``layer_stat_block``.
BLOCK_AGGS: tuple[tuple[str, Any], ...] = (("min", Double), ("max", Double), ("sum", Double), ("cnt", Integer),
                                           ("nan", Integer))

def _rollup_table(name: str) -> Table:
    """A rollup level: one row per (layer, block, rank) with min/max/sum/count/NaN-count of every
    float statistic and the block's pooled gradient moments (``docs/storage.md``). On PostgreSQL
    its pages are half filled (migration 0010): ingest rewrites these rows in place."""
    return Table(
        name,
        Base.metadata,
        Column("layer_id", BigInteger, nullable=False),
        Column("block", BigInteger, nullable=False),
        Column("rank", Integer, nullable=False),
        Column("step_min", BigInteger, nullable=False),
        Column("step_max", BigInteger, nullable=False),
        Column("n", Integer, nullable=False),
        *[Column(f"{stat}_{agg}", typ, nullable=agg in ("min", "max", "sum"))
          for stat in ROLLUP_STATS for agg, typ in BLOCK_AGGS],
        # the block's gradient elements pooled over its steps (finite rows; mom_skip counts the others)
        Column("mom_n", BigInteger, nullable=False),
        Column("mom_mean", Double, nullable=True),
        Column("mom_m2", Double, nullable=True),
        Column("mom_skip", Integer, nullable=False),
        PrimaryKeyConstraint("layer_id", "block", "rank"),
        sqlite_with_rowid=False,
    )


layer_stat_block = _rollup_table("layer_stat_block")

#: Steps per coarse rollup block (``COARSE_FACTOR`` 64-step blocks). A heatmap of hundreds of
#: layers over 100,000+ steps reads these: 500 layers × 100,000 steps are ~49k coarse rows
#: instead of ~780k blocks. Kept only below each run's ``run.coarse_through`` watermark: a batch
#: that takes its run's steps into a new coarse block computes the finished ones below it from
#: their 64-step blocks once; a batch that lands below the watermark merges into them.
COARSE_FACTOR = 16
COARSE_STEPS = BLOCK_STEPS * COARSE_FACTOR
layer_stat_coarse = _rollup_table("layer_stat_coarse")
#: The rollup levels, finest first: (steps per block, table name).
ROLLUP_LEVELS: tuple[tuple[int, str], ...] = ((BLOCK_STEPS, "layer_stat_block"), (COARSE_STEPS, "layer_stat_coarse"))


class ProjectRules(Base):
    """A project's detector thresholds and alert webhook (``server/detect/rules.py``); a project
    without a row uses the defaults."""

    __tablename__ = "project_rules"

    project: Mapped[str] = mapped_column(String(512), primary_key=True)
    rules: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Double)


class DetectorState(Base):
    """Per-run detector state (JSON text of ``server/detect/engine.py``'s dict), locked by the
    transaction that stores a batch, so each step is evaluated once across server processes."""

    __tablename__ = "detector_state"

    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(Text)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[float] = mapped_column(Double)


class AlertOutbox(Base):
    """One webhook delivery to make: written with its event in the storing transaction, sent by
    the alert workers (``server/detect/alerts.py``), so ingest never waits on a receiver."""

    __tablename__ = "alert_outbox"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(512))
    run_id: Mapped[str] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict] = mapped_column(JSON)
    #: ``pending``, ``delivered`` or ``failed`` (attempts exhausted).
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: When a worker may (re)try it; a worker claims it by moving this past its own delivery time.
    next_attempt_at: Mapped[float] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    delivered_at: Mapped[float | None] = mapped_column(Double)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_alert_outbox_status_next", "status", "next_attempt_at"),
        Index("ix_alert_outbox_project_id", "project", "id"),
    )


class AlertAttempt(Base):
    """Every delivery attempt of an outbox row, successful or not."""

    __tablename__ = "alert_attempt"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    outbox_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("alert_outbox.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    time: Mapped[float] = mapped_column(Double)
    duration: Mapped[float] = mapped_column(Double)
    ok: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_alert_attempt_outbox_id", "outbox_id"),)
