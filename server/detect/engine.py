"""Detector logic: pure functions of a run's detector state and its next recorded steps.

No database here: :mod:`gradwatch.server.detect.store` loads, locks and saves the state; this
module advances it step by step and returns what fired. The state is O(layers) numbers (no
window of past values is kept), so loading and saving it with every stored batch is cheap, and
one step costs a few numpy operations over all layers at once (``docs/detectors.md``).

Signals are log L2 norms (norms span decades; a ratio is a difference of logs). Per layer, keyed
by its ``layer.id`` (the step's total norm is key :data:`TOTAL_KEY`):

- ``m``, ``s``: an exponential moving average of the log-norm and of its absolute deviation,
  winsorised at the spike threshold (a spike barely moves them; a lasting level change does,
  over about ``spike.window`` steps). Plain running averages during the warm-up.
- ``base``: the median of the first ``trend.baseline_steps`` finite log-norms: the early level.
- ``lo``/``hi``/``z``: consecutive recorded steps below / above the early level by the rule's
  factor, and with an exactly-zero (or, once it had one, missing) gradient.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.server.detect.rules import Rules

#: Key of the step's total gradient norm among the layer keys (``layer.id`` values are positive).
TOTAL_KEY = -1
#: Name the total norm is reported under.
TOTAL_NAME = "(total)"
#: The kinds detectors emit (``event.kind``, with ``source = 'detector'``).
DETECTOR_KINDS = ("spike", "vanishing", "exploding", "dead", "nonfinite_first", "scale_collapse",
                  "clip_saturation")
SEVERITIES = ("info", "warning", "critical")
#: Mean absolute deviation of a normal distribution times this is its standard deviation.
_MEAN_ABS_DEV_SCALE = math.sqrt(math.pi / 2)
_SEVERITY = {"spike": "warning", "vanishing": "warning", "exploding": "critical", "dead": "warning",
             "nonfinite_first": "critical", "scale_collapse": "critical", "clip_saturation": "warning"}
#: Per-layer float arrays of the state (NaN: not yet known) and integer ones.
_F = ("m", "s", "base")
_I = ("n", "bn", "lo", "lo_from", "hi", "hi_from", "z", "z_from", "spike_until", "seen", "nfseen")


@dataclass(frozen=True, slots=True)
class StepInput:
    """One recorded step of the detected rank. ``keys`` (``layer.id``), ``l2`` and ``nonfinite``
    are aligned arrays; a layer missing from ``keys`` had no gradient this step."""

    step: int
    time: float
    keys: np.ndarray
    l2: np.ndarray
    nonfinite: np.ndarray
    total_norm: float | None = None
    clip_coef: float | None = None
    loss_scale: float | None = None
    skipped: bool = False


@dataclass(slots=True)
class Found:
    """An event a detector produced. ``keys`` are the layers' keys (the store names them);
    ``data["layers"]`` maps each key to the numbers that triggered it."""

    kind: str
    step: int
    time: float
    severity: str
    keys: list[int]
    data: dict[str, Any] = field(default_factory=dict)


class State:
    """A run's detector state; :meth:`to_json` / :meth:`from_json` give its stored form (JSON
    with each per-layer array as base64 of its little-endian bytes: cheap to load and save)."""

    def __init__(self) -> None:
        self.last_step: int | None = None
        self.steps = 0
        self.late = 0  # steps skipped because a later one was evaluated first
        self.keys: list[int] = []
        self.pos: dict[int, int] = {}
        self.f = {k: np.zeros(0) for k in _F}
        self.i = {k: np.zeros(0, np.int64) for k in _I}
        self.buf = np.zeros((0, 0))  # baseline values of layers still collecting theirs
        self.scale: float | None = None
        self.backoffs: list[int] = []
        self.collapsed = False
        self.clip: list[int] = []
        self.clip_fired = False

    # -- persistence ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"v": 1, "last_step": self.last_step, "steps": self.steps, "late": self.late, "keys": self.keys,
                "f": {k: _b64(v) for k, v in self.f.items()}, "i": {k: _b64(v) for k, v in self.i.items()},
                # the baseline buffer only while some layer still collects its early level
                **({"buf": _b64(self.buf), "buf_width": self.buf.shape[1]} if np.isnan(self.f["base"]).any()
                   else {"buf": "", "buf_width": 0}), "scale": self.scale,
                "backoffs": self.backoffs, "collapsed": self.collapsed, "clip": self.clip,
                "clip_fired": self.clip_fired}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> State:
        st = cls()
        if not d:
            return st
        st.last_step, st.steps, st.late, st.keys = d["last_step"], d["steps"], d["late"], list(d["keys"])
        st.pos = {k: j for j, k in enumerate(st.keys)}
        st.f = {k: _unb64(d["f"][k], "<f8") for k in _F}
        st.i = {k: _unb64(d["i"][k], "<i8") for k in _I}
        st.buf = _unb64(d["buf"], "<f8").reshape(len(st.keys), d["buf_width"])
        st.scale, st.backoffs, st.collapsed = d["scale"], list(d["backoffs"]), bool(d["collapsed"])
        st.clip, st.clip_fired = list(d["clip"]), bool(d["clip_fired"])
        return st

    # -- layers -----------------------------------------------------------------------------
    def positions(self, keys: np.ndarray, width: int) -> np.ndarray:
        """Positions of ``keys`` in the state's arrays, adding unknown layers."""
        uniq = np.unique(keys)
        new = [k for k in uniq.tolist() if k not in self.pos]
        if not new and self.buf.shape == (len(self.keys), width) and not len(keys):
            return np.zeros(0, np.int64)
        if new:
            for k in new:
                self.pos[k] = len(self.keys)
                self.keys.append(k)
            extra = len(new)
            for k in _F:
                self.f[k] = np.concatenate([self.f[k], np.full(extra, np.nan)])
            for k in _I:
                self.i[k] = np.concatenate([self.i[k], np.zeros(extra, np.int64)])
        if self.buf.shape != (len(self.keys), width):
            buf = np.full((len(self.keys), width), np.nan)
            w = min(width, self.buf.shape[1])
            buf[:self.buf.shape[0], :w] = self.buf[:, :w]
            self.buf = buf
        lut = np.fromiter((self.pos[k] for k in uniq.tolist()), np.int64, len(uniq))
        return lut[np.searchsorted(uniq, keys)]


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode()


