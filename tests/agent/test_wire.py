"""The wire schema: lossless round trips (NaN/±inf included) and precise errors on bad input."""

from __future__ import annotations

import base64
import copy
import json
import math
import random
import struct

import pytest

from gradwatch.agent import wire
from gradwatch.agent.spec import LAYER_FIELDS as LAYER_SPEC
from gradwatch.agent.wire import (
    LAYER_FIELDS,
    WIRE_VERSION,
    Batch,
    Event,
    LayerInfo,
    RunInfo,
    ScalarRecord,
    StepRecord,
    WireError,
    batch_from_dict,
    batch_to_dict,
    decode_batch,
    encode_batch,
    encode_float,
)

SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300, 5e-324]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _random_batch(rng: random.Random, n_layers: int = 5, n_steps: int = 3) -> Batch:
    def f() -> float:
        return rng.choice(SPECIALS) if rng.random() < 0.3 else rng.uniform(-1e3, 1e3)

    layers = [LayerInfo(i, f"block{i}.weight", [rng.randint(1, 9), rng.randint(1, 9)], "float32", sparse=i == 3)
              for i in range(n_layers)]
    steps = []
    for s in range(n_steps):
        ids = sorted(rng.sample(range(n_layers), rng.randint(0, n_layers)))
        cols = {k: ([rng.randint(0, 10**12) for _ in ids] if k in _INTS else [f() for _ in ids])
                for k in LAYER_FIELDS}
        cols["l2_post"] = [None if rng.random() < 0.3 else f() for _ in ids]
        cols["m2"] = [abs(x) for x in cols["m2"]]  # never negative (the decoder refuses it)
        steps.append(StepRecord(step=s, time=1.7e9 + s, rank=rng.randint(0, 3), layer_ids=ids, layers=cols,
                                total_norm=f(), total_norm_post=f(), clip_coef=f(), loss_scale=f(),
                                skipped=rng.random() < 0.5,
                                transforms={"clip_norm": {"coef": f(), "per_layer": [f(), f()]}}))
    return Batch(
        run=RunInfo(run_id="a" * 32, project="p", name="r", config={"lr": f(), "nested": {"x": [f()]}}, tags=["t"],
                    started_at=1.7e9, world_size=2),
        seq=rng.randint(1, 10**9), source=1, sent_at=1.7e9, layers=layers, steps=steps,
        scalars=[ScalarRecord(step=1, time=1.7e9, values={"loss": f(), "acc": None})],
        events=[Event("overflow", 2, 1.7e9, 0, {"scale_before": f(), "layers": ["a", "b"]})],
        status=rng.choice([None, "running", "finished", "crashed"]),
    )


#: the integer per-layer columns (counts), from the spec
_INTS = tuple(f.name for f in LAYER_SPEC if not f.is_float)


@pytest.mark.parametrize("seed", range(50))
def test_round_trip_is_lossless_including_non_finite(seed: int) -> None:
    b = _random_batch(random.Random(seed))
    raw = encode_batch(b)
    # strict JSON: no NaN/Infinity tokens a strict parser would reject
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    back = decode_batch(raw)
    assert _same(batch_to_dict(back), batch_to_dict(b))
    assert back.row_count == b.row_count


def test_layer_columns_come_back_as_floats_and_ints() -> None:
    b = _random_batch(random.Random(1), n_layers=4, n_steps=1)
    s = decode_batch(encode_batch(b)).steps[0]
    for k in ("mean", "m2", "l2", "maxabs", "wnorm"):
        assert all(type(v) is float for v in s.layers[k])
    assert all(type(v) is int for v in s.layers["numel"])


def _valid() -> dict:
    return batch_to_dict(_random_batch(random.Random(7), n_layers=3, n_steps=2))


