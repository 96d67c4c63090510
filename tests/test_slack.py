"""Slack: payload snapshots, the 4,000-byte bound, digests on bursts, rate limit and 429 through a real server."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from test_delivery import OTHER, REF, Rig

from watcher.core.headline import describe
from watcher.core.models import Event
from watcher.delivery.notifiers.slack import MAX_PAYLOAD_BYTES, digest, message
from watcher.testing.receiver import Answer, Receiver

FINE_TUNE = {"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot <sft>"}


def _event(kind: str, **data: object) -> Event:
    return Event("evt_01TEST", kind, "2026-11-25T15:00:00.000Z", {"fine_tune": FINE_TUNE, **data}, "acme/bot/ft_1")


def test_created_snapshot():
    event = _event(
        "checkpoint.created",
        checkpoint={
            "step": 4000,
            "metrics": {"loss": 0.4321, "mean_token_accuracy": 0.91, "learning_rate": 2e-05, "grad_norm": None},
        },
        is_best_loss=True,
    )
    assert message(event) == {
        "text": "bot &lt;sft&gt;: new checkpoint at step 4000 · loss 0.4321, mean_token_accuracy 0.91, "
        "learning_rate 2e-05 · best loss so far",
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": "*bot &lt;sft&gt;*: new checkpoint at step *4000* :trophy: best loss so far",
                },
                "fields": [
                    {"type": "mrkdwn", "text": "*Loss*\n0.4321 (best so far)"},
                    {"type": "mrkdwn", "text": "*Mean token accuracy*\n0.91"},
                    {"type": "mrkdwn", "text": "*Learning rate*\n2e-05"},
                ],
            },
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": "`acme/bot/ft_1` · checkpoint.created · evt_01TEST"}],
            },
        ],
    }


def test_deployment_change_snapshot():
    event = _event(
        "checkpoint.deployment_changed",
        checkpoint={"step": 300},
        previous_deployment_status="DEPLOYING",
        deployment_status="ACTIVE",
    )
    assert message(event)["blocks"][0] == {
        "type": "section",
        "text": {"type": "mrkdwn", "text": "*bot &lt;sft&gt;*: step *300* deployment `DEPLOYING` → `ACTIVE`"},
    }
    assert message(event)["text"] == "bot &lt;sft&gt;: step 300 deployment DEPLOYING -&gt; ACTIVE"


@pytest.mark.parametrize(
    ("kind", "extra", "needle"),
    [
        (
            "fine_tune.poll_failing",
            {"error": "Hub answered 503", "http_status": 503, "consecutive_failures": 3},
            ":warning: *bot &lt;sft&gt;*: polls failing, 3 in a row: Hub answered 503",
        ),
        (
            "fine_tune.poll_recovered",
            {"error": None, "http_status": 200, "consecutive_failures": 4},
            ":white_check_mark: *bot &lt;sft&gt;*: polls recovered after 4 failures",
        ),
        (
            "fine_tune.not_found",
            {"error": "fine-tune not found", "http_status": 404, "consecutive_failures": 0},
            "fine-tune not found on the Hub (404)",
        ),
        (
            "checkpoint.updated",
            {"checkpoint": {"step": 7}, "changed": ["metrics.loss"]},
            "step *7* updated (metrics.loss)",
        ),
        ("checkpoint.removed", {"checkpoint": {"step": 7}}, "step *7* removed"),
    ],
)
def test_other_event_kinds(kind, extra, needle):
    assert needle in message(_event(kind, **extra))["blocks"][0]["text"]["text"]


def test_the_log_line_and_the_slack_message_show_one_headline():
    event = _event("fine_tune.poll_failing", error="Hub answered <503> " + "x" * 5000, consecutive_failures=3)
    line = describe(event)
    assert line.startswith("bot <sft>: polls failing, 3 in a row: Hub answered <503> xxx") and line.endswith("…")
    assert len(line) < 350  # the value is clipped in every rendering, not only in Slack's
    payload = message(event)
    assert payload["text"] == line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    rich = payload["blocks"][0]["text"]["text"]
    assert rich.startswith(":warning: *bot &lt;sft&gt;*: polls failing, 3 in a row: Hub answered &lt;503&gt; xxx")


def test_size_bound_with_huge_metrics_and_samples():
    huge = "x" * 50_000
    event = _event(
        "checkpoint.created",
        checkpoint={
            "step": 1,
            "metrics": {"loss": 0.1, **{f"metric_{i}_{huge[:200]}": i for i in range(200)}},
            "inference_samples": [{"prompt": huge, "completion": huge}] * 10,
            "model_name": huge,
        },
        is_best_loss=False,
    )
    event = Event(
        event.id,
        event.type,
        event.timestamp,
        {**event.data, "fine_tune": {**FINE_TUNE, "name": huge}},
        event.fine_tune_key,
    )
    payload = message(event)
    assert len(orjson.dumps(payload)) <= MAX_PAYLOAD_BYTES < 4000
    assert payload["text"]
    many = [_event("fine_tune.poll_failing", error=huge, http_status=500, consecutive_failures=i) for i in range(300)]
    assert len(orjson.dumps(digest(many))) <= MAX_PAYLOAD_BYTES


def test_digest_lists_the_burst():
    events = [
        _event("checkpoint.created", checkpoint={"step": s, "metrics": {"loss": 1 / s}}, is_best_loss=True)
        for s in range(1, 9)
    ]
    payload = digest(events)
    assert payload["text"] == "bot &lt;sft&gt;: 8 changes in one poll"
    listing = payload["blocks"][1]["text"]["text"]
    assert listing.count("•") == 8 and "step *8*" in listing


def _slack(receiver: Receiver, **extra: object) -> dict:
    return {"name": "team", "type": "slack", "url": receiver.url, "retry_schedule_s": [0, 0.2, 0.2], **extra}


async def test_burst_becomes_one_digest_message(tmp_path: Path):
    with Receiver() as slack:
        slack.script(Answer(status=200, body="ok", times=100))
        rig = Rig(tmp_path, _slack(slack, digest_over=3))
        burst = rig.commit(REF, 1, 2, 3, 4, 5)
        single = rig.commit(REF, 6)
        await rig.run_until(lambda: len(slack.deliveries()) == 2)
        first, second = (r.json for r in slack.deliveries())
        assert "5 changes in one poll" in first["text"]
        assert "step 6" in second["text"]
        states = rig.states(burst + single)
        assert all(value == [("team", "delivered")] for value in states.values())
        await rig.close()


async def test_one_message_per_second_and_429_retry_after(tmp_path: Path):
    with Receiver() as slack:
        slack.script(
            Answer(status=429, headers={"Retry-After": "2"}, body="rate_limited"),
            Answer(status=200, body="ok", times=10),
        )
        rig = Rig(tmp_path, _slack(slack))
        ids = [i for s in (1, 2, 3) for i in rig.commit(REF, s)]
        await rig.run_until(lambda: sum(r.status == 200 for r in slack.deliveries()) == 3, timeout=20)
        times = [r.at for r in slack.deliveries()]
        assert times[1] - times[0] >= 2.0  # Retry-After honoured
        assert all(b - a >= 0.95 for a, b in zip(times, times[1:], strict=False))  # about one per second
        assert [r.json["text"].split(" · ")[0] for r in slack.deliveries() if r.status == 200] == [
            "bot-sft: new checkpoint at step 1",
            "bot-sft: new checkpoint at step 2",
            "bot-sft: new checkpoint at step 3",
        ]
        rows = rig.store.deliveries_of(ids)
        assert rows[ids[0]][0].attempts == 2
        await rig.close()


async def test_plain_text_error_body_is_recorded(tmp_path: Path):
    with Receiver() as slack:
        slack.script(Answer(status=404, body="channel_not_found"))
        rig = Rig(tmp_path, _slack(slack))
        ids = rig.commit(REF, 1)
        await rig.run_until(lambda: rig.states(ids)[ids[0]] == [("team", "dead")])
        assert rig.store.deliveries_of(ids)[ids[0]][0].last_error == "HTTP 404: channel_not_found"
        await rig.close()


async def test_waiting_for_the_rate_limit_is_not_counted_against_the_delivery_timeout(tmp_path: Path):
    with Receiver() as slack:
        slack.script(Answer(status=429, headers={"Retry-After": "6"}, body="rate_limited"))
        rig = Rig(tmp_path, _slack(slack, timeout_s=0.5))  # the delivery timeout: 0.5 + 5 s
        first = rig.commit(REF, 1)
        await rig.run_until(lambda: rig.store.deliveries_of(first)[first[0]][0].attempts == 1)
        second = rig.commit(OTHER, 1)  # another lane: it waits about 6 s for the URL's next slot
        await rig.run_until(lambda: rig.states(second)[second[0]] != [("team", "pending")], timeout=20)
        (row,) = rig.store.deliveries_of(second)[second[0]]
        assert (row.state, row.attempts, row.last_error) == ("delivered", 1, None)
        times = [r.at for r in slack.deliveries()]
        assert times[1] - times[0] >= 5.9  # the back-off was honoured, and the wait did not time out
        await rig.close()
