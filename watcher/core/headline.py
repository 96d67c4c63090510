"""One headline per event type, written once for every notifier: what it says, not how it is marked up.

A headline is the fine-tune's name, a sentence of parts (words, and values a chat message marks up and clips),
an optional icon, and facts (metrics, counts) that a one-line rendering appends and a chat message shows as
fields. `plain()` renders it for log lines, the CLI and chat fallbacks (`describe()`); the Slack notifier renders
the same headline as mrkdwn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from watcher.core.models import JSON, Event

Style = Literal["", "strong", "code", "arrow"]


@dataclass(frozen=True, slots=True)
class Part:
    """A piece of a headline's sentence: plain text, or a value shown strong or as code, clipped to `limit`."""

    text: str
    style: Style = ""
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Fact:
    """A detail after the sentence; a chat message shows it in the headline only with a `badge` (an emoji name),
    else in its own fields."""

    text: str
    badge: str | None = None


@dataclass(frozen=True, slots=True)
class Headline:
    """What an event's one-line summary says; `subject` is the fine-tune's name (None: not about one)."""

    subject: str | None
    sentence: tuple[Part, ...]
    icon: str | None = None  # an emoji name a chat message starts with
    facts: tuple[Fact, ...] = ()


ARROW = Part("->", "arrow")


def clip(text: str, limit: int | None) -> str:
    """At most `limit` characters, the last one an ellipsis when cut (None: no limit)."""
    return text if limit is None or len(text) <= limit else text[: max(0, limit - 1)] + "…"


def plain(headline: Headline) -> str:
    """A headline as one line of plain text: "name: sentence · fact · fact"."""
    subject = "" if headline.subject is None else f"{headline.subject}: "
    sentence = "".join(clip(part.text, part.limit) for part in headline.sentence)
    return subject + sentence + "".join(f" · {fact.text}" for fact in headline.facts)


def describe(event: Event) -> str:
    """A one-line human summary of an event (log notifier, CLI tables, chat fallbacks)."""
    return plain(headline(event))


def duration_text(seconds: Any) -> str | None:
    """A duration in seconds as "1h 02m", "3m 05s" or "42s"; None when not a number."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        return None
    total = round(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _text(value: Any, limit: int | None = None) -> Part:
    return Part(str(value), "", limit)


def _strong(value: Any, limit: int | None = None) -> Part:
    return Part(str(value), "strong", limit)


def _code(value: Any, limit: int | None = None) -> Part:
    return Part(str(value), "code", limit)


def _change(before: Any, after: Any) -> tuple[Part, ...]:
    """`before` -> `after` (a status; "none" when unset)."""
    return (_code(before or "none", 40), _text(" "), ARROW, _text(" "), _code(after or "none", 40))


def headline(event: Event) -> Headline:
    """The headline of an event, whichever notifier shows it."""
    data = event.data
    name = str(_dict(data.get("fine_tune")).get("name", "?"))
    checkpoint = _dict(data.get("checkpoint"))
    step = checkpoint.get("step")
    kind = event.type
    if kind == "checkpoint.created":
        metrics = _dict(checkpoint.get("metrics"))
        shown = [
            f"{m} {_number(metrics[m])}"
            for m in ("loss", "mean_token_accuracy", "learning_rate")
            if metrics.get(m) is not None
        ]
        facts = [Fact(", ".join(shown))] if shown else []
        if data.get("is_best_loss"):
            facts.append(Fact("best loss so far", badge="trophy"))
        return Headline(name, (_text("new checkpoint at step "), _strong(step)), facts=tuple(facts))
    if kind == "checkpoint.updated":
        changed = ", ".join(str(field) for field in (data.get("changed") or [])[:10])
        return Headline(name, (_text("step "), _strong(step), _text(" updated ("), _text(changed, 300), _text(")")))
    if kind == "checkpoint.deployment_changed":
        change = _change(data.get("previous_deployment_status"), data.get("deployment_status"))
        return Headline(name, (_text("step "), _strong(step), _text(" deployment "), *change))
    if kind == "checkpoint.removed":
        return Headline(name, (_text("step "), _strong(step), _text(" removed")))
    if kind == "fine_tune.not_found":
        return Headline(name, (_text("fine-tune not found on the Hub (404)"),), icon="grey_question")
    if kind == "fine_tune.poll_failing":
        failures = data.get("consecutive_failures")
        error = _text(data.get("error") or "unknown error", 300)
        return Headline(name, (_text(f"polls failing, {failures} in a row: "), error), icon="warning")
    if kind == "fine_tune.poll_recovered":
        failures = data.get("consecutive_failures")
        return Headline(name, (_text(f"polls recovered after {failures} failures"),), icon="white_check_mark")
    if kind == "watcher.test":
        sentence = (_text("Test message from oxen-watcher for notifier "), _strong(data.get("notifier")))
        return Headline(None, sentence, icon="wave")
    lifecycle = _lifecycle(kind, name, data)
    return lifecycle if lifecycle is not None else Headline(name, (_text(kind),))


def _lifecycle(kind: str, name: str, data: JSON) -> Headline | None:
    if kind == "fine_tune.discovered":
        sentence = [_text("new fine-tune in "), _strong(data.get("source") or "?", 100)]
        for key, label in (("base_model", " on "), ("created_by", " by ")):
            if data.get(key):
                sentence += [_text(label), _text(data[key], 100)]
        sentence += [_text(" (status "), _code(data.get("status") or "unknown", 40), _text(")")]
        return Headline(name, tuple(sentence), icon="new")
    if kind == "fine_tune.stalled":
        stalled = duration_text(data.get("stalled_for_s")) or "a while"
        waiting = (_text("no new checkpoint for "), _strong(stalled), _text(" while "), _code(data.get("status")))
        return Headline(name, waiting, icon="hourglass")
    if kind != "fine_tune.status_changed":
        return None
    status = data.get("status")
    duration = duration_text(data.get("duration_s"))
    facts = [Fact(f"ran {duration}")] if duration and status not in ("completed", "errored", "stopped") else []
    if "checkpoints" in data:
        facts.append(Fact(f"{data.get('checkpoints')} checkpoints"))
        if data.get("best_loss") is not None:
            facts.append(Fact(f"best loss {_number(data['best_loss'])} at step {data.get('best_step')}"))
    ran = (_text(" after "), _text(duration)) if duration else ()
    if status == "completed":
        finished = (_text(" in "), _strong(duration)) if duration else ()
        return Headline(name, (_text("run finished"), *finished), icon="checkered_flag", facts=tuple(facts))
    if status == "errored":
        error = _text(data.get("error") or "no error text from the Hub", 500)
        return Headline(name, (_text("run failed"), *ran, _text(": "), error), icon="x", facts=tuple(facts))
    if status == "stopped":
        return Headline(name, (_text("run stopped"), *ran), icon="octagonal_sign", facts=tuple(facts))
    return Headline(name, (_text("status "), *_change(data.get("previous_status"), status)), facts=tuple(facts))
