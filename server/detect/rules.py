"""Per-project detector thresholds and alert webhook: the body of ``GET|PUT /projects/{p}/rules``.

Every default carries its reason (shown in ``/docs`` and in ``docs/detectors.md``). Unknown
fields are refused (a typo must not silently leave a default in force).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="run this detector")


class SpikeRule(_Rule):
    window: int = Field(default=50, ge=5, le=1000, description=(
        "span in recorded steps of each layer's moving averages of log-norm and its deviation; 50 "
        "averages enough batches to make the noise level stable yet forgets the first steps' large "
        "norms, and absorbs a lasting level change (a new LR phase), after a short while"))
    warmup: int = Field(default=20, ge=3, le=1000, description=(
        "values needed before judging; with fewer the deviation estimate is too noisy and the first "
        "steps' rapid norm changes would be flagged"))
    z: float = Field(default=6.0, gt=0, le=1000, description=(
        "robust z-score (log-norm minus its moving average, over sqrt(pi/2) x the mean absolute "
        "deviation) to exceed; 6 sigmas is ~1e-9 for a normal signal, so a healthy run stays quiet"))
    min_factor: float = Field(default=3.0, gt=1, le=1e12, description=(
        "also at least this many times the average level; a layer whose norm is very steady has a "
        "tiny deviation, and a 20 % wiggle must not count"))
    cooldown: int = Field(default=20, ge=0, le=100_000, description=(
        "recorded steps after a spike before the same layer can spike again (one incident, one event)"))
    total: bool = Field(default=True, description="also watch the step's total norm (named '(total)')")

    @model_validator(mode="after")
    def _warmup_fits(self) -> SpikeRule:
        if self.warmup > self.window:
            raise ValueError(f"spike.warmup ({self.warmup}) must not exceed spike.window ({self.window})")
        return self


class TrendRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baseline_steps: int = Field(default=20, ge=1, le=10_000, description=(
        "first recorded finite norms whose median is a layer's early level; 20 is past the "
        "initialisation transient yet early enough to be the healthy state"))


class VanishingRule(_Rule):
    factor: float = Field(default=1000.0, gt=1, le=1e30, description=(
        "below the early level by this factor; healthy training often shrinks norms 10-100x as the "
        "loss falls, three decades means the layer stopped learning"))
    window: int = Field(default=50, ge=1, le=100_000, description=(
        "for this many consecutive recorded steps (one low batch is not a trend)"))


class ExplodingRule(_Rule):
    factor: float = Field(default=30.0, gt=1, le=1e30, description=(
        "above the early level by this factor (non-finite norms count as above); healthy runs rise a "
        "few times at most as they leave the initialisation, divergence goes far beyond"))
    window: int = Field(default=10, ge=1, le=100_000, description=(
        "for this many consecutive recorded steps: short, divergence compounds fast"))


class DeadRule(_Rule):
    steps: int = Field(default=20, ge=1, le=100_000, description=(
        "recorded steps in a row with an exactly-zero or missing gradient (after the layer had one); "
        "a genuinely trained layer never has an exactly-zero norm, 20 rules out a sparse batch"))


class ScaleCollapseRule(_Rule):
    floor: float = Field(default=1.0, gt=0, le=1e38, description=(
        "loss scale below this; under 1 the scaler shrinks the gradients, i.e. they overflow fp16 "
        "even unscaled: mixed precision no longer protects anything"))
    backoffs: int = Field(default=3, ge=1, le=100_000, description=(
        "at least this many backoffs within the window (one overflow is routine, repeated ones are not)"))
    window: int = Field(default=200, ge=1, le=10_000_000, description=(
        "steps over which backoffs are counted; a tenth of torch's growth interval of 2000"))


class ClipSaturationRule(_Rule):
    share: float = Field(default=0.5, gt=0, lt=1, description=(
        "clip coefficient below 1 on more than this share of recent steps; past half, the clip sets "
        "the step size more often than the learning rate does"))
    window: int = Field(default=100, ge=2, le=100_000, description="recent recorded steps the share is taken over")


Severity = Literal["info", "warning", "critical"]


class Alerts(BaseModel):
    """The project's webhook: each detector event at or above ``min_severity`` is POSTed as JSON
    with a Slack-compatible ``text`` field."""

    model_config = ConfigDict(extra="forbid")

    webhook_url: str | None = Field(default=None, max_length=2048, description="http(s) URL; null: no alerts")
    min_severity: Severity = Field(default="warning", description="'info' events are routine (e.g. a scaler-handled overflow)")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1]) == 0:
            raise ValueError("webhook_url must be an http:// or https:// URL")
        return v


class Rules(BaseModel):
    """A project's rules: each detector's thresholds and the alert webhook; omitted sections keep
    their defaults."""

    model_config = ConfigDict(extra="forbid")

    spike: SpikeRule = SpikeRule()
    trend: TrendRule = TrendRule()
    vanishing: VanishingRule = VanishingRule()
    exploding: ExplodingRule = ExplodingRule()
    dead: DeadRule = DeadRule()
    nonfinite_first: _Rule = _Rule()
    scale_collapse: ScaleCollapseRule = ScaleCollapseRule()
    clip_saturation: ClipSaturationRule = ClipSaturationRule()
    alerts: Alerts = Alerts()