def _unb64(s: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype).astype(dtype[1:]).copy()


def _num(v: Any) -> float | int | None:
    if isinstance(v, (np.integer, int)):
        return int(v)
    f = float(v)
    return None if f != f else f


class _Batch:
    """The new steps of one evaluation as (steps × layers) matrices, and what fired, by step."""

    def __init__(self, st: State, steps: list[StepInput], rules: Rules) -> None:
        self.st, self.steps = st, steps
        self.step_no = np.fromiter((s.step for s in steps), np.int64, len(steps))
        t_n = len(steps)
        # column of each layer value: steps of one run mostly carry the same layers in the same
        # order, so positions are looked up once per distinct key list
        cols: list[np.ndarray] = []
        prev_keys: np.ndarray | None = None
        prev_cols = np.zeros(0, np.int64)
        for s in steps:
            if prev_keys is None or not np.array_equal(s.keys, prev_keys):
                prev_keys, prev_cols = s.keys, st.positions(np.asarray(s.keys, np.int64), rules.trend.baseline_steps)
            cols.append(prev_cols)
        totals = [(t, float(s.total_norm)) for t, s in enumerate(steps) if s.total_norm is not None]
        if rules.spike.total and totals:
            st.positions(np.array([TOTAL_KEY], np.int64), rules.trend.baseline_steps)
        st.positions(np.zeros(0, np.int64), rules.trend.baseline_steps)  # (baseline buffer width)
        n_l = len(st.keys)
        self.v = np.full((t_n, n_l), np.nan)
        self.present = np.zeros((t_n, n_l), bool)
        self.nf = np.zeros((t_n, n_l), np.int64)
        counts = [len(c) for c in cols]
        if sum(counts):
            rows = np.repeat(np.arange(t_n), counts)
            flat = np.concatenate(cols)
            self.v[rows, flat] = np.concatenate([s.l2 for s in steps])
            self.present[rows, flat] = True
            self.nf[rows, flat] = np.concatenate([s.nonfinite for s in steps])
        if rules.spike.total and totals:
            j = st.pos[TOTAL_KEY]
            r = np.array([t for t, _ in totals])
            tv = np.array([v for _, v in totals])
            self.v[r, j], self.present[r, j], self.nf[r, j] = tv, True, ~np.isfinite(tv)
        self.found: dict[int, list[Found]] = {}

    def hits(self, kind: str, mask: np.ndarray, numbers: dict[str, np.ndarray],
             severity: Callable[[int, np.ndarray], str] | None = None) -> None:
        """One event per step with any hit in ``mask`` (steps × layers), naming its layers."""
        rows = np.flatnonzero(mask.any(axis=1))
        for t in rows.tolist():
            idx = np.flatnonzero(mask[t]).tolist()
            s = self.steps[t]
            layers = {self.st.keys[j]: {k: _num(v[t, j]) for k, v in numbers.items()} for j in idx}
            sev = severity(t, np.array(idx)) if severity else _SEVERITY[kind]
            self.found.setdefault(t, []).append(
                Found(kind, s.step, s.time, sev, [self.st.keys[j] for j in idx], {"layers": layers}))


