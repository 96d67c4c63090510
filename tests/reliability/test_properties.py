"""Property tests: Hub bodies generated from the endpoint's own OpenAPI schema, and sequences of Hub states
threaded through the pure diff and through the real SqliteStore (with restarts).

Builds on tests/test_schema.py (junk bodies, a hand-written spec schema): here the schema is the reference's
CheckpointListResponse converted mechanically from OpenAPI 3.0, so extra metrics and inference-sample values
may be anything JSON allows, and every accepted body goes on through diff, stamping and a store commit.

What must match when a sequence of Hub states is diffed step by step versus first-against-last directly:

- `checkpoints` (steps, fingerprints, data), `body_hash`, `baselined`, `not_found`, `consecutive_failures` and
  `failing`: equal. The known checkpoints are a function of the last successful answer only.
- `best_loss`: NOT equal in general, by design. It is "the lowest loss ever seen" (README: `is_best_loss`;
  tests/test_diff.py::test_best_loss_remembers_removed_checkpoints), so it depends on the path. Step by step it
  is the minimum over every loss of every answer of the sequence; directly it is the minimum over the first and
  the last answers. Both are checked exactly, and step-by-step <= direct.
- events: a different list of course, but per step the net count (created - removed) is the same: whether the
  step is in the last answer minus whether it was in the first.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from watcher.core.diff import DiffOptions, _same_status, changed_fields, diff, fingerprint
from watcher.core.events import MAX_EVENT_BYTES, stamp
from watcher.core.models import (
    FineTuneRef,
    FineTuneState,
    PollFailed,
    PollNotFound,
    PollResult,
    PollSuccess,
    PollUnchanged,
    Transition,
    metric_of,
)
from watcher.errors import InvalidResponse, PollError
from watcher.hub.schema import body_hash, parse_checkpoint_list
from watcher.store import SqliteStore
from watcher.testing.simhub import SimHub

REF = FineTuneRef("acme", "bot", "ft_1", "bot-sft")
KEY = REF.key
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CHECKPOINT_EVENTS = {"checkpoint.created", "checkpoint.updated", "checkpoint.deployment_changed", "checkpoint.removed"}

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STORE = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the endpoint's schema, verbatim from /work/shared/reference/oxen-checkpoints-endpoint.md ------------------
# (components.schemas of the Hub's OpenAPI 3.0 document; descriptions dropped, everything else as published)

OPENAPI_COMPONENTS: dict[str, Any] = {
    "CheckpointListResponse": {
        "properties": {
            "branch": {"type": "string"},
            "checkpoints": {"items": {"$ref": "#/components/schemas/Checkpoint"}, "type": "array"},
            "fine_tune_id": {"type": "string"},
            "status": {"type": "string"},
            "status_message": {"type": "string"},
            "total_checkpoints": {"type": "integer"},
        },
        "title": "CheckpointListResponse",
        "type": "object",
    },
    "Checkpoint": {
        "properties": {
            "created_at": {"format": "date_time", "nullable": True, "type": "string"},
            "deployment_status": {"nullable": True, "type": "string"},
            "inference_samples": {"items": {"additionalProperties": True, "type": "object"}, "type": "array"},
            "metrics": {
                "additionalProperties": True,
                "properties": {
                    "epoch": {"format": "float", "nullable": True, "type": "number"},
                    "grad_norm": {"format": "float", "nullable": True, "type": "number"},
                    "learning_rate": {"format": "float", "nullable": True, "type": "number"},
                    "loss": {"format": "float", "nullable": True, "type": "number"},
                    "mean_token_accuracy": {"format": "float", "nullable": True, "type": "number"},
                },
                "type": "object",
            },
            "model_id": {"nullable": True, "type": "string"},
            "model_name": {"type": "string"},
            "path": {"type": "string"},
            "size_bytes": {"nullable": True, "type": "integer"},
            "step": {"type": "integer"},
        },
        "title": "Checkpoint",
        "type": "object",
    },
}

# OpenAPI 3.0 keywords with no JSON Schema meaning (or none that a generator should honour)
_DROPPED = {"description", "title", "example", "nullable", "format", "deprecated", "readOnly", "writeOnly"}
_KNOWN_FORMATS = {"float", "date_time"}


def openapi_to_jsonschema(node: Any, components: dict[str, Any] = OPENAPI_COMPONENTS) -> Any:
    """An OpenAPI 3.0 schema object as plain JSON Schema: $refs inlined, `nullable: true` -> a type union with
    null, the (non-standard) float and date_time formats dropped."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(item, components) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/components/schemas/")
        return openapi_to_jsonschema(components[name], components)
    if "format" in node:
        assert node["format"] in _KNOWN_FORMATS, f"unexpected format {node['format']!r}: decide how to convert it"
    converted: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            converted[key] = {name: openapi_to_jsonschema(sub, components) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("allOf", "anyOf", "oneOf"):
            converted[key] = openapi_to_jsonschema(value, components)
        else:
            converted[key] = copy.deepcopy(value)
    if node.get("nullable") is True and "type" in converted:
        kinds = converted["type"] if isinstance(converted["type"], list) else [converted["type"]]
        converted["type"] = [*kinds, "null"]
    return converted


CHECKPOINT_LIST_SCHEMA = openapi_to_jsonschema(OPENAPI_COMPONENTS["CheckpointListResponse"])


def bounded(schema: Any, *, items: int = 4, extra_properties: int = 3) -> Any:
    """The same schema with arrays and objects capped in size: a generation bound (every document it allows
    the original allows too) that keeps examples small and shrinking quick."""
    if isinstance(schema, list):
        return [bounded(item, items=items, extra_properties=extra_properties) for item in schema]
    if not isinstance(schema, dict):
        return schema
    capped = {key: bounded(value, items=items, extra_properties=extra_properties) for key, value in schema.items()}
    kinds = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    if "array" in kinds:
        capped["maxItems"] = items
    if "object" in kinds:
        capped["maxProperties"] = len(schema.get("properties", {})) + extra_properties
    return capped


def test_the_converted_schema_is_valid_json_schema_and_the_simulated_hub_conforms() -> None:
    jsonschema.Draft7Validator.check_schema(CHECKPOINT_LIST_SCHEMA)
    checkpoint = CHECKPOINT_LIST_SCHEMA["properties"]["checkpoints"]["items"]
    assert checkpoint["properties"]["created_at"] == {"type": ["string", "null"]}
    assert checkpoint["properties"]["metrics"]["properties"]["loss"] == {"type": ["number", "null"]}
    assert checkpoint["properties"]["model_name"] == {"type": "string"}
    assert "format" not in json.dumps(CHECKPOINT_LIST_SCHEMA)
    # the simulated Hub every other test trusts sends what the spec describes
    with SimHub(token=None) as hub:
        key = hub.add_fine_tune("acme", "bot", "ft_1")
        hub.add_checkpoint(key, 100, loss=1.5)
        hub.add_checkpoint(key, 200, loss=None, deployment_status="ACTIVE")
        hub._fine_tunes[key].body = None
        body = hub._body_of(hub._fine_tunes[key])
    jsonschema.validate(orjson.loads(body), CHECKPOINT_LIST_SCHEMA)


# --- (a) bodies the spec allows -----------------------------------------------------------------------------


def _encode(document: Any) -> bytes:
    # the stdlib writes integers of any size (orjson stops at 64 bits), as a Hub written in Elixir could
    return json.dumps(document, allow_nan=False).encode()


def _commit_through_store(sequence: Sequence[tuple[Any, ...]], *, baseline: bool) -> None:
    store = SqliteStore(":memory:")
    try:
        for checkpoints in sequence:
            result = PollSuccess(tuple(checkpoints), body_hash(orjson.dumps(checkpoints)))
            committed = store.apply_poll(REF, result, options=DiffOptions(baseline=baseline), now=1e9)
            assert committed is not None
            for event in committed.events:
                assert len(orjson.dumps(event.envelope())) <= MAX_EVENT_BYTES
            assert set(store.load_state(KEY).checkpoints) == {c["step"] for c in checkpoints}
    finally:
        store.close()


def _diff_chain(sequence: Sequence[tuple[Any, ...]], *, baseline: bool) -> FineTuneState:
    state = FineTuneState()
    for checkpoints in sequence:
        transition = diff(REF, state, PollSuccess(tuple(checkpoints), "h"), options=DiffOptions(baseline=baseline))
        for draft in transition.events:
            event = stamp(draft, fine_tune_key=KEY, now=1e9)
            assert len(orjson.dumps(event.envelope())) <= MAX_EVENT_BYTES
        assert {step: known.data for step, known in transition.state.checkpoints.items()} == {
            c["step"]: c for c in checkpoints
        }
        state = transition.state
    return state


@FAST
@given(from_schema(bounded(CHECKPOINT_LIST_SCHEMA)), st.booleans())
def test_spec_bodies_only_ever_raise_poll_error_and_accepted_ones_diff(
    document: dict[str, Any], baseline: bool
) -> None:
    jsonschema.validate(document, CHECKPOINT_LIST_SCHEMA)
    try:
        checkpoints = parse_checkpoint_list(_encode(document))
    except PollError as err:
        # refused: big or repeated steps; a clean InvalidResponse, nothing else
        assert isinstance(err, InvalidResponse) and err.message
        return
    _diff_chain([(), checkpoints, ()], baseline=baseline)
    _commit_through_store([checkpoints, ()], baseline=baseline)


# The spec marks nothing required; the watcher is deliberately strict on `checkpoints` and `step` (README: "strict
# on step and checkpoints") and refuses steps outside 64 bits or listed twice. Within those rules, every body the
# spec allows must be accepted.
ACCEPTABLE_SCHEMA = copy.deepcopy(CHECKPOINT_LIST_SCHEMA)
ACCEPTABLE_SCHEMA["required"] = ["checkpoints"]
ACCEPTABLE_SCHEMA["properties"]["checkpoints"]["items"]["required"] = ["step"]
# JSON integers beyond 64 bits are read as floats (orjson), so a known integer field that large is refused;
# the test above shows it is refused cleanly. Here the known integer fields stay within 64 bits.
for _field in (
    ACCEPTABLE_SCHEMA["properties"]["total_checkpoints"],
    ACCEPTABLE_SCHEMA["properties"]["checkpoints"]["items"]["properties"]["step"],
    ACCEPTABLE_SCHEMA["properties"]["checkpoints"]["items"]["properties"]["size_bytes"],
):
    _field.update(minimum=INT64_MIN, maximum=INT64_MAX)


def _distinct_steps(document: dict[str, Any]) -> dict[str, Any]:
    used: set[int] = set()
    for checkpoint in document["checkpoints"]:
        if checkpoint["step"] in used:
            checkpoint["step"] = next(n for n in range(len(used) + 1) if n not in used)
        used.add(checkpoint["step"])
    return document


spec_documents_with_usable_steps = from_schema(bounded(ACCEPTABLE_SCHEMA)).map(_distinct_steps)


@settings(FAST, max_examples=100)
@given(spec_documents_with_usable_steps, spec_documents_with_usable_steps, st.booleans())
def test_spec_bodies_with_distinct_64_bit_steps_are_accepted_and_diff_commit_and_reverse(
    first: dict[str, Any], second: dict[str, Any], baseline: bool
) -> None:
    # the second answer shares some steps with the first, so updates and deployment changes are diffed too
    if first["checkpoints"] and second["checkpoints"]:
        second["checkpoints"][0]["step"] = first["checkpoints"][-1]["step"]
        steps = [c["step"] for c in second["checkpoints"]]
        assume(len(steps) == len(set(steps)))
    parsed = []
    for document in (first, second):
        body = _encode(document)
        checkpoints = parse_checkpoint_list(body)
        # verbatim as decoded (orjson reads an integer beyond 64 bits in an extra field as a float)
        assert list(checkpoints) == sorted(orjson.loads(body)["checkpoints"], key=lambda c: c["step"])
        parsed.append(checkpoints)
    _diff_chain([parsed[0], parsed[1], parsed[0], ()], baseline=baseline)
    _commit_through_store([parsed[0], parsed[1], parsed[0], ()], baseline=baseline)


@pytest.mark.parametrize("depth", [252, 300, 1000])
def test_a_deeply_nested_extra_value_in_a_checkpoint_is_refused_or_diffed(depth: int) -> None:
    body = b'{"checkpoints": [{"step": 1, "extra": ' + b"[" * depth + b"]" * depth + b"}]}"
    try:
        checkpoints = parse_checkpoint_list(body)
    except PollError:
        return
    _diff_chain([(), checkpoints], baseline=False)
    _commit_through_store([checkpoints], baseline=False)


# --- (b) sequences of Hub states ---------------------------------------------------------------------------

STEPS = st.integers(0, 5)
STATUSES = st.sampled_from([None, "ACTIVE", "active", "Active", "FAILED", "failed", "DEPLOYING", "", "SCALED_TO_ZERO"])
LOSSES = st.none() | st.sampled_from([0.5, 1.0, 2.0, 1]) | st.floats(0, 10, allow_nan=False, width=32)


@st.composite
def checkpoints(draw: st.DrawFn, step: int) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {
        "step": step,
        "deployment_status": draw(STATUSES),
        "metrics": {"loss": draw(LOSSES)},
    }
    optional = {
        "model_id": st.sampled_from([None, "mdl_1", "mdl_2"]),
        "path": st.sampled_from([f"checkpoints/step-{step}", "elsewhere"]),
        "size_bytes": st.sampled_from([None, 10, 11]),
        "inference_samples": st.lists(st.fixed_dictionaries({"prompt": st.sampled_from(["a", "b"])}), max_size=2),
        "created_at": st.sampled_from(["2025-01-01T00:00:00Z", None]),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            checkpoint[name] = draw(values)
    if draw(st.booleans()):
        checkpoint["metrics"]["learning_rate"] = draw(st.sampled_from([1e-4, 2e-5, None]))
    return checkpoint


@st.composite
def hub_states(draw: st.DrawFn) -> dict[int, dict[str, Any]]:
    return {step: draw(checkpoints(step)) for step in sorted(draw(st.sets(STEPS, max_size=5)))}


def _recase(status: str | None) -> str | None:
    if not status:
        return status
    for candidate in (status.lower(), status.upper(), status.capitalize(), status.swapcase()):
        if candidate != status:
            return candidate
    return status


@st.composite
def operations(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(["put", "remove", "status", "recase", "loss", "same", "fail", "not_found"]))
    if kind == "put":
        step = draw(STEPS)
        return ("put", step, draw(checkpoints(step)))
    if kind == "remove":
        return ("remove", draw(STEPS))
    if kind == "status":
        return ("status", draw(STEPS), draw(STATUSES))
    if kind == "recase":
        return ("recase", draw(STEPS))
    if kind == "loss":
        return ("loss", draw(STEPS), draw(LOSSES))
    return (kind,)


Answer = tuple[dict[str, Any], ...] | str  # the checkpoints of a 200, or "fail" / "not_found"


def hub_answers(initial: dict[int, dict[str, Any]], ops: Sequence[tuple[Any, ...]]) -> list[Answer]:
    """What the Hub answers to a poll after each operation: the first and the last answers are 200s."""
    hub = copy.deepcopy(initial)

    def listing() -> tuple[dict[str, Any], ...]:
        return tuple(copy.deepcopy(hub[step]) for step in sorted(hub))

    answers: list[Answer] = [listing()]
    for op in ops:
        kind = op[0]
        if kind == "put":
            hub[op[1]] = copy.deepcopy(op[2])
        elif kind == "remove":
            hub.pop(op[1], None)
        elif kind == "status" and op[1] in hub:
            hub[op[1]]["deployment_status"] = op[2]
        elif kind == "recase" and op[1] in hub:
            hub[op[1]]["deployment_status"] = _recase(hub[op[1]]["deployment_status"])
        elif kind == "loss" and op[1] in hub:
            hub[op[1]]["metrics"]["loss"] = op[2]
        answers.append(kind if kind in ("fail", "not_found") else listing())
    answers.append(listing())
    return answers


def to_result(answer: Answer, known_hash: str | None) -> PollResult:
    """The poll result the Watcher makes of an answer (PollUnchanged for a byte-identical body)."""
    if answer == "fail":
        return PollFailed("HTTP 503", 503)
    if answer == "not_found":
        return PollNotFound()
    assert not isinstance(answer, str)
    body = orjson.dumps({"checkpoints": list(answer)})
    digest = body_hash(body)
    if digest == known_hash:
        return PollUnchanged(digest)
    return PollSuccess(parse_checkpoint_list(body), digest)


def successes(answers: Sequence[Answer]) -> list[tuple[dict[str, Any], ...]]:
    return [answer for answer in answers if not isinstance(answer, str)]


def known(state: FineTuneState) -> dict[int, tuple[str, Any]]:
    """The comparable content of the known checkpoints."""
    return {step: (entry.fingerprint, dict(entry.data)) for step, entry in state.checkpoints.items()}


def comparable(state: FineTuneState) -> tuple[Any, ...]:
    return (
        state.baselined,
        state.not_found,
        state.consecutive_failures,
        state.failing,
        state.best_loss,
        state.body_hash,
        known(state),
    )


def min_loss(listings: Sequence[Sequence[dict[str, Any]]]) -> float | None:
    losses = [loss for listing in listings for c in listing if (loss := metric_of(c, "loss")) is not None]
    return min(losses) if losses else None


def thread(answers: Sequence[Answer], options: DiffOptions) -> Iterator[tuple[PollResult, FineTuneState, Transition]]:
    state = FineTuneState()
    for answer in answers:
        result = to_result(answer, state.body_hash)
        transition = diff(REF, state, result, options=options)
        yield result, state, transition
        state = transition.state


def check_transition(result: PollResult, old: FineTuneState, transition: Transition, options: DiffOptions) -> None:
    new = transition.state
    by_type: dict[str, list[int]] = {}
    for event in transition.events:
        if event.type in CHECKPOINT_EVENTS:
            by_type.setdefault(event.type, []).append(event.data["checkpoint"]["step"])
        assert event.data["fine_tune"] == REF.as_data()
    for steps in by_type.values():
        assert len(steps) == len(set(steps)), f"one event per step and type per poll: {by_type}"
    if not isinstance(result, PollSuccess):
        # a failed poll, a 404 and an unchanged body never touch the known checkpoints
        assert new.checkpoints is old.checkpoints
        assert by_type == {}
        if isinstance(result, PollFailed):
            assert (new.consecutive_failures, new.body_hash) == (old.consecutive_failures + 1, old.body_hash)
        return
    listing = {c["step"]: c for c in result.checkpoints}
    assert {step: entry.data for step, entry in new.checkpoints.items()} == listing
    assert all(entry.fingerprint == fingerprint(listing[step]) for step, entry in new.checkpoints.items())
    if options.baseline and not old.baselined:
        assert by_type == {}, "the first successful poll is a silent baseline"
        return
    before, after = set(old.checkpoints), set(listing)
    assert sorted(by_type.get("checkpoint.created", [])) == sorted(after - before)
    assert sorted(by_type.get("checkpoint.removed", [])) == sorted(before - after)
    both = before & after
    updated = {s for s in both if changed_fields(old.checkpoints[s].data, listing[s])}
    assert set(by_type.get("checkpoint.updated", [])) == updated
    redeployed = {
        s for s in both if not _same_status(old.checkpoints[s].deployment_status, listing[s].get("deployment_status"))
    }
    assert set(by_type.get("checkpoint.deployment_changed", [])) == redeployed
    for event in transition.events:
        if event.type == "checkpoint.deployment_changed":
            step = event.data["checkpoint"]["step"]
            assert event.data["previous_deployment_status"] == old.checkpoints[step].data.get("deployment_status")
            assert event.data["deployment_status"] == listing[step].get("deployment_status")
            previous, now = event.data["previous_deployment_status"], event.data["deployment_status"]
            assert previous is None or now is None or previous.casefold() != now.casefold(), "case alone is no change"
    if {s: c.data for s, c in old.checkpoints.items()} == listing:
        assert by_type == {}, "an identical answer yields no checkpoint event"


sequences = st.tuples(hub_states(), st.lists(operations(), max_size=14))
diff_options = st.builds(DiffOptions, baseline=st.booleans(), failure_threshold=st.integers(1, 3))


@FAST
@given(sequences, diff_options)
def test_step_by_step_reaches_the_state_of_first_against_last(sequence: Any, options: DiffOptions) -> None:
    answers = hub_answers(*sequence)
    threaded = list(thread(answers, options))
    final = threaded[-1][2].state
    ok = successes(answers)
    first, last = ok[0], ok[-1]

    baseline = diff(REF, FineTuneState(), to_result(first, None), options=options)
    direct = diff(REF, baseline.state, to_result(last, baseline.state.body_hash), options=options).state

    assert known(final) == known(direct) == {c["step"]: (fingerprint(c), c) for c in last}
    assert (final.body_hash, final.baselined, final.not_found) == (direct.body_hash, True, False)
    assert (final.consecutive_failures, final.failing) == (direct.consecutive_failures, direct.failing) == (0, False)
    # best_loss is path dependent by design (the lowest loss ever seen): each path gives exactly its own minimum
    assert final.best_loss == min_loss(ok)
    assert direct.best_loss == min_loss([first, last])
    if direct.best_loss is not None:
        assert final.best_loss is not None and final.best_loss <= direct.best_loss

    # per step, the announced creations minus removals are the same on both paths
    def net(transitions: Sequence[Transition]) -> dict[int, int]:
        count: Counter[int] = Counter()
        for transition in transitions:
            for event in transition.events:
                if event.type == "checkpoint.created":
                    count[event.data["checkpoint"]["step"]] += 1
                elif event.type == "checkpoint.removed":
                    count[event.data["checkpoint"]["step"]] -= 1
        return {step: n for step, n in count.items() if n}

    direct_transitions = [baseline, diff(REF, baseline.state, to_result(last, None), options=options)]
    assert net([t for _, _, t in threaded]) == net(direct_transitions)
    expected = (
        {c["step"] for c in last} if not options.baseline else {c["step"] for c in last} - {c["step"] for c in first}
    )
    gone = set() if not options.baseline else {c["step"] for c in first} - {c["step"] for c in last}
    assert net(direct_transitions) == {**dict.fromkeys(expected, 1), **dict.fromkeys(gone, -1)}


@FAST
@given(sequences, diff_options)
def test_event_invariants_along_a_sequence(sequence: Any, options: DiffOptions) -> None:
    answers = hub_answers(*sequence)
    failing_events: list[str] = []
    state = FineTuneState()
    for result, old, transition in thread(answers, options):
        check_transition(result, old, transition, options)
        failing_events += [e.type for e in transition.events if e.type.startswith("fine_tune.poll_")]
        state = transition.state
    # poll_failing and poll_recovered alternate, starting with failing; the state says which came last
    assert failing_events == ["fine_tune.poll_failing", "fine_tune.poll_recovered"] * (len(failing_events) // 2) + (
        ["fine_tune.poll_failing"] if len(failing_events) % 2 else []
    )
    assert state.failing is bool(len(failing_events) % 2)


@FAST
@given(sequences, diff_options)
def test_each_created_step_was_absent_and_each_removed_step_present(sequence: Any, options: DiffOptions) -> None:
    # the same, tracked across polls: a step's created/removed events alternate, starting from the baseline
    answers = hub_answers(*sequence)
    present: set[int] = set()
    for result, old, transition in thread(answers, options):
        for event in transition.events:
            step = event.data.get("checkpoint", {}).get("step")
            if event.type == "checkpoint.created":
                assert step not in present
                present.add(step)
            elif event.type == "checkpoint.removed":
                assert step in present
                present.discard(step)
            elif event.type in CHECKPOINT_EVENTS:
                assert step in present
        if options.baseline and isinstance(result, PollSuccess) and not old.baselined:
            present = {c["step"] for c in result.checkpoints}
    assert present == {c["step"] for c in successes(answers)[-1]}


# --- the same sequences through the real SqliteStore, with restarts ---------------------------------------------


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="oxen-props-") as folder:
        yield Path(folder)


_counter = iter(range(10**9))


@STORE
@given(sequences, diff_options, st.sets(st.integers(0, 16), max_size=3))
def test_the_store_persists_exactly_the_diff_state_across_restarts(
    scratch: Path, sequence: Any, options: DiffOptions, restarts: set[int]
) -> None:
    answers = hub_answers(*sequence)
    path = scratch / f"w{next(_counter)}.db"
    expected = list(thread(answers, options))
    store = SqliteStore(path)
    committed_ids: list[str] = []
    try:
        for index, (answer, (_, _, transition)) in enumerate(zip(answers, expected, strict=True)):
            if index in restarts:  # a restart: a new store on the file, its cache empty
                store.close()
                store = SqliteStore(path)
            result = to_result(answer, store.body_hash(KEY))
            committed = store.apply_poll(REF, result, options=options, now=1_800_000_000.0 + index)
            assert committed is not None
            assert [(e.type, e.data) for e in committed.events] == [(d.type, d.data) for d in transition.events]
            assert comparable(committed.state) == comparable(transition.state)
            committed_ids += [e.id for e in committed.events]
        final = expected[-1][2].state
        assert comparable(store.load_state(KEY)) == comparable(final)
    finally:
        store.close()
    reopened = SqliteStore(path)
    try:
        assert comparable(reopened.load_state(KEY)) == comparable(final)
        stored = reopened.recent_events(limit=10_000)
        assert [e.id for e in reversed(stored)] == committed_ids  # every event once, in order
        (status,) = reopened.statuses([KEY])
        assert status.checkpoints == len(final.checkpoints)
        assert status.consecutive_failures == final.consecutive_failures
    finally:
        reopened.close()
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_best_loss_example_documented_above() -> None:
    # the path dependence of best_loss spelled out once: 0.5 came and went between the first and last answers
    first = ({"step": 1, "metrics": {"loss": 1.0}},)
    middle = ({"step": 1, "metrics": {"loss": 1.0}}, {"step": 2, "metrics": {"loss": 0.5}})
    last = ({"step": 1, "metrics": {"loss": 1.0}}, {"step": 3, "metrics": {"loss": 0.8}})
    final = list(thread([first, middle, last], DiffOptions()))[-1][2].state
    baseline = diff(REF, FineTuneState(), to_result(first, None)).state
    direct = diff(REF, baseline, to_result(last, None)).state
    assert known(final) == known(direct)
    assert (final.best_loss, direct.best_loss) == (0.5, 0.8)
    assert not math.isclose(final.best_loss, direct.best_loss)