def _set(d: dict, path: list, value: object) -> dict:
    d = copy.deepcopy(d)
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    if value is _DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["wire_version"], 3, "wire versions [1, 2], got 3"),
        (["wire_version"], 0, "wire versions [1, 2], got 0"),
        (["wire_version"], "1", "wire_version: expected an integer"),
        (["wire_version"], _DELETE, "wire_version: missing"),
        (["seq"], -1, "batch.seq: -1 is out of range"),
        (["seq"], 1.5, "batch.seq: expected an integer"),
        (["run"], _DELETE, "batch.run: missing"),
        (["run", "run_id"], "x/../y", "run_id: must be"),
        (["run", "run_id"], "", "run_id: must be"),
        (["run", "run_id"], "a" * 65, "longer than 64"),
        (["run", "world_size"], 0, "world_size: 0 is out of range"),
        (["status"], "exploded", "batch.status: must be one of"),
        (["bogus"], 1, "unknown field(s) ['bogus']"),
        (["layers", 0, "index"], -3, "batch.layers[0].index"),
        (["layers", 0, "name"], 5, "batch.layers[0].name: expected a string"),
        (["layers", 0, "name"], "a\x00b", "NUL"),
        (["steps", 0, "step"], "ten", "batch.steps[0].step: expected an integer"),
        (["steps", 0, "time"], "NaN", "batch.steps[0].time: must be a finite number"),
        (["steps", 0, "layer_ids"], [0, 0], "contains duplicates"),
        (["steps", 0, "layers", "mean"], "oops", "batch.steps[0].layers.mean: expected a list"),
        (["steps", 0, "layers", "bogus"], [], "unknown column(s) ['bogus']"),
        (["steps", 0, "total_norm"], "big", "total_norm: expected a number or 'NaN'"),
        (["steps", 0, "skipped"], 1, "skipped: expected true or false"),
        (["steps", 0, "transforms"], {"x": 1}, "transforms: expected an object of objects"),
        (["scalars", 0, "values", "loss"], [1], "values.loss: expected a number"),
        (["events", 0, "kind"], "meltdown", "batch.events[0].kind: must be one of"),
        (["events", 0, "step"], _DELETE, "batch.events[0].step: missing"),
        (["steps"], {"a": 1}, "batch.steps: expected a list"),
    ],
)
def test_bad_input_names_the_field(path: list, value: object, message: str) -> None:
    bad = _set(_valid(), path, value)
    with pytest.raises(WireError) as ei:
        wire.batch_from_dict(bad)
    assert message in str(ei.value)


def test_column_length_must_match_layer_ids() -> None:
    d = _valid()
    d["steps"][0]["layer_ids"] = [0, 1, 2]
    d["steps"][0]["layers"] = {k: [1.0, 2.0] for k in LAYER_FIELDS}
    with pytest.raises(WireError, match=r"expected 3 values \(one per entry of layer_ids\), got 2"):
        wire.batch_from_dict(d)


def test_integer_columns_reject_floats_and_negatives() -> None:
    d = _valid()
    d["steps"][0]["layer_ids"] = [0]
    d["steps"][0]["layers"] = {k: [1.0] for k in LAYER_FIELDS}
    d["steps"][0]["layers"]["numel"] = [1.5]
    with pytest.raises(WireError, match=r"layers.numel\[0\]: expected a non-negative integer"):
        wire.batch_from_dict(d)
    d["steps"][0]["layers"]["numel"] = [-1]
    with pytest.raises(WireError, match="non-negative"):
        wire.batch_from_dict(d)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[]", b"null", b'"x"', b"42"])
