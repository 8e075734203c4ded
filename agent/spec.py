"""The declared statistics schema (stdlib only): every recorded field written out once.

Each per-layer and per-step field is one :class:`Field` line below: its name, storage type, unit,
one-line meaning, NaN/inf policy, how two measurements of it merge (across DDP ranks or
micro-batches of one tensor) and where it is exposed. The wire columns, the server's ORM columns,
its COPY types, the 64-step rollup, the series/live/export allow-lists and the field descriptions
of ``/openapi.json`` are all derived from these tuples, so adding a statistic is one line here
plus one migration (``docs/statistics.md`` says what each one means and how it is computed).

Moments travel exact and mergeable: ``numel``, ``mean`` and the centred second moment ``m2``
(sum of squared deviations from the mean). Variance and std are derived when read
(:data:`DERIVED_LAYER_FIELDS`), and any set of moments (ranks, the steps of a rollup block, a
query bucket) merges with one function, :func:`merge_moments` (Chan et al.'s pairwise update).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Field",
    "Derived",
    "LAYER_FIELDS",
    "LAYER_FIELD_NAMES",
    "LAYER_FLOAT_FIELDS",
    "DERIVED_LAYER_FIELDS",
    "SERIES_LAYER_STATS",
    "ROLLUP_COUNTS",
    "ROLLUP_STATS",
    "STEP_FIELDS",
    "STEP_FLOAT_FIELDS",
    "EXPOSE_ALL",
    "Moments",
    "merge_moments",
    "merge_all",
    "moments_var",
    "std_of",
    "layer_field",
    "with_derived",
    "TransformValue",
    "TRANSFORM_VALUES",
]

#: Where a field may be read: REST series, the live stream, exports.
EXPOSE_ALL = frozenset({"rest", "live", "export"})

#: Merge rules across ranks or micro-batches of one tensor.
#: ``sum``: counts add. ``max``: the larger (NaN wins). ``rss``: norms, root of the sum of squares.
#: ``moments``: (numel, mean, m2) merge together with :func:`merge_moments`. ``min``: the smaller
#: (NaN wins). ``whole``: not mergeable from parts (measured on the whole tensor; DDP ranks hold
#: the same all-reduced value).
MERGES = frozenset({"sum", "max", "rss", "moments", "min", "whole"})

#: NaN/inf policies. ``data``: NaN and ±inf are stored and served as they are (NaN as NULL plus a
#: mask bit). ``never``: an integer count, always finite.
POLICIES = frozenset({"data", "never"})


@dataclass(frozen=True, slots=True)
class Field:
    """One recorded value. ``nullable``: may be absent (null on the wire: not measured)."""

    name: str
    dtype: str  # "f8" (float64) or "i8" (int64)
    unit: str
    doc: str
    merge: str
    nonfinite: str = "data"
    nullable: bool = False
    expose: frozenset[str] = EXPOSE_ALL
    rollup: bool = True  # kept in the rollup levels (min/max/sum/count/NaN count per block)

    @property
    def is_float(self) -> bool:
        return self.dtype == "f8"


@dataclass(frozen=True, slots=True)
class Derived:
    """A per-layer value computed from stored fields when read (never stored, never sent).

    ``sql`` is a dialect-neutral expression over the stored columns; NaN in its inputs (NULL plus
    a mask bit) makes it NaN: ``nan_from`` names the stored field whose mask bit it inherits."""

    name: str
    unit: str
    doc: str
    sql: str
    nan_from: str
    expose: frozenset[str] = EXPOSE_ALL


# ---------------------------------------------------------------------------------------------
# per layer: one row per (layer, step, rank); measured before the transforms unless said so

LAYER_FIELDS: tuple[Field, ...] = (
    Field("numel", "i8", "elements", "element count of the gradient (nonzeros of a sparse one)", "sum", "never",
          rollup=False),
    Field("mean", "f8", "grad units", "mean of the gradient's elements", "moments"),
    Field("m2", "f8", "grad units²", "centred second moment: sum of squared deviations from the mean "
          "(variance = m2 / numel)", "moments"),
    Field("l2", "f8", "grad units", "L2 norm of the gradient", "rss"),
    Field("maxabs", "f8", "grad units", "largest absolute element", "max"),
    Field("nonfinite", "i8", "elements", "count of NaN and ±inf elements", "sum", "never"),
    Field("l2_post", "f8", "grad units", "L2 norm after the transforms (null: no transform ran)", "rss",
          nullable=True),
    Field("wnorm", "f8", "weight units", "L2 norm of the parameter itself (‖w‖; ‖g‖/‖w‖ is the LARS/AGC ratio); "
          "null from agents that did not send it", "rss", nullable=True),
    Field("noise_scale", "f8", "examples", "this layer's gradient noise scale B_simple = EMA(tr Σ)/EMA(|G|²) from its "
          "local (per-rank) and all-reduced gradient norms under DDP (docs/noise_scale.md; per-rank batches when "
          "the batch size was not given); null: not measured or not settled yet", "max", nullable=True),
    # loss-scale headroom and optimizer-aware signals (docs/statistics.md, "Loss-scale headroom")
    Field("zeros", "i8", "elements", "count of exactly-zero elements (dead units: zeros / numel); null from agents "
          "that did not send it", "sum", "never", nullable=True),
    Field("headroom", "f8", "powers of two", "overflow headroom of the scaled gradient: log2(65504 / (maxabs · S)), "
          "S the loss scale the backward used (< 0: it overflowed fp16); null without a loss scaler", "min",
          nullable=True),
    Field("underflow", "i8", "elements", "non-zero elements whose scaled magnitude |g·S| is below fp16's smallest "
          "normal 2^-14 (share: underflow / (numel − zeros)); null without a loss scaler", "sum", "never",
          nullable=True),
    Field("mom_cos", "f8", "cosine", "cosine between the gradient and the optimizer's momentum buffer before the step "
          "(SGD momentum_buffer, Adam/AdamW exp_avg); null where the optimizer keeps none", "whole", nullable=True),
    Field("upd_ratio", "f8", "ratio", "relative update ‖Δw‖/‖w‖ of the step (Adam/AdamW and SGD with momentum: "
          "exact from their state; other optimizers: |‖w_new‖ − ‖w‖| / ‖w‖, a lower bound); null on skipped steps",
          "whole", nullable=True),
)
LAYER_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in LAYER_FIELDS)
#: Stored float fields in nan_mask bit order (bit k for the k-th).
LAYER_FLOAT_FIELDS: tuple[str, ...] = tuple(f.name for f in LAYER_FIELDS if f.is_float)

DERIVED_LAYER_FIELDS: tuple[Derived, ...] = (
    Derived("var", "grad units²", "population variance of the gradient's elements (m2 / numel; 0 when empty)",
            "CASE WHEN numel > 0 THEN m2 / numel ELSE 0.0 END", "m2"),
    Derived("std", "grad units", "population standard deviation (√var)",
            "CASE WHEN numel > 0 THEN sqrt(abs(m2) / numel) ELSE 0.0 END", "m2"),
)

#: Per-layer statistics a series, the live stream or an export may name.
SERIES_LAYER_STATS: tuple[str, ...] = (
    *(f.name for f in LAYER_FIELDS if not f.is_float), *(n for n in LAYER_FLOAT_FIELDS if n != "m2"),
    *(d.name for d in DERIVED_LAYER_FIELDS))
#: Statistics the rollup levels keep min/max/sum/count/NaN-count of: the float ones (derived ones
#: included), then the counts (non-finite, zero and underflowing elements: a heatmap of them over a
#: long run reads blocks, not rows). Appended in this order, so a new one adds columns at the end.
#: The integer ones among them (their block aggregates are whole numbers).
ROLLUP_COUNTS: tuple[str, ...] = tuple(f.name for f in LAYER_FIELDS if not f.is_float and f.rollup)
ROLLUP_STATS: tuple[str, ...] = (
    *(s for s in SERIES_LAYER_STATS if s in LAYER_FLOAT_FIELDS or s not in LAYER_FIELD_NAMES), *ROLLUP_COUNTS)


def layer_field(name: str) -> Field | Derived:
    """The declaration of a per-layer statistic, stored or derived (KeyError if unknown)."""
    for f in LAYER_FIELDS:
        if f.name == name:
            return f
    for d in DERIVED_LAYER_FIELDS:
        if d.name == name:
            return d
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# per step: one row per (step, rank)

STEP_FIELDS: tuple[Field, ...] = (
    Field("total_norm", "f8", "grad units", "L2 norm of all measured gradients together, before the transforms",
          "rss", nullable=True),
    Field("total_norm_post", "f8", "grad units", "the same after the transforms (null: none ran)", "rss",
          nullable=True),
    Field("clip_coef", "f8", "ratio", "coefficient a global clipper multiplied the gradients by", "max",
          nullable=True),
    Field("loss_scale", "f8", "factor", "the loss scaler's scale at this step", "max", nullable=True),
    Field("noise_scale", "f8", "examples", "gradient noise scale B_simple = noise_trace / noise_g2 over all measured "
          "layers under DDP (docs/noise_scale.md; per-rank batches when the batch size was not given); null before "
          "10 updates or while noise_g2 <= 0", "max", nullable=True),
    Field("noise_g2", "f8", "grad units²", "bias-corrected EMA of the unbiased estimate of the true gradient's |G|²",
          "max", nullable=True),
    Field("noise_trace", "f8", "grad units²·examples", "bias-corrected EMA of the unbiased estimate of tr Σ, the "
          "per-example gradient covariance's trace (per-rank batches when the batch size was not given)", "max",
          nullable=True),
)
#: Step float fields in nan_mask bit order.
STEP_FLOAT_FIELDS: tuple[str, ...] = tuple(f.name for f in STEP_FIELDS)


# ---------------------------------------------------------------------------------------------
# moments


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and centred second moment of a set of values (exact to rounding; mergeable)."""

    n: int
    mean: float
    m2: float

    @property
    def var(self) -> float:
        """Population variance (0 for an empty set)."""
        return moments_var(self.n, self.m2)


