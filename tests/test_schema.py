"""parse_checkpoint_list: tolerant where the endpoint's spec is, strict on step and checkpoints, and only
ever InvalidResponse (a PollError) on junk."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from watcher.errors import InvalidResponse, PollError
from watcher.hub.schema import body_hash, parse_checkpoint_list

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def checkpoint(step: int, **fields: Any) -> dict[str, Any]:
    return {
        "step": step,
        "created_at": "2025-06-01T12:00:00Z",
        "deployment_status": None,
        "inference_samples": [{"prompt": "hi", "completion": "hello"}],
        "metrics": {"epoch": 0.5, "grad_norm": 1.25, "learning_rate": 2e-5, "loss": 0.75, "mean_token_accuracy": 0.6},
        "model_id": None,
        "model_name": f"my-ft-step-{step}",
        "path": f"checkpoints/step-{step}",
        "size_bytes": 1_234_567,
        **fields,
    }


def document(*checkpoints: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "branch": "ft_123-model",
        "checkpoints": list(checkpoints),
        "fine_tune_id": "ft_123",
        "status": "success",
        "status_message": "resource_found",
        "total_checkpoints": len(checkpoints),
        **fields,
    }


def parse(doc: Any) -> tuple[dict[str, Any], ...]:
    return parse_checkpoint_list(orjson.dumps(doc))


def assert_invalid(body: bytes) -> InvalidResponse:
    with pytest.raises(InvalidResponse) as info:
        parse_checkpoint_list(body)
    err = info.value
    assert isinstance(err, PollError)
    assert err.outcome == "error"
    assert err.message
    return err


# --- accepted ----------------------------------------------------------------------------------------


def test_full_spec_document_is_returned_verbatim() -> None:
    doc = document(checkpoint(100), checkpoint(200, deployment_status="ACTIVE", model_id="mdl_1"))
    result = parse(doc)
    assert isinstance(result, tuple)
    assert list(result) == doc["checkpoints"]


def test_empty_checkpoint_list_before_the_first_checkpoint() -> None:
    assert parse(document()) == ()
    assert parse({"checkpoints": []}) == ()


def test_minimal_checkpoints_with_only_a_step() -> None:
    assert parse({"checkpoints": [{"step": 1}, {"step": 2}]}) == ({"step": 1}, {"step": 2})


def test_checkpoints_are_sorted_by_step() -> None:
    doc = document(checkpoint(300), checkpoint(100), checkpoint(200), checkpoint(0))
    result = parse(doc)
    assert [c["step"] for c in result] == [0, 100, 200, 300]
    assert list(result) == sorted(doc["checkpoints"], key=lambda c: c["step"])


def test_nullable_fields_may_be_null() -> None:
    nulls = checkpoint(
        5,
        created_at=None,
        deployment_status=None,
        model_id=None,
        size_bytes=None,
        metrics={"epoch": None, "grad_norm": None, "learning_rate": None, "loss": None, "mean_token_accuracy": None},
    )
    assert parse(document(nulls)) == (nulls,)


def test_tolerated_nulls_and_missing_optional_fields() -> None:
    # fields the spec does not mark nullable, and absent top-level fields, are still read
    cp = {"step": 1, "metrics": None, "inference_samples": None, "model_name": None, "path": None}
    assert parse({"checkpoints": [cp], "branch": None, "total_checkpoints": None}) == (cp,)


def test_extra_keys_everywhere_are_tolerated_and_kept() -> None:
    cp = checkpoint(
        7,
        future_field={"nested": [1, 2, {"x": None}]},
        _private=True,
        __class__="x",
        model_config=1,
        metrics={"loss": 0.5, "eval_loss": 0.7, "perplexity": 12, "tokens_seen": None},
    )
    doc = document(cp, pagination={"page": 1}, warnings=["x"])
    assert parse(doc) == (cp,)


@pytest.mark.parametrize(
    "status", ["ACTIVE", "active", "DEPLOY_FAILED", "SCALED_TO_ZERO", "unknown", "SOMETHING_NEW", ""]
)
def test_any_deployment_status_string_is_accepted(status: str) -> None:
    cp = checkpoint(1, deployment_status=status)
    assert parse(document(cp)) == (cp,)


@pytest.mark.parametrize("loss", [0, 1, 0.0, 1e-12, 3.5, -2.0, 10**12])
def test_metrics_accept_ints_and_floats(loss: float) -> None:
    cp = checkpoint(1, metrics={"loss": loss, "epoch": 1})
    assert parse(document(cp)) == (cp,)


@pytest.mark.parametrize("step", [0, 1, INT64_MAX, INT64_MIN, -5])
def test_any_64_bit_integer_step(step: int) -> None:
    assert parse({"checkpoints": [{"step": step}]}) == ({"step": step},)


def test_large_inference_samples_are_accepted() -> None:
    samples = [{"prompt": "p" * 10_000, "completion": "c" * 50_000, "score": i} for i in range(20)]
    cp = checkpoint(1, inference_samples=samples)
    assert parse(document(cp)) == (cp,)


def test_deeply_nested_extra_value_within_json_limits_is_accepted() -> None:
    body = b'{"checkpoints": [{"step": 1}], "extra": ' + b"[" * 500 + b"]" * 500 + b"}"
    assert parse_checkpoint_list(body) == ({"step": 1},)


def test_body_hash_distinguishes_bodies() -> None:
    a = orjson.dumps(document(checkpoint(1)))
    b = orjson.dumps(document(checkpoint(2)))
    assert body_hash(a) == body_hash(bytes(a))
    assert body_hash(a) != body_hash(b)


# --- refused -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"not json",
        b"{",
        b'{"checkpoints": [',
        b'{"checkpoints": []} trailing',
        b"\xff\xfe\x00",
        b'{"checkpoints": [], "x": "\xff"}',
        b'{"checkpoints": [], "x": "\\ud800"}',
        b"NaN",
        b'{"checkpoints": [{"step": NaN}]}',
        b"{'checkpoints': []}",
        b"[" * 5000 + b"]" * 5000,
        b'{"checkpoints": [{"step": 1}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
    ids=lambda b: repr(b[:30]),
)
def test_non_json_bodies_are_invalid(body: bytes) -> None:
    assert_invalid(body)


@pytest.mark.parametrize("doc", [[], [{"checkpoints": []}], "checkpoints", 1, 1.5, None, True])
def test_non_object_bodies_are_invalid(doc: Any) -> None:
    assert_invalid(orjson.dumps(doc))


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"status": "success", "total_checkpoints": 0},
        {"checkpoints": None},
        {"checkpoints": {}},
        {"checkpoints": {"0": {"step": 0}}},
        {"checkpoints": "[]"},
        {"checkpoints": 0},
        {"checkpoints": True},
    ],
)
def test_missing_or_non_list_checkpoints_are_invalid(doc: Any) -> None:
    assert_invalid(orjson.dumps(doc))


@pytest.mark.parametrize("item", [None, 1, "step", [], [{"step": 1}], True])
def test_checkpoint_that_is_not_an_object_is_invalid(item: Any) -> None:
    assert_invalid(orjson.dumps({"checkpoints": [{"step": 1}, item]}))


@pytest.mark.parametrize(
    "step",
    [True, False, 1.0, 1.5, "1", None, [1], {"n": 1}],
    ids=repr,
)
def test_non_integer_or_bool_step_is_invalid(step: Any) -> None:
    assert_invalid(orjson.dumps({"checkpoints": [{"step": step}]}))


def test_missing_step_is_invalid() -> None:
    assert_invalid(orjson.dumps({"checkpoints": [{"path": "x"}]}))


@pytest.mark.parametrize(
    "raw", [b"1e2", b"100.0", b"9223372036854775808", b"-9223372036854775809", b"18446744073709551616", b"1" * 40]
)
def test_steps_that_are_not_64_bit_integers_are_invalid(raw: bytes) -> None:
    assert_invalid(b'{"checkpoints": [{"step": ' + raw + b"}]}")


@pytest.mark.parametrize("steps", [[1, 1], [1, 2, 1], [5, 3, 5, 4], [0, 0]])
def test_duplicate_steps_are_invalid(steps: list[int]) -> None:
    assert_invalid(orjson.dumps({"checkpoints": [{"step": s} for s in steps]}))


@pytest.mark.parametrize("metrics", [[], [0.5], "loss=0.5", 0.5, True])
def test_metrics_that_are_not_an_object_are_invalid(metrics: Any) -> None:
    assert_invalid(orjson.dumps({"checkpoints": [{"step": 1, "metrics": metrics}]}))


@pytest.mark.parametrize("name", ["epoch", "grad_norm", "learning_rate", "loss", "mean_token_accuracy"])
@pytest.mark.parametrize("value", ["0.5", True, False, [0.5], {"v": 0.5}], ids=repr)
def test_known_metrics_of_the_wrong_type_are_invalid(name: str, value: Any) -> None:
    assert_invalid(orjson.dumps({"checkpoints": [{"step": 1, "metrics": {name: value}}]}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size_bytes", 1.5),
        ("size_bytes", "12"),
        ("size_bytes", True),
        ("created_at", 1_700_000_000),
        ("deployment_status", 1),
        ("deployment_status", True),
        ("deployment_status", {"state": "ACTIVE"}),
        ("model_id", 42),
        ("model_name", ["x"]),
        ("path", 1),
        ("inference_samples", {"prompt": "x"}),
        ("inference_samples", "sample"),
        ("inference_samples", ["just a string"]),
        ("inference_samples", [None]),
    ],
    ids=repr,
)
def test_checkpoint_fields_of_the_wrong_type_are_invalid(field: str, value: Any) -> None:
    assert_invalid(orjson.dumps({"checkpoints": [{"step": 1, field: value}]}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("total_checkpoints", "3"),
        ("total_checkpoints", True),
        ("total_checkpoints", 1.5),
        ("status", 200),
        ("status_message", False),
        ("branch", 7),
        ("fine_tune_id", 123),
    ],
    ids=repr,
)
def test_top_level_fields_of_the_wrong_type_are_invalid(field: str, value: Any) -> None:
    assert_invalid(orjson.dumps({"checkpoints": [], field: value}))


def test_one_bad_checkpoint_among_good_ones_is_invalid() -> None:
    good = [checkpoint(i) for i in range(1, 50)]
    bad = checkpoint(50, metrics={"loss": "nan"})
    assert_invalid(orjson.dumps(document(*good, bad)))


# --- junk never escapes as anything but a PollError -----------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
FIELDS = ("created_at", "deployment_status", "inference_samples", "model_id", "model_name", "path", "size_bytes")
METRICS = ("epoch", "grad_norm", "learning_rate", "loss", "mean_token_accuracy")
plausible_value = st.none() | st.text(max_size=10) | st.integers(-(2**70), 2**70) | json_values
metrics_like = st.fixed_dictionaries(
    {}, optional={name: st.none() | st.floats(allow_nan=False, allow_infinity=False) | json_scalars for name in METRICS}
) | st.dictionaries(st.sampled_from(METRICS) | st.text(max_size=8), json_values, max_size=6)
checkpoint_like = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries(
        {"step": st.integers(-(2**64), 2**64) | st.integers(0, 5) | json_scalars},
        optional={**dict.fromkeys(FIELDS, plausible_value), "metrics": metrics_like | json_values},
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
) | st.dictionaries(st.text(max_size=8), json_values, max_size=5)
document_like = st.fixed_dictionaries(
    {"checkpoints": st.lists(checkpoint_like | json_values, max_size=6) | json_values},
    optional={
        "total_checkpoints": json_values,
        "status": json_values,
        "branch": json_values,
        "extra": json_values,
    },
)


def check_outcome(body: bytes) -> None:
    try:
        result = parse_checkpoint_list(body)
    except PollError as err:
        assert isinstance(err, InvalidResponse)
        return
    # accepted: a tuple of objects with distinct 64-bit integer steps, sorted, taken from the body
    assert isinstance(result, tuple)
    steps = [c["step"] for c in result]
    assert all(type(s) is int and INT64_MIN <= s <= INT64_MAX for s in steps)
    assert steps == sorted(set(steps))
    source = orjson.loads(body)["checkpoints"]
    assert sorted(source, key=lambda c: c["step"]) == list(result)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_values_only_ever_raise_invalid_response(value: Any) -> None:
    try:
        body = orjson.dumps(value)
    except TypeError:  # an int beyond 64 bits: send its text form instead
        body = repr(value).encode()
    check_outcome(body)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document_like)
def test_document_shaped_junk_only_ever_raises_invalid_response(doc: dict[str, Any]) -> None:
    try:
        body = orjson.dumps(doc)
    except TypeError:
        assume(False)
    check_outcome(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=50).map(lambda b: b'{"checkpoints": [' + b))
def test_arbitrary_bytes_only_ever_raise_invalid_response(body: bytes) -> None:
    check_outcome(body)


# --- every document the spec allows is accepted -----------------------------------------------------------

NUMBER_OR_NULL = {"type": ["number", "null"]}
SPEC_SCHEMA = {
    "type": "object",
    "required": ["checkpoints"],
    "properties": {
        "branch": {"type": "string"},
        "fine_tune_id": {"type": "string"},
        "status": {"type": "string"},
        "status_message": {"type": "string"},
        "total_checkpoints": {"type": "integer", "minimum": 0, "maximum": 10**6},
        "checkpoints": {
            "type": "array",
            "maxItems": 5,
            "items": {
                "type": "object",
                "required": ["step"],
                "properties": {
                    "step": {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
                    "created_at": {"type": ["string", "null"]},
                    "deployment_status": {"type": ["string", "null"]},
                    "inference_samples": {"type": "array", "items": {"type": "object"}, "maxItems": 3},
                    "metrics": {
                        "type": "object",
                        "properties": {
                            "epoch": NUMBER_OR_NULL,
                            "grad_norm": NUMBER_OR_NULL,
                            "learning_rate": NUMBER_OR_NULL,
                            "loss": NUMBER_OR_NULL,
                            "mean_token_accuracy": NUMBER_OR_NULL,
                        },
                        "additionalProperties": {"type": ["number", "null"]},
                    },
                    "model_id": {"type": ["string", "null"]},
                    "model_name": {"type": "string"},
                    "path": {"type": "string"},
                    "size_bytes": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**53},
                },
            },
        },
    },
}


def _fits_json(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(from_schema(SPEC_SCHEMA).filter(_fits_json))
def test_documents_valid_under_the_spec_are_accepted(doc: dict[str, Any]) -> None:
    steps = [c["step"] for c in doc["checkpoints"]]
    assume(len(set(steps)) == len(steps))
    original = copy.deepcopy(doc)
    result = parse(doc)
    assert list(result) == sorted(original["checkpoints"], key=lambda c: c["step"])