def test_garbage_is_a_wire_error_not_a_crash(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_batch(raw)


def test_deep_nesting_is_refused() -> None:
    d = _valid()
    v: object = 1
    for _ in range(20):
        v = [v]
    d["run"]["config"] = {"deep": v}
    with pytest.raises(WireError, match="nested too deeply"):
        wire.batch_from_dict(d)


def test_lenient_on_raw_nan_tokens_from_other_encoders() -> None:
    d = _valid()
    text = json.dumps(d).replace('"NaN"', "NaN")
    b = decode_batch(text)
    assert b.seq == d["seq"]


def test_encode_float_rules() -> None:
    assert wire.encode_float(math.nan) == "NaN"
    assert wire.encode_float(math.inf) == "Infinity"
    assert wire.encode_float(-math.inf) == "-Infinity"
    assert wire.encode_float(None) is None
    assert wire.encode_float(1.5) == 1.5
    with pytest.raises(WireError, match="expected a number"):
        wire.decode_float({}, "x")
    with pytest.raises(WireError, match="null is not allowed"):
        wire.decode_float(None, "x", nullable=False)


def _one_layer_step(col: object, name: str = "mean") -> dict:
    d = _valid()
    d["steps"][0]["layer_ids"] = [0, 1]
    d["steps"][0]["layers"] = {k: ([1, 2] if k in _INTS else [1.0, 2.0]) for k in LAYER_FIELDS}
    d["steps"][0]["layers"][name] = col
    return d


def test_agent_sends_packed_columns_and_plain_lists_still_decode() -> None:
    b = _random_batch(random.Random(3), n_layers=4, n_steps=2)
    sent = json.loads(encode_batch(b))
    packed = [c for s in sent["steps"] for c in s["layers"].values() if isinstance(c, dict)]
    assert packed and all(c["dtype"] in ("f8", "i8") for c in packed)
    plain = _one_layer_step([math.inf, 3.0])
    assert wire.batch_from_dict(plain).steps[0].layers["mean"] == [math.inf, 3.0]


@pytest.mark.parametrize(
    ("col", "name", "message"),
    [
        ({"dtype": "f4", "b64": ""}, "mean", "dtype must be 'f8'"),
        ({"dtype": "f8", "b64": ""}, "numel", "dtype must be 'i8'"),
        ({"dtype": "f8", "b64": "!!!"}, "mean", "not valid base64"),
        ({"dtype": "f8", "b64": 5}, "mean", "b64 must be a base64 string"),
        ({"dtype": "f8"}, "mean", "a packed column is"),
        ({"dtype": "f8", "b64": "AAAAAAAA8D8="}, "mean", "expected 2 values (one per entry of layer_ids), got 1"),
        ({"dtype": "i8", "b64": "//////////8AAAAAAAAAAA=="}, "nonfinite", "non-negative"),
    ],
)
def test_packed_column_errors(col: object, name: str, message: str) -> None:
    with pytest.raises(WireError) as ei:
        wire.batch_from_dict(_one_layer_step(col, name))
    assert message in str(ei.value)
    assert f"layers.{name}" in str(ei.value)


def test_layer_ids_fast_check_still_names_the_entry() -> None:
    d = _one_layer_step([1.0, 2.0])
    d["steps"][0]["layer_ids"] = [0, 1.5]
    with pytest.raises(WireError, match=r"layer_ids\[1\]: expected a layer index"):
        wire.batch_from_dict(d)
    d["steps"][0]["layer_ids"] = [0, wire.MAX_LAYERS]
    with pytest.raises(WireError, match=r"layer_ids\[1\]"):
        wire.batch_from_dict(d)


_HUGE = 10**400  # a JSON integer no float64 holds


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["status"], ["running"], "batch.status: must be one of ['crashed', 'finished', 'running'] or null, got list"),
        (["status"], {"a": 1}, "batch.status: must be one of"),
        (["events", 0, "kind"], ["overflow"], "batch.events[0].kind: must be one of"),
        (["events", 0, "kind"], {}, "got dict"),
        (["steps", 0, "time"], _HUGE, "batch.steps[0].time: integer of 401 digits is too large for a float"),
        (["steps", 0, "total_norm"], _HUGE, "batch.steps[0].total_norm: integer of 401 digits"),
        (["scalars", 0, "values", "loss"], -_HUGE, "batch.scalars[0].values.loss: integer of"),
        (["scalars", 0, "time"], _HUGE, "batch.scalars[0].time: integer of"),
        (["events", 0, "time"], _HUGE, "batch.events[0].time: integer of"),
        (["run", "started_at"], _HUGE, "batch.run.started_at: integer of"),
        (["sent_at"], _HUGE, "batch.sent_at: integer of"),
        (["steps", 0, "step"], 2**63, "batch.steps[0].step: 9223372036854775808 is out of range"),
        (["seq"], _HUGE, "batch.seq: 1000000000000000000000000000000000000000 is out of range"),
        (["source"], 2**70, "batch.source: 1180591620717411303424 is out of range [0, 1048576]"),
        (["steps", 0, "rank"], 2**31, "batch.steps[0].rank: 2147483648 is out of range"),
        (["run", "world_size"], 2**40, "batch.run.world_size"),
    ],
    ids=lambda v: str(v)[:24],
)
def test_values_python_cannot_hash_or_convert_are_wire_errors(path: list, value: object, message: str) -> None:
    """Each of these raised TypeError or OverflowError (a 500 on the server) instead of naming the field."""
    bad = _set(_valid(), path, value)
    with pytest.raises(WireError) as ei:
        wire.batch_from_dict(bad)
    assert message in str(ei.value)
    assert len(str(ei.value)) < 300  # a 401-digit number is not echoed back whole


@pytest.mark.parametrize("name", ["mean", "l2_post"])
def test_float_column_integer_too_big_for_a_float_names_the_entry(name: str) -> None:
    with pytest.raises(WireError, match=rf"layers\.{name}\[1\]: integer of 401 digits is too large"):
        wire.batch_from_dict(_one_layer_step([1, _HUGE], name))


@pytest.mark.parametrize("name", ["numel", "nonfinite"])
@pytest.mark.parametrize("value", [2**63, 2**64 + 5, _HUGE], ids=["2**63", "2**64+5", "10**400"])
def test_integer_columns_are_bounded_to_int64(name: str, value: int) -> None:
    """The server stores these as BIGINT; a bigger one overflowed numpy in storage (a 503 the agent retries forever)."""
    with pytest.raises(WireError, match=rf"layers\.{name}\[1\]: \d+ is out of range \[0, 9223372036854775807\]"):
        wire.batch_from_dict(_one_layer_step([1, value], name))
    ok = wire.batch_from_dict(_one_layer_step([1, wire.INT64_MAX], name))
    assert ok.steps[0].layers[name] == [1, wire.INT64_MAX]


