"""Page and API bodies from reports and a live snapshot; pure and synchronous (run on a worker thread)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from watcher.core.models import EVENT_TYPES, FineTuneRef, metric_of
from watcher.store.pages import EventRow, Reports
from watcher.web.charts import Chart, ema, fmt, fmt_step, loss_chart, metric_chart, sparkline
from watcher.web.views import (
    SORTS,
    LiveSnapshot,
    Row,
    age,
    build_rows,
    human_bytes,
    iso,
    notifier_views,
    page_of,
    run_path,
    sort_rows,
)

SMALL_METRICS = (
    ("mean_token_accuracy", "mean token accuracy"),
    ("learning_rate", "learning rate"),
    ("grad_norm", "grad norm"),
)
KNOWN_METRICS = ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "epoch")
EVENTS_SHOWN = 100
SAMPLES_SHOWN = 5
SAMPLE_CHARS = 2000

_env = Environment(
    loader=PackageLoader("watcher.web", "templates"),
    autoescape=select_autoescape(["html"], default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(fmt=fmt, step=fmt_step, size=human_bytes, iso=iso)


def _header(reports: Reports, live: LiveSnapshot, rows: Sequence[Row] | None = None) -> dict[str, Any]:
    notifiers = notifier_views(live, reports.delivery_health(live.notifiers))
    failing = sum(1 for row in rows if row.failing) if rows is not None else None
    return {"live": live, "notifiers": notifiers, "failing": failing, "age": lambda at: age(live.now, at)}


def overview_rows(reports: Reports, live: LiveSnapshot, column: str, descending: bool) -> list[Row]:
    """Every watched fine-tune, sorted."""
    summaries = reports.summaries([ref.key for ref in live.refs])
    return sort_rows(build_rows(live, summaries), column, descending)


def overview_html(reports: Reports, live: LiveSnapshot, *, column: str, descending: bool, page: int) -> str:
    """The `/` page."""
    rows = overview_rows(reports, live, column, descending)
    shown, page, pages = page_of(rows, page)
    sort = f"-{column}" if descending else column

    def sort_link(name: str) -> str:
        # a second click on the current column reverses it
        wanted = f"-{name}" if name == column and not descending else name
        return f"/?sort={wanted}"

    return _env.get_template("overview.html").render(
        **_header(reports, live, rows),
        rows=shown,
        total=len(rows),
        page=page,
        pages=pages,
        sort=sort,
        column=column,
        descending=descending,
        sort_link=sort_link,
        sparkline=sparkline,
        sorts=SORTS,
    )


def overview_json(
    reports: Reports, live: LiveSnapshot, *, column: str, descending: bool, page: int, per_page: int
) -> dict[str, Any]:
    """The `/api/v1/fine-tunes` document."""
    rows = overview_rows(reports, live, column, descending)
    shown, page, pages = page_of(rows, page, per_page)
    return {
        "fine_tunes": [row.as_json() for row in shown],
        "total": len(rows),
        "page": page,
        "pages": pages,
        "per_page": per_page,
        "sort": f"-{column}" if descending else column,
        "delivery": [view.as_json() for view in notifier_views(live, reports.delivery_health(live.notifiers))],
        "watcher": {
            "alive": live.alive.ok,
            "alive_reason": live.alive.reason or None,
            "ready": live.ready.ok,
            "ready_reason": live.ready.reason or None,
        },
    }


def _series(checkpoints: Sequence[Any], name: str) -> list[tuple[int, float]]:
    return [(c.step, v) for c in checkpoints if (v := metric_of(c.data, name)) is not None and math.isfinite(v)]


def run_html(reports: Reports, live: LiveSnapshot, ref: FineTuneRef, *, log: bool) -> str:
    """The run page of one fine-tune."""
    (row,) = build_rows(_only(live, ref), reports.summaries([ref.key]))
    checkpoints = reports.checkpoints(ref.key)
    steps = [c.step for c in checkpoints]
    x_domain = (min(steps), max(steps)) if steps else None
    losses = _series(checkpoints, "loss")
    smoothed = ema([v for _, v in losses])
    loss = loss_chart(losses, log=log, x_domain=x_domain)
    small: list[Chart] = [
        metric_chart(label, _series(checkpoints, name), x_domain=x_domain, ident=f"{name}-chart")
        for name, label in SMALL_METRICS
    ]
    metric_names = sorted(
        {k for c in checkpoints if isinstance(c.data.get("metrics"), dict) for k in c.data["metrics"]},
        key=lambda k: (KNOWN_METRICS.index(k) if k in KNOWN_METRICS else len(KNOWN_METRICS), k),
    )
    # cells formatted here, not in the template: a run can have thousands of checkpoints
    loss_rows = [(fmt_step(s), fmt(v), fmt(w)) for (s, v), w in zip(reversed(losses), reversed(smoothed))]
    small_rows = [
        (fmt_step(c.step), *(fmt(metric_of(c.data, name)) for name, _ in SMALL_METRICS))
        for c in reversed(checkpoints)
        if any(metric_of(c.data, name) is not None for name, _ in SMALL_METRICS)
    ]
    table = [
        (
            c.step == row.summary.best_step,
            fmt_step(c.step),
            c.data.get("created_at") if isinstance(c.data.get("created_at"), str) else "—",
            [fmt(metric_of(c.data, name)) for name in metric_names],
            c.data.get("deployment_status") or "—",
            human_bytes(c.data.get("size_bytes")),
        )
        for c in reversed(checkpoints)
    ]
    events = reports.events(limit=50, fine_tune=ref.key)
    sampled = next((c for c in reversed(checkpoints) if c.data.get("inference_samples")), None)
    return _env.get_template("run.html").render(
        **_header(reports, live),
        row=row,
        ref=ref,
        table=table,
        metric_names=metric_names,
        loss=loss,
        loss_rows=loss_rows,
        small=small,
        small_names=[name for name, _ in SMALL_METRICS],
        small_rows=small_rows,
        log=log,
        event_rows=_event_views(events, live),
        path=run_path(ref),
        samples_step=sampled.step if sampled else None,
        samples=_samples(sampled.data.get("inference_samples")) if sampled else [],
    )


def _samples(raw: Any) -> list[list[tuple[str, str]]]:
    """The inference samples of a checkpoint as (field, text) pairs: free-form objects from the Hub, shown as text
    (escaped by the template), each value cut at SAMPLE_CHARS and at most SAMPLES_SHOWN of them."""
    if not isinstance(raw, list):
        return []
    found = []
    for sample in raw[:SAMPLES_SHOWN]:
        items = sample.items() if isinstance(sample, dict) else [("sample", sample)]
        fields = []
        for name, value in items:
            text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
            fields.append((str(name), text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " …"))
        found.append(fields)
    return found


def checkpoints_json(reports: Reports, ref: FineTuneRef) -> dict[str, Any]:
    """The `/api/v1/fine-tunes/{namespace}/{repo}/{id}/checkpoints` document (inference samples left out)."""
    checkpoints = reports.checkpoints(ref.key)
    losses = _series(checkpoints, "loss")
    smoothed = dict(zip((s for s, _ in losses), ema([v for _, v in losses])))
    return {
        "fine_tune": ref.as_data(),
        "checkpoints": [
            {
                **{k: v for k, v in c.data.items() if k != "inference_samples"},
                "step": c.step,
                "loss_smoothed": smoothed.get(c.step),
            }
            for c in checkpoints
        ],
    }


def _only(live: LiveSnapshot, ref: FineTuneRef) -> LiveSnapshot:
    return LiveSnapshot(
        refs=(ref,),
        health=live.health,
        notifiers=live.notifiers,
        disabled=live.disabled,
        alive=live.alive,
        ready=live.ready,
        now=live.now,
    )


def _event_views(rows: Sequence[EventRow], live: LiveSnapshot) -> list[dict[str, Any]]:
    refs = {ref.key: ref for ref in live.refs}
    return [_event_view(row, refs) for row in rows]


def _event_view(row: EventRow, refs: Mapping[str, FineTuneRef]) -> dict[str, Any]:
    data = row.event.data
    fine_tune = data["fine_tune"] if isinstance(data.get("fine_tune"), dict) else {}
    checkpoint = data.get("checkpoint") if isinstance(data.get("checkpoint"), dict) else None
    detail = []
    if checkpoint is not None:
        detail.append(f"step {fmt_step(checkpoint.get('step') if isinstance(checkpoint.get('step'), int) else None)}")
        loss = metric_of(checkpoint, "loss")
        if loss is not None:
            detail.append(f"loss {fmt(loss)}")
    if "previous_deployment_status" in data:
        detail.append(
            f"deployment {data.get('previous_deployment_status') or '—'} → {data.get('deployment_status') or '—'}"
        )
    if data.get("is_best_loss"):
        detail.append("best loss")
    if isinstance(data.get("changed"), list):
        detail.append("changed " + ", ".join(str(c) for c in data["changed"]))
    if data.get("error"):
        detail.append(f"error: {data['error']}")
    ref = refs.get(row.event.fine_tune_key)
    return {
        "id": row.event.id,
        "type": row.event.type,
        "timestamp": row.event.timestamp,
        "key": row.event.fine_tune_key,
        "name": fine_tune.get("name") or row.event.fine_tune_key,
        "path": run_path(ref) if ref is not None else None,
        "detail": "; ".join(detail),
        "deliveries": row.deliveries,
    }


def events_html(reports: Reports, live: LiveSnapshot, *, type: str | None, fine_tune: str | None) -> str:
    """The `/events` page."""
    events = reports.events(limit=EVENTS_SHOWN, type=type, fine_tune=fine_tune)
    return _env.get_template("events.html").render(
        **_header(reports, live),
        events=_event_views(events, live),
        types=EVENT_TYPES,
        type=type,
        fine_tune=fine_tune,
        limit=EVENTS_SHOWN,
    )


def events_json(reports: Reports, *, limit: int, type: str | None, fine_tune: str | None) -> dict[str, Any]:
    """The `/api/v1/events` document."""
    events = reports.events(limit=limit, type=type, fine_tune=fine_tune)
    return {
        "events": [{**row.event.envelope(), "deliveries": [d.as_json() for d in row.deliveries]} for row in events],
        "limit": limit,
    }


def error_html(live: LiveSnapshot, *, status: int, message: str) -> str:
    """A small error page (404, 503) with the usual header."""
    return _env.get_template("error.html").render(
        live=live, notifiers=[], failing=None, age=lambda at: age(live.now, at), status=status, message=message
    )
