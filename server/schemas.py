"""Request and response bodies of the REST API (read views are separate from write actions)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from gradwatch.agent.wire import MAX_DEPTH

RUN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
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


class EventPage(BaseModel):
    data: list[EventRead]
    count: int
    limit: int
    offset: int