def _runs(b: np.ndarray, carry: np.ndarray, carry_from: np.ndarray, steps: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive-true counts of ``b`` (steps × layers) continuing ``carry``, and the step each
    run started at (continuing ``carry_from``)."""
    t_n = b.shape[0]
    idx = np.arange(t_n)[:, None]
    last_false = np.maximum.accumulate(np.where(b, -1, idx), axis=0)
    cont = last_false < 0
    length = np.where(b, np.where(cont, carry[None] + idx + 1, idx - last_false), 0)
    start = steps[np.minimum(last_false + 1, t_n - 1)]
    frm = np.where(cont, np.where(carry[None] > 0, carry_from[None], steps[0]), start)
    return length, frm


def _layers(rules: Rules, st: State, bt: _Batch) -> None:
    f, i, v, pres, nf = st.f, st.i, bt.v, bt.present, bt.nf
    t_n = len(bt.steps)
    steps = bt.step_no
    skipped = np.fromiter((s.skipped for s in bt.steps), bool, t_n)[:, None]
    total_col = st.pos.get(TOTAL_KEY)
    with np.errstate(invalid="ignore", divide="ignore"):
        finite = pres & np.isfinite(v) & (nf == 0)
        nonfin = pres & ~finite
        valid = finite & (v > 0)
        x = np.log(np.where(valid, v, 1.0))

    # nonfinite_first: a layer's first step holding NaN/inf (the total norm is no layer)
    first = nonfin & (np.cumsum(nonfin, axis=0) == 1) & (i["nfseen"] == 0)[None]
    i["nfseen"] |= nonfin.any(axis=0)
    if total_col is not None:
        first[:, total_col] = False
    if rules.nonfinite_first.enabled:
        # a scaler-skipped step: handled, worth knowing, not alarming
        bt.hits("nonfinite_first", first, {"l2": v, "nonfinite": nf},
                lambda t, _: "info" if bt.steps[t].skipped else "critical")

    # dead: exactly zero, or missing after the layer had a gradient
    seen = (i["seen"] > 0)[None] | ((np.cumsum(pres, axis=0) - pres) > 0)
    zero = (finite & (v == 0)) | (~pres & seen)
    i["seen"] |= pres.any(axis=0)
    z, z_from = _runs(zero, i["z"], i["z_from"], steps)
    if rules.dead.enabled:
        bt.hits("dead", z == rules.dead.steps, {"since_step": z_from, "steps": z})
    i["z"], i["z_from"] = z[-1], z_from[-1]

    _spikes(rules, st, bt, x, valid)

    # vanishing / exploding against the early level
    base, k_base = f["base"], rules.trend.baseline_steps
    since = np.where(np.isnan(base), t_n, 0)  # first row each layer's early level applies from
    need = np.isnan(base)
    if need.any():
        cnt = i["bn"][None] + np.cumsum(valid, axis=0)
        fill = valid & need[None] & (cnt <= k_base)
        r, c = np.nonzero(fill)
        st.buf[c, cnt[r, c] - 1] = x[r, c]
        reached = fill & (cnt == k_base)
        done = reached.any(axis=0)
        i["bn"] = np.where(need, np.minimum(cnt[-1], k_base), i["bn"])
        if done.any():
            cols = np.flatnonzero(done)
            base[cols] = np.median(st.buf[cols], axis=1)
            since[cols] = reached[:, cols].argmax(axis=0)
            st.buf[cols] = np.nan
    has = np.arange(t_n)[:, None] >= since[None]
    with np.errstate(invalid="ignore", over="ignore"):
        below = has & valid & (x < base[None] - math.log(rules.vanishing.factor))
        above = has & ((valid & (x > base[None] + math.log(rules.exploding.factor))) | (nonfin & ~skipped))
        ratio = np.where(valid, np.exp(x - base[None]), np.inf)
    for kind, rule, key, beyond in (("vanishing", rules.vanishing, "lo", below),
                                    ("exploding", rules.exploding, "hi", above)):
        run, frm = _runs(beyond, i[key], i[key + "_from"], steps)
        if rule.enabled:
            with np.errstate(over="ignore"):
                bt.hits(kind, run == rule.window, {"norm": v, "early_level": np.broadcast_to(np.exp(base), v.shape),
                                                   "ratio": ratio, "since_step": frm, "steps": run})
        i[key], i[key + "_from"] = run[-1], frm[-1]


def _spikes(rules: Rules, st: State, bt: _Batch, x: np.ndarray, valid: np.ndarray) -> None:
    """The moving averages are a recursion. Layers valid on every step and past their warm-up
    take the block path (:func:`_ema_block`: linear recursion in closed form, stepping one row
    at a time only where winsorising changes it); the others step one row at a time."""
    r, f, i = rules.spike, st.f, st.i
    m, sd, n, until = np.nan_to_num(f["m"]), np.nan_to_num(f["s"]), i["n"].copy(), i["spike_until"].copy()
    hit = np.zeros(x.shape, bool)
    lvl, dev_at, sig_at = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
    t_n = len(bt.steps)
    warm = min(t_n, max(0, r.window - int(n.min()))) if len(n) else 0  # rows until warm-up ends everywhere
    for rows, split in ((slice(0, warm), False), (slice(warm, t_n), True)):
        if rows.start == rows.stop:
            continue
        fast = valid[rows].all(axis=0) & (n >= r.window) if split else np.zeros(len(n), bool)
        for cols, fn in ((np.flatnonzero(fast), _ema_block), (np.flatnonzero(~fast), _ema_steps)):
            if len(cols):
                out = fn(rules, bt.step_no[rows], x[rows, cols], valid[rows, cols], m[cols], sd[cols], n[cols],
                         until[cols])
                m[cols], sd[cols], n[cols], until[cols] = out[:4]
                hit[rows, cols], lvl[rows, cols], dev_at[rows, cols], sig_at[rows, cols] = out[4:]
    f["m"], f["s"], i["n"], i["spike_until"] = m, sd, n, until
    if hit.any() and r.enabled:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            factor = np.exp(dev_at)
            bt.hits("spike", hit, {"norm": bt.v, "level": np.exp(lvl), "factor": factor,
                                   "z": np.where(sig_at > 0, dev_at / sig_at, np.nan)},
                    lambda t, idx: "critical" if float(factor[t, idx].max()) >= 100 else "warning")


_Ema = tuple[np.ndarray, ...]


def _ema_steps(rules: Rules, steps: np.ndarray, x: np.ndarray, valid: np.ndarray, m: np.ndarray, sd: np.ndarray,
               n: np.ndarray, until: np.ndarray) -> _Ema:
    """One row at a time: running means during the warm-up, skipping steps without a value."""
    r = rules.spike
    zs, floor, a_const = r.z * _MEAN_ABS_DEV_SCALE, math.log(r.min_factor), 2.0 / (r.window + 1.0)
    hit, lvl, dev_at, sig_at = (np.zeros(x.shape, bool), np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape))
    for t in range(len(steps)):
        ok = valid[t]
        thr = np.maximum(zs * sd, floor)
        dev = np.where(ok, x[t] - m, 0.0)
        judged = ok & (n >= r.warmup)
        sp = judged & (dev > thr) & (steps[t] >= until)
        if sp.any():
            hit[t], lvl[t], dev_at[t], sig_at[t] = sp, m, dev, _MEAN_ABS_DEV_SCALE * sd
            until = np.where(sp, steps[t] + r.cooldown + 1, until)
        d = np.where(judged, np.clip(dev, -thr, thr), dev)
        a = np.where(n < r.window, 1.0 / (n + 1.0), a_const)
        m = m + a * d
        sd = sd + np.where(n > 0, a, 0.0) * (np.abs(d) - sd) * ok
        n = n + ok
    return m, sd, n, until, hit, lvl, dev_at, sig_at


#: Rows per closed-form piece ((1 - a)^-rows stays far inside float64 for any allowed window).
_BLOCK = 128


def _ema(v: np.ndarray, start: np.ndarray, a: float) -> np.ndarray:
    """Values *before* each row of ``y_k = (1 - a) y_{k-1} + a v_k`` from ``y_{-1} = start``."""
    pw = (1.0 - a) ** np.arange(1, len(v) + 1)[:, None]
    after = pw * (start[None] + a * np.cumsum(v / pw, axis=0))
    return np.concatenate([start[None], after[:-1]])


def _ema_block(rules: Rules, steps: np.ndarray, x: np.ndarray, valid: np.ndarray, m: np.ndarray,
               sd: np.ndarray, n: np.ndarray, until: np.ndarray) -> _Ema:
    """Layers with a value on every row, past the warm-up (constant rate): the recursion without
    winsorising is linear, so compute it in closed form, find the first row where some layer's
    deviation passes its threshold (only there can a spike fire or clipping matter), step that
    row exactly, and continue after it. Same numbers as :func:`_ema_steps` up to rounding."""
    r = rules.spike
    zs, floor, a = r.z * _MEAN_ABS_DEV_SCALE, math.log(r.min_factor), 2.0 / (r.window + 1.0)
    hit, lvl, dev_at, sig_at = (np.zeros(x.shape, bool), np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape))
    t, t_n = 0, len(steps)
    while t < t_n:
        seg = x[t:t + _BLOCK]
        m_prev = _ema(seg, m, a)
        d = seg - m_prev
        s_prev = _ema(np.abs(d), sd, a)
        thr = np.maximum(zs * s_prev, floor)
        over = (np.abs(d) > thr).any(axis=1)
        k = int(over.argmax()) if over.any() else len(seg)
        if k:  # rows before k: nothing clipped, nothing fired
            m = m_prev[k - 1] + a * d[k - 1]
            sd = s_prev[k - 1] + a * (np.abs(d[k - 1]) - s_prev[k - 1])
        if k < len(seg):  # row k exactly
            row = t + k
            th = np.maximum(zs * sd, floor)
            dev = x[row] - m
            sp = (dev > th) & (steps[row] >= until)
            if sp.any():
                hit[row], lvl[row], dev_at[row], sig_at[row] = sp, m, dev, _MEAN_ABS_DEV_SCALE * sd
                until = np.where(sp, steps[row] + r.cooldown + 1, until)
            dc = np.clip(dev, -th, th)
            m = m + a * dc
            sd = sd + a * (np.abs(dc) - sd)
            k += 1
        t += k
    return m, sd, n + t_n, until, hit, lvl, dev_at, sig_at


def _scale(rules: Rules, st: State, s: StepInput, found: list[Found]) -> None:
    r, scale = rules.scale_collapse, s.loss_scale
    if scale is None or not math.isfinite(scale):
        return
    prev, st.scale = st.scale, scale
    if prev is not None and scale < prev:
        st.backoffs.append(s.step)
    while st.backoffs and st.backoffs[0] <= s.step - r.window:
        st.backoffs.pop(0)
    if scale >= r.floor:
        st.collapsed = False
    elif r.enabled and not st.collapsed and len(st.backoffs) >= r.backoffs:
        st.collapsed = True
        found.append(Found("scale_collapse", s.step, s.time, _SEVERITY["scale_collapse"], [],
                           {"loss_scale": scale, "floor": r.floor, "backoffs": len(st.backoffs), "window": r.window}))


def _clip(rules: Rules, st: State, s: StepInput, found: list[Found]) -> None:
    r, coef = rules.clip_saturation, s.clip_coef
    if coef is None or not math.isfinite(coef) or s.skipped:
        return
    st.clip.append(1 if coef < 1.0 - 1e-6 else 0)
    if len(st.clip) > r.window:
        del st.clip[:len(st.clip) - r.window]
    if len(st.clip) < r.window:
        return
    share = sum(st.clip) / len(st.clip)
    if share <= r.share / 2:
        st.clip_fired = False
    elif r.enabled and share > r.share and not st.clip_fired:
        st.clip_fired = True
        found.append(Found("clip_saturation", s.step, s.time, _SEVERITY["clip_saturation"], [],
                           {"share": share, "threshold": r.share, "window": r.window, "clip_coef": coef}))


def evaluate(rules: Rules, st: State, steps: list[StepInput]) -> list[Found]:
    """Advance ``st`` over ``steps`` (any order) and return what fired, in step order.

    Steps at or below ``st.last_step`` were evaluated before (or arrived late) and are skipped
    (counted in ``st.late``): every step is evaluated at most once. The result does not depend
    on how a run's steps are split into calls.
    """
    new: list[StepInput] = []
    for s in sorted(steps, key=lambda s: s.step):
        if st.last_step is not None and s.step <= st.last_step:
            st.late += 1
            continue
        st.last_step = s.step
        new.append(s)
    if not new:
        return []
    st.steps += len(new)
    bt = _Batch(st, new, rules)
    _layers(rules, st, bt)
    for t, s in enumerate(new):
        found: list[Found] = []
        _scale(rules, st, s, found)
        _clip(rules, st, s, found)
        bt.found.setdefault(t, []).extend(found)
    order = {k: j for j, k in enumerate(DETECTOR_KINDS)}
    return [f for t in sorted(bt.found) for f in sorted(bt.found[t], key=lambda f: order[f.kind])]


def message(kind: str, step: int, names: list[str], data: dict[str, Any]) -> str:
    """One line a person can read."""
    who = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    first: dict[str, Any] = next(iter(data.get("layers", {}).values()), data)
    if kind == "spike":
        return f"gradient norm spike at step {step}: {who} ({first['factor']:.3g}x its recent level)"
    if kind in ("vanishing", "exploding"):
        return (f"{kind} gradients since step {first['since_step']}: {who} ({first['ratio']:.3g}x the early "
                f"level for {first['steps']} recorded steps)")
    if kind == "dead":
        return (f"dead gradients since step {first['since_step']}: {who} (zero or missing for "
                f"{first['steps']} recorded steps)")
    if kind == "nonfinite_first":
        return f"first non-finite gradient at step {step}: {who}"
    if kind == "scale_collapse":
        return (f"loss scale collapsed to {first['loss_scale']:.3g} (below {first['floor']:.3g}) after "
                f"{first['backoffs']} backoffs within {first['window']} steps")
    return (f"gradient clipping active on {first['share']:.0%} of the last {first['window']} steps "
            "(the clip is acting as a learning-rate cut)")