def moments_var(n: int, m2: float) -> float:
    """Population variance from count and M2 (0 for an empty set)."""
    return m2 / n if n > 0 else 0.0


def std_of(var: float) -> float:
    """√var, NaN and inf passed through."""
    return math.sqrt(var) if var == var and var >= 0 else var


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan, Golub & LeVeque's pairwise update: the moments of the union of two sets.

    ``m2 = m2_a + m2_b + δ²·n_a·n_b/n`` with ``δ = mean_b − mean_a``; no cancellation, so the
    merged variance is as exact as its parts. NaN and ±inf propagate (an infinite mean gives a
    NaN m2, as a two-pass reference does). An empty side leaves the other unchanged."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    if a.mean == b.mean:  # also keeps +inf + +inf at inf (inf - inf would be NaN)
        return Moments(n, a.mean, a.m2 + b.m2)
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    return Moments(n, mean, a.m2 + b.m2 + delta * delta * (a.n * b.n / n))


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Fold :func:`merge_moments` over ``parts`` (ranks, steps of a block, blocks of a bucket)."""
    out = Moments(0, 0.0, 0.0)
    for p in parts:
        out = merge_moments(out, p)
    return out


def with_derived(cols: dict[str, Any]) -> dict[str, Any]:
    """Per-layer columns (wire form) plus the derived ``var`` and ``std`` (None where m2 is)."""
    var = [None if q is None else moments_var(n or 0, q) for n, q in zip(cols["numel"], cols["m2"])]
    std = [None if v is None else std_of(v) for v in var]
    return {**cols, "var": var, "std": std}


# ---------------------------------------------------------------------------------------------
# transforms: what each one reports per step (``docs/transforms.md`` says how it computes them)


@dataclass(frozen=True, slots=True)
class TransformValue:
    """One value a transform reports per recorded step. ``per_layer``: a list aligned with the
    step's layers (kept with the step record); otherwise one number, stored as a series the
    server serves at ``/runs/{id}/transforms``, in live messages and in the export."""

    name: str
    unit: str
    doc: str
    per_layer: bool = False


def _tv(name: str, unit: str, doc: str, per_layer: bool = False) -> TransformValue:
    return TransformValue(name, unit, doc, per_layer)


_SKIPPED = _tv("skipped_update", "flag", "1 when the gradients were not finite and the state was not updated")
_LAYERS = _tv("layers", "flag", "1 for each layer the transform changed", per_layer=True)

#: Reported values per transform name. Settings that never change (max_norm, clip_value's
#: bound...) are not sent per step: they go once into the run's config (``Transform.settings``,
#: under ``gradwatch.transforms``).
TRANSFORM_VALUES: dict[str, tuple[TransformValue, ...]] = {
    "clip_norm": (_tv("total_norm", "grad units", "total norm before clipping"),
                  _tv("total_norm_post", "grad units", "total norm after clipping"),
                  _tv("coef", "ratio", "clip coefficient min(1, max_norm/(total+1e-6))")),
    "clip_value": (_tv("clipped", "elements", "elements clamped, per layer", per_layer=True),),
    "agc": (_tv("clipped_units", "units", "output units clipped, per layer", per_layer=True),
            _tv("min_coef", "ratio", "smallest unit coefficient, per layer", per_layer=True), _LAYERS),
    "zclip": (_tv("norm", "grad units", "total norm x_t"), _tv("threshold", "grad units", "clipping threshold"),
              _tv("coef", "ratio", "coefficient applied"), _tv("mean", "grad units", "EMA of the norm"),
              _tv("std", "grad units", "EMA standard deviation of the norm"),
              _tv("z", "z-score", "z-score of the norm (NaN during warm-up)"),
              _tv("spike", "flag", "1 when z exceeded the threshold"), _tv("warmup", "flag", "1 during warm-up"),
              _SKIPPED),
    "autoclip": (_tv("norm", "grad units", "total norm x_t"),
                 _tv("threshold", "grad units", "the percentile of the norm history"),
                 _tv("coef", "ratio", "coefficient applied (smallest one per parameter)"),
                 _tv("history_len", "steps", "norms in the history"),
                 _tv("layer_coef", "ratio", "per-parameter mode: coefficient per layer", per_layer=True),
                 _tv("layer_threshold", "grad units", "per-parameter mode: threshold per layer", per_layer=True),
                 _SKIPPED),
    "autoscaled_norm": (_tv("alpha", "ratio", "the global multiplier α_t"),
                        _tv("sigma", "grad units", "global std σ_t of the eligible gradients"),
                        _tv("sigma_ref", "grad units", "reference std σ_ref"), _SKIPPED, _LAYERS),
    "centralize": (_LAYERS, _SKIPPED),
    "zscore_norm": (_tv("amplification", "ratio", "1/(std+eps) applied, per layer", per_layer=True), _LAYERS,
                    _SKIPPED),
}
