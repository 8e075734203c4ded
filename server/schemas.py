"""Request and response bodies of the REST API (read views are separate from write actions).

Every list answers in one envelope, ``{"data": [...], "count": n, ...}``; series responses describe
their statistics with the declared spec's meanings and units."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from gradwatch.agent.spec import SERIES_LAYER_STATS, STEP_FIELDS, TRANSFORM_VALUES, layer_field
from gradwatch.agent.wire import MAX_DEPTH
from gradwatch.agent.wire import RUN_ID_PATTERN as _RUN_ID

#: the wire's run-id rule, anchored for pydantic (whose regex engine's ``$`` is the end of the text)
RUN_ID_PATTERN = rf"^{_RUN_ID}$"
MAX_STEP = 2**62


def _no_nul(v: str | None) -> str | None:
    if v is not None and "\x00" in v:
        raise ValueError("must not contain NUL characters")
    return v


def _shallow(v: dict[str, Any]) -> dict[str, Any]:
    """Refuse values nested deeper than the wire lets an agent send them (a run's config is the
    same field either way), before anything walks them recursively."""
    stack: list[tuple[Any, int]] = [(v, 0)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested too deeply (at most {MAX_DEPTH} levels)")
        if isinstance(x, dict):
            stack.extend((y, depth + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, depth + 1) for y in x)
    return v


Text = Annotated[str, AfterValidator(_no_nul)]
Tag = Annotated[str, Field(max_length=128), AfterValidator(_no_nul)]
Number = float | str | None  # non-finite floats travel as "NaN"/"Infinity"/"-Infinity"


class RunRead(BaseModel):
    run_id: str
    project: str
    name: str | None
    status: str
    config: dict[str, Any]
    tags: list[str]
    notes: str | None
    world_size: int
    started_at: Number
    created_at: float
    updated_at: float
    last_step: int | None
    layer_count: int | None = None
    #: Records the agents reported lost before delivery (a spool that could not be written...),
    #: in total and by reason (``{"ENOSPC": 3710}``), from their end-of-run messages.
    lost_records: int = 0
    lost_reasons: dict[str, int] = Field(default_factory=dict)
    #: Event counts, in the runs list only (``GET /runs``).
    overflows: int | None = None
    skipped: int | None = None
    clips: int | None = None
    nonfinite: int | None = None


class RunPage(BaseModel):
    data: list[RunRead]
    count: int
    limit: int
    offset: int


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(None, pattern=RUN_ID_PATTERN)
    project: Annotated[Text, Field(min_length=1, max_length=512)] = "default"
    name: Annotated[Text, Field(max_length=512)] | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=256)
    config: Annotated[dict[str, Any], AfterValidator(_shallow)] = Field(default_factory=dict)
    notes: Annotated[Text, Field(max_length=100_000)] | None = None


class RunUpdate(BaseModel):
    """Only the fields present are changed."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[Text, Field(max_length=512)] | None = None
    tags: list[Tag] | None = Field(None, max_length=256)
    notes: Annotated[Text, Field(max_length=100_000)] | None = None
    status: Literal["running", "finished", "crashed"] | None = None


class LayerRead(BaseModel):
    index: int
    name: str
    shape: list[int]
    dtype: str
    sparse: bool


class EventRead(BaseModel):
    id: int
    kind: str
    step: int
    rank: int
    time: float
    data: dict[str, Any]
    source: str = Field(description="'agent' (sent by the training side) or 'detector' (found by the server)")
    severity: str | None = Field(None, description="'info', 'warning' or 'critical'")
    layers: list[str] = Field(default_factory=list, description="the layers the event names")
    message: str | None = Field(None, description="one readable line (detector events)")


class EventPage(BaseModel):
    data: list[EventRead]
    count: int
    limit: int
    offset: int


# ---------------------------------------------------------------------------------------------
# series responses (field descriptions come from the declared spec, ``agent/spec.py``)


def _stat_doc() -> str:
    return "; ".join(f"{f.name}: {f.doc} [{f.unit}]" for f in (*(layer_field(n) for n in SERIES_LAYER_STATS),))


class Point(BaseModel):
    step: int
    rank: int
    value: Number


class Pooled(BaseModel):
    """All gradient elements of the bucket's steps and ranks, as if concatenated."""

    count: int = Field(description="elements pooled")
    mean: Number
    var: Number = Field(description="population variance of the pooled elements")
    std: Number
    skipped: int = Field(description="rows left out: their mean or M2 was not finite")


class Bucket(BaseModel):
    step_min: int
    step_max: int
    min: Number
    max: Number
    mean: Number = Field(description="mean of the per-step values (NaN when the bucket holds +inf and -inf)")
    count: int = Field(description="rows in the bucket")
    nan: int = Field(description="rows whose value was NaN")
    pooled: Pooled | None = Field(None, description="mean/var/std series only: the pooled moments")


class Series(BaseModel):
    downsampled: bool
    bucket_width: int | None = None
    points: list[Point] | None = Field(None, description="raw values (when not downsampled)")
    buckets: list[Bucket] | None = Field(None, description="min/max/mean buckets (when downsampled)")


class LayerSeries(Series):
    layer: int
    name: str


class StatsResponse(BaseModel):
    run_id: str
    stat: str = Field(description=_stat_doc())
    series: list[LayerSeries]


class HeatmapLayer(BaseModel):
    index: int
    name: str


class HeatmapResponse(BaseModel):
    run_id: str
    layers: list[HeatmapLayer]
    stat: str = Field(description=_stat_doc())
    agg: str
    steps: list[int] = Field(description="first step of each bucket")
    bucket_width: int | None = None
    values: list[list[Number]] = Field(description="values[layer][bucket]")
    nan: list[list[int]] = Field(description="NaN rows per cell")


class StepAgg(BaseModel):
    min: Number
    max: Number
    mean: Number
    nan: int


_STEP_DOCS = {f.name: f"{f.doc} [{f.unit}]" for f in STEP_FIELDS}

StepPoint = create_model(  # type: ignore[call-overload]
    "StepPoint", step=(int, ...), rank=(int, ...), time=(float, ...), skipped=(bool, ...),
    **{n: (Number, Field(None, description=d)) for n, d in _STEP_DOCS.items()})
StepBucket = create_model(  # type: ignore[call-overload]
    "StepBucket", step_min=(int, ...), step_max=(int, ...), count=(int, ...), skipped=(int, ...),
    **{n: (StepAgg | None, Field(None, description=d)) for n, d in _STEP_DOCS.items()})


class StepsResponse(BaseModel):
    run_id: str
    downsampled: bool
    bucket_width: int | None = None
    points: list[StepPoint] | None = None  # type: ignore[valid-type]
    buckets: list[StepBucket] | None = None  # type: ignore[valid-type]


class ScalarsResponse(Series):
    run_id: str
    key: str | None = None
    keys: list[str] | None = Field(None, description="the run's scalar keys (when no key is given)")
    downsampled: bool = False


def _transform_doc() -> str:
    return "; ".join(f"{t}: " + ", ".join(f"{v.name} ({v.doc})" for v in vals if not v.per_layer)
                     for t, vals in TRANSFORM_VALUES.items())


class TransformSeries(Series):
    transform: str
    field: str


class TransformsResponse(BaseModel):
    run_id: str
    transforms: dict[str, list[str]] | None = Field(
        None, description="each transform of the run and the values it reported (no transform asked for). "
        + _transform_doc())
    series: list[TransformSeries] | None = None


class LayerPage(BaseModel):
    data: list[LayerRead]
    count: int
