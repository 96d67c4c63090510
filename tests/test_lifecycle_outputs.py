"""What lifecycle events look like: describe() lines, Slack messages, and the new metrics."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from watcher.core.headline import describe, duration_text
from watcher.core.models import EVENT_TYPES, LIFECYCLE_EVENT_TYPES, Event, FineTuneRef
from watcher.delivery.notifiers.slack import MAX_PAYLOAD_BYTES, digest, message
from watcher.observe.metrics import Metrics

FINE_TUNE = {"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot <sft>"}
COMPLETED = {
    "previous_status": "running",
    "status": "completed",
    "error": None,
    "started_at": "2026-12-01T10:00:00Z",
    "finished_at": "2026-12-01T11:02:05Z",
    "duration_s": 3725.0,
    "checkpoints": 12,
    "latest_step": 1200,
    "best_loss": 0.4321,
    "best_step": 900,
}


def event(kind: str, **data: Any) -> Event:
    return Event("evt_01TEST", kind, "2026-12-01T11:02:06.000Z", {"fine_tune": FINE_TUNE, **data}, "acme/bot/ft_1")


def section_text(payload: dict[str, Any]) -> str:
    return str(payload["blocks"][0]["text"]["text"])


def fields_of(payload: dict[str, Any]) -> list[str]:
    return [str(field["text"]) for field in payload["blocks"][0].get("fields", [])]


def test_the_new_types_are_event_types() -> None:
    assert {"fine_tune.discovered", "fine_tune.status_changed", "fine_tune.stalled"} <= set(EVENT_TYPES)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.4, "42s"), (185, "3m 05s"), (3725, "1h 02m"), (90000, "1d 01h"), (None, None), (-1, None)],
)
def test_duration_text(seconds: float | None, text: str | None) -> None:
    assert duration_text(seconds) == text


# --- describe --------------------------------------------------------------------------------------------


def test_describe_completed() -> None:
    line = describe(event("fine_tune.status_changed", **COMPLETED))
    assert line == "bot <sft>: run finished in 1h 02m · 12 checkpoints · best loss 0.4321 at step 900"


def test_describe_errored_and_plain_transitions() -> None:
    errored = {**COMPLETED, "status": "errored", "error": "CUDA out of memory", "best_loss": None}
    assert describe(event("fine_tune.status_changed", **errored)).endswith(": CUDA out of memory · 12 checkpoints")
    plain = {"previous_status": "enqueued", "status": "running", "duration_s": None}
    assert describe(event("fine_tune.status_changed", **plain)) == "bot <sft>: status enqueued -> running"


def test_describe_stalled_and_discovered() -> None:
    stalled = event("fine_tune.stalled", status="running", last_checkpoint_at=None, stalled_for_s=7260)
    assert describe(stalled) == "bot <sft>: no new checkpoint for 2h 01m while running"
    found = event(
        "fine_tune.discovered",
        source="support",
        status="enqueued",
        created_at="2026-12-01T10:00:00Z",
        base_model="Qwen/Qwen3-0.6B",
        created_by="alice",
    )
    assert describe(found) == "bot <sft>: new fine-tune in support on Qwen/Qwen3-0.6B by alice (status enqueued)"
    bare = event("fine_tune.discovered", source="s", status=None, created_at=None, base_model=None, created_by=None)
    assert describe(bare) == "bot <sft>: new fine-tune in s (status unknown)"


# --- Slack -----------------------------------------------------------------------------------------------


def test_slack_run_finished() -> None:
    payload = message(event("fine_tune.status_changed", **COMPLETED))
    assert section_text(payload) == ":checkered_flag: *bot &lt;sft&gt;*: run finished in *1h 02m*"
    assert fields_of(payload) == [
        "*Duration*\n1h 02m",
        "*Checkpoints*\n12",
        "*Latest step*\n1200",
        "*Best loss*\n0.4321 at step 900",
    ]
    assert payload["text"] == "bot &lt;sft&gt;: run finished in 1h 02m · 12 checkpoints · best loss 0.4321 at step 900"


def test_slack_run_failed_clips_the_error_text() -> None:
    error = "Traceback <most recent call last>: " + "x" * 5000
    payload = message(event("fine_tune.status_changed", **{**COMPLETED, "status": "errored", "error": error}))
    text = section_text(payload)
    assert text.startswith(":x: *bot &lt;sft&gt;*: run failed after 1h 02m: Traceback &lt;most recent call last&gt;")
    assert text.endswith("…") and len(text) < 600
    assert len(orjson.dumps(payload)) <= MAX_PAYLOAD_BYTES
    missing = message(event("fine_tune.status_changed", **{**COMPLETED, "status": "errored", "duration_s": None}))
    assert section_text(missing) == ":x: *bot &lt;sft&gt;*: run failed: no error text from the Hub"


def test_slack_run_stopped_and_other_transitions() -> None:
    stopped = message(event("fine_tune.status_changed", **{**COMPLETED, "status": "stopped"}))
    assert section_text(stopped) == ":octagonal_sign: *bot &lt;sft&gt;*: run stopped after 1h 02m"
    assert "*Checkpoints*\n12" in fields_of(stopped)
    started = message(event("fine_tune.status_changed", previous_status="enqueued", status="running"))
    assert section_text(started) == "*bot &lt;sft&gt;*: status `enqueued` → `running`"
    assert fields_of(started) == []


def test_slack_stalled_and_discovered() -> None:
    stalled = message(event("fine_tune.stalled", status="running", last_checkpoint_at=None, stalled_for_s=7260))
    assert section_text(stalled) == ":hourglass: *bot &lt;sft&gt;*: no new checkpoint for *2h 01m* while `running`"
    found = message(
        event(
            "fine_tune.discovered",
            source="support",
            status="enqueued",
            created_at=None,
            base_model="Qwen/Qwen3-0.6B",
            created_by="alice",
        )
    )
    assert section_text(found) == (
        ":new: *bot &lt;sft&gt;*: new fine-tune in *support* on Qwen/Qwen3-0.6B by alice (status `enqueued`)"
    )


def test_a_digest_lists_lifecycle_events_too() -> None:
    payload = digest(
        [
            event("fine_tune.status_changed", **COMPLETED),
            event("checkpoint.created", checkpoint={"step": 1200}, is_best_loss=False),
        ]
    )
    listed = payload["blocks"][1]["text"]["text"]
    assert ":checkered_flag: run finished in *1h 02m*" in listed


# --- metrics ---------------------------------------------------------------------------------------------


def test_status_watched_and_hub_request_metrics() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, version="0.0.0-test")
    ref = FineTuneRef("acme", "bot", "ft_1", "sft")
    other = FineTuneRef("acme", "bot", "ft_2", "ft_2")
    metrics.lifecycle.set_status(ref, "running")
    metrics.lifecycle.set_status(ref, "Completed")  # verbatim; replaces the previous status
    metrics.lifecycle.set_status(other, "errored")
    metrics.lifecycle.set_watched({"config": 2, "support": 5})
    metrics.observe_hub_request("list", "ok")
    metrics.observe_hub_request("list", "ok")
    metrics.observe_hub_request("fine_tune", "not_found")
    text = generate_latest(registry).decode()
    assert (
        'oxen_fine_tune_status{fine_tune_id="ft_1",name="sft",namespace="acme",repo="bot",status="Completed"} 1.0'
        in text
    )
    assert 'status="running"' not in text
    assert 'oxen_watcher_watched_fine_tunes{source="support"} 5.0' in text
    assert 'oxen_watcher_hub_requests_total{endpoint="list",outcome="ok"} 2.0' in text
    assert 'oxen_watcher_hub_requests_total{endpoint="fine_tune",outcome="not_found"} 1.0' in text
    metrics.lifecycle.retain([ref.key])
    metrics.lifecycle.set_status(ref, None)
    metrics.lifecycle.set_watched({"config": 1})
    text = generate_latest(registry).decode()
    assert "oxen_fine_tune_status{" not in text
    assert 'source="support"' not in text


@pytest.mark.parametrize("kind", LIFECYCLE_EVENT_TYPES)
def test_every_lifecycle_type_has_its_own_line_and_headline(kind: str) -> None:
    generic = f"bot <sft>: {kind}"
    assert describe(event(kind, status="running")) != generic
    assert section_text(message(event(kind, status="running"))) != f"*bot &lt;sft&gt;*: {kind}"