def test_json_deeper_than_the_parser_goes_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="batch: nested too deeply"):
        decode_batch(b"[" * 100_000 + b"]" * 100_000)
    d = _valid()
    d["run"]["config"] = {"x": json.loads("[" * 500 + "]" * 500)}
    with pytest.raises(WireError, match=r"batch.run.config.x\[0\]\[0\].*nested too deeply"):
        decode_batch(json.dumps(d))


def test_free_form_values_may_nest_exactly_max_depth_levels() -> None:
    d = _valid()
    v: object = 1
    for _ in range(wire.MAX_DEPTH - 1):
        v = [v]
    d["run"]["config"] = {"deep": v}  # the leaf sits MAX_DEPTH levels below the config object
    assert wire.batch_from_dict(d).run.config == {"deep": v}
    d["run"]["config"] = {"deep": [v]}
    with pytest.raises(WireError, match="nested too deeply"):
        wire.batch_from_dict(d)


def test_validate_run_id_is_the_batch_rule() -> None:
    assert wire.validate_run_id("run-1_a", "hello.run_id") == "run-1_a"
    for bad, msg in [("a\x00b", "NUL"), ("", "must be 1-64"), ("a b", "must be 1-64"), (5, "expected a string"),
                     ("a" * 65, "longer than 64"), ("run²", "ASCII"), ("café", "ASCII")]:
        with pytest.raises(WireError, match=f"hello.run_id: .*{msg}"):
            wire.validate_run_id(bad, "hello.run_id")


def _v1_dict(seed: int) -> tuple[dict, Batch]:
    """A batch as an agent of wire version 1 wrote it: finished var/std, no m2, no wnorm."""
    b = _random_batch(random.Random(seed))
    d = batch_to_dict(b)
    d["wire_version"] = 1
    for s, st in zip(d["steps"], b.steps):
        var = [abs(float(v)) if isinstance(v, float) and v == v else 2.5 for v in st.layers["mean"]]
        cols = {k: st.layers[k] for k in ("numel", "mean", "l2", "maxabs", "nonfinite", "l2_post")}
        cols["var"] = var
        cols["std"] = [v ** 0.5 for v in var]
        s["layers"] = {k: [encode_float(x) for x in v] if k not in ("numel", "nonfinite") else v
                       for k, v in cols.items()}
    return d, b


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("packed", [False, True])
def test_version_1_batches_decode_to_version_2_columns(seed: int, packed: bool) -> None:
    """Spools and .gwrec files of earlier agents keep uploading: m2 = var·numel, wnorm null, and
    the decoded batch re-encodes as a valid version-2 batch."""
    d, b = _v1_dict(seed)
    back = batch_from_dict(json.loads(json.dumps(d)), packed_as_array=packed)
    assert back.wire_version == WIRE_VERSION == 2
    for s, src in zip(back.steps, d["steps"]):
        assert list(s.layers) == list(LAYER_FIELDS)
        var = [wire.decode_float(v, "var") for v in src["layers"]["var"]]
        assert _same([float(x) for x in s.layers["m2"]], [v * n for v, n in zip(var, src["layers"]["numel"])])
        assert list(s.layers["wnorm"]) == [None] * len(s.layer_ids)
    again = decode_batch(encode_batch(back))
    assert again.row_count == b.row_count


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("as_array", [False, True])
def test_negative_m2_is_refused(packed: bool, as_array: bool) -> None:
    def step_m2(values: list[float]) -> dict:
        d = _valid()
        d["steps"][0]["layer_ids"] = list(range(len(values)))
        d["steps"][0]["layers"] = {k: (list(range(len(values))) if k in _INTS else [1.0] * len(values))
                                   for k in LAYER_FIELDS}
        d["steps"][0]["layers"]["m2"] = ({"dtype": "f8", "b64": base64.b64encode(struct.pack(f"<{len(values)}d",
                                                                                          *values)).decode()}
                                         if packed else [wire.encode_float(v) for v in values])
        return d

    neg_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000001))[0]  # a NaN with its sign bit set
    for bad in ([1.0, -1e-30], [-0.0, -math.inf], [neg_nan, -5e-324]):
        with pytest.raises(WireError, match=r"layers\.m2: a centred second moment is never negative"):
            batch_from_dict(step_m2(bad), packed_as_array=as_array)
    ok = [0.0, -0.0, 2.0, math.inf, math.nan, neg_nan]  # -0.0 is zero; NaN compares False: data
    got = batch_from_dict(step_m2(ok), packed_as_array=as_array).steps[0].layers["m2"]
    assert [repr(float(x)) for x in got] == [repr(x) for x in ok]


def test_version_1_still_refuses_version_2_columns() -> None:
    d, _ = _v1_dict(0)
    step = next(s for s in d["steps"] if s["layer_ids"])
    step["layers"]["m2"] = [1.0] * len(step["layer_ids"])
    with pytest.raises(WireError, match="unknown column"):
        batch_from_dict(d)
