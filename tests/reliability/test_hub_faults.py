"""Hub faults against the real daemon: every failure mode of the checkpoints endpoint, injected per fine-tune.

The daemon must stay up and healthy, count each failure as a failed poll of that fine-tune only, never change
the known checkpoints because of one (no checkpoint.removed, no re-announcement), keep polling the other
fine-tunes normally, and after recovery announce exactly what changed meanwhile, once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import TOKEN, base_config, wait_for, write_config

from watcher.core.models import FineTuneRef
from watcher.errors import HubUnavailable
from watcher.hub.client import HubClient
from watcher.testing.simhub import Fault, SimHub

from ._support import (
    change_of,
    events_json,
    fine_tune_key,
    healthz,
    listen_port,
    polls_total,
    statuses,
)

THRESHOLD = 2  # [watch] failure_threshold: every fault below lasts longer, so poll_failing fires once
HUB_TIMEOUT_S = 0.5
# the slow answer comes this many timeouts late: a daemon whose event loop a loaded machine stalls for a second
# must still see the timeout fire first (a stalled loop runs the ready answer before the due timer)
SLOW_FACTOR = 20


def _ft(name: str, repo: str = "faults") -> dict[str, str]:
    return {"namespace": "acme", "repo": repo, "id": name}


def _key(ft: dict[str, str]) -> str:
    return f"{ft['namespace']}/{ft['repo']}/{ft['id']}"


def _body(hub: SimHub, key: str, **top: Any) -> dict[str, Any]:
    """The document the Hub serves for a fine-tune now (as the simulated Hub builds it), with overrides."""
    checkpoints = hub.checkpoints(key)
    return {
        "branch": "x-model",
        "checkpoints": checkpoints,
        "fine_tune_id": key.rsplit("/", 1)[1],
        "status": "success",
        "status_message": "resource_found",
        "total_checkpoints": len(checkpoints),
        **top,
    }


def _with_checkpoint(hub: SimHub, key: str, index: int, **fields: Any) -> bytes:
    document = _body(hub, key)
    document["checkpoints"][index] = {**document["checkpoints"][index], **fields}
    return orjson.dumps(document)


def _without_step(hub: SimHub, key: str) -> bytes:
    document = _body(hub, key)
    document["checkpoints"][0] = {k: v for k, v in document["checkpoints"][0].items() if k != "step"}
    return orjson.dumps(document)


def _duplicated_step(hub: SimHub, key: str) -> bytes:
    document = _body(hub, key)
    document["checkpoints"].append(dict(document["checkpoints"][0]))
    return orjson.dumps(document)


HTML = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"

# name -> (fault, given the Hub and the fine-tune's key; whether the client retries it inside a poll;
#          the poll outcome; the http_status the failure events carry)
# Faults the client does not retry are injected for exactly FAILED_POLLS answers: each answer is one failed poll.
# Retried ones (several requests per poll) last until cleared.
FaultMaker = Callable[[SimHub, str], Fault]
FAILED_POLLS = 3
BYSTANDER_MAX_GAP_S = 10.0
FAULTS: dict[str, tuple[FaultMaker, bool, str, int | None]] = {
    "500": (lambda hub, key: Fault(status=500, times=FAILED_POLLS), False, "error", 500),
    "502": (lambda hub, key: Fault(status=502, times=None), True, "error", 502),
    "503": (lambda hub, key: Fault(status=503, times=None), True, "error", 503),
    "504": (lambda hub, key: Fault(status=504, times=None), True, "error", 504),
    "429": (lambda hub, key: Fault(status=429, times=None), True, "error", 429),
    "slower_than_timeout": (
        lambda hub, key: Fault(
            status=200, body=orjson.dumps(_body(hub, key)), delay_s=HUB_TIMEOUT_S * SLOW_FACTOR, times=None
        ),
        True,
        "error",
        None,
    ),
    "truncated_200": (
        lambda hub, key: Fault(status=200, body=orjson.dumps(_body(hub, key)), truncate=True, times=None),
        True,
        "error",
        None,
    ),
    "invalid_json": (
        lambda hub, key: Fault(status=200, body=b'{"checkpoints": [{"step": 1', times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "html_200": (
        lambda hub, key: Fault(status=200, body=HTML, content_type="text/html", times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "html_500": (
        lambda hub, key: Fault(status=500, body=HTML, content_type="text/html", times=FAILED_POLLS),
        False,
        "error",
        500,
    ),
    "schema_not_an_object": (lambda hub, key: Fault(status=200, body=b"[]", times=FAILED_POLLS), False, "error", 200),
    "schema_no_checkpoints": (
        lambda hub, key: Fault(status=200, body=orjson.dumps({"status": "success"}), times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "schema_checkpoints_null": (
        lambda hub, key: Fault(status=200, body=orjson.dumps(_body(hub, key, checkpoints=None)), times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "schema_step_is_a_string": (
        lambda hub, key: Fault(status=200, body=_with_checkpoint(hub, key, 1, step="200"), times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "schema_step_is_a_float": (
        lambda hub, key: Fault(status=200, body=_with_checkpoint(hub, key, 1, step=200.5), times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "schema_step_missing": (
        lambda hub, key: Fault(status=200, body=_without_step(hub, key), times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "schema_step_twice": (
        lambda hub, key: Fault(status=200, body=_duplicated_step(hub, key), times=FAILED_POLLS),
        False,
        "error",
        200,
    ),
    "schema_loss_is_a_string": (
        lambda hub, key: Fault(
            status=200, body=_with_checkpoint(hub, key, 0, metrics={"loss": "2.0"}), times=FAILED_POLLS
        ),
        False,
        "error",
        200,
    ),
    "401": (lambda hub, key: Fault(status=401, times=FAILED_POLLS), False, "unauthorized", 401),
    "403": (lambda hub, key: Fault(status=403, times=FAILED_POLLS), False, "unauthorized", 403),
}
VICTIMS = {name: _ft(f"ft_{name}") for name in FAULTS}
BYSTANDERS = [_ft("ft_calm_1", repo="calm"), _ft("ft_calm_2", repo="calm")]


def _setup(hub: SimHub, fine_tunes: list[dict[str, str]]) -> None:
    for ft in fine_tunes:
        key = hub.add_fine_tune(ft["namespace"], ft["repo"], ft["id"])
        hub.add_checkpoint(key, 100, loss=2.0, created_at="2026-01-01T00:00:00Z")
        hub.add_checkpoint(
            key,
            200,
            loss=1.5,
            created_at="2026-01-01T01:00:00Z",
            deployment_status="ACTIVE",
            model_id=f"model_{ft['id']}_200",
        )


def _write(
    tmp_path: Path,
    simhub: SimHub,
    fine_tunes: list[dict[str, str]],
    *,
    hub_options: dict[str, Any] | None = None,
    **sections: Any,
) -> Path:
    data = base_config(simhub, tmp_path, fine_tunes=fine_tunes, **sections)
    data["hub"].update(hub_options or {})
    return write_config(tmp_path / "c.toml", data)


def _wait_baseline(db: Path, keys: list[str]) -> None:
    wait_for(
        lambda: (found := statuses(db, keys)) and all(s.last_outcome == "ok" for s in found.values()),
        timeout=30,
        what="the silent baseline of every fine-tune",
    )


def _max_gap(hub: SimHub, key: str, start: float, end: float) -> float:
    """The longest stretch in [start, end] without a 200 answer to this fine-tune."""
    times = [start, *(r.at for r in hub.requests(key) if r.status == 200 and start <= r.at <= end), end]
    return max(b - a for a, b in zip(times, times[1:]))


def _by_key(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        found.setdefault(fine_tune_key(event), []).append(event)
    return found


def test_each_fault_fails_only_its_own_polls_and_recovery_announces_exactly_what_changed(hub, tmp_path, daemons):
    fine_tunes = [*VICTIMS.values(), *BYSTANDERS]
    keys = [_key(ft) for ft in fine_tunes]
    _setup(hub, fine_tunes)
    db = tmp_path / "watcher.db"
    config = _write(
        tmp_path,
        hub,
        fine_tunes,
        hub_options={"timeout_s": HUB_TIMEOUT_S, "max_concurrency": 64},
        watch={"failure_threshold": THRESHOLD},
    )
    daemon = daemons(config)
    port = listen_port(daemon)
    _wait_baseline(db, keys)
    assert events_json(config) == []
    before = polls_total(port)

    # the fault window: each victim fails; every fine-tune gets a new checkpoint meanwhile
    started = time.time()
    for name, (make, _, _, _) in FAULTS.items():
        hub.inject(_key(VICTIMS[name]), make(hub, _key(VICTIMS[name])))
    for key in keys:
        hub.add_checkpoint(key, 300, loss=1.0, created_at="2026-01-01T02:00:00Z")
    # the bystanders announce theirs during the window: their polls go on normally
    wait_for(
        lambda: (
            {(_key(ft), 300) for ft in BYSTANDERS}
            <= {
                (fine_tune_key(e), e["data"]["checkpoint"]["step"])
                for e in events_json(config)
                if e["type"] == "checkpoint.created"
            }
        ),
        what="the bystanders' new checkpoints",
    )
    retried = [name for name, (_, again, _, _) in FAULTS.items() if again]
    waited = time.monotonic()
    try:
        wait_for(
            lambda: (
                (found := statuses(db, keys))
                and all(found[_key(VICTIMS[name])].consecutive_failures >= THRESHOLD + 1 for name in retried)
            ),
            # a 429 without Retry-After closes the Hub-wide gate with a doubling back-off (1, 2, 4 ... s), during
            # which polls are held back, not failed: the victims' failures accrue more slowly than one per interval
            timeout=240,
            what=f"{THRESHOLD + 1} failed polls of each victim of a retried fault",
        )
    except AssertionError as err:  # say how far each victim got, and how the Hub-wide gate behaved
        found = statuses(db, keys) or {}
        counts = {name: getattr(found.get(_key(VICTIMS[name])), "consecutive_failures", None) for name in retried}
        gate = Counter(line.get("event") for line in daemon.logs() if str(line.get("event", "")).startswith("hub."))
        raise AssertionError(f"{err}; consecutive failures {counts}; gate log {dict(gate)}") from err
    print(f"\nfailed polls of every retried victim after {time.monotonic() - waited:.1f} s")
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert healthz(port) == 200
    still_failing = {_key(VICTIMS[name]) for name in retried}
    during = [
        change_of(e)
        for e in events_json(config)
        if fine_tune_key(e) in still_failing and e["type"] != "fine_tune.poll_failing"
    ]
    assert during == [], "a fine-tune announced something while its polls failed"
    for name in retried:
        hub.clear_faults(_key(VICTIMS[name]))

    # recovery: every victim answers 200 again and announces step 300
    def recovered() -> bool:
        found = statuses(db, keys)
        return bool(found) and all(s.last_outcome == "ok" and s.checkpoints == 3 for s in found.values())

    wait_for(recovered, timeout=60, what="every fine-tune recovered with three checkpoints")
    cleared = time.time()
    polled = {key: len(hub.requests(key)) for key in keys}
    wait_for(lambda: all(len(hub.requests(key)) >= polled[key] + 3 for key in keys), what="three more polls each")
    after = polls_total(port)
    assert daemon.proc.poll() is None and healthz(port) == 200
    assert daemon.terminate() == 0

    events = _by_key(events_json(config))
    logged = Counter((line.get("event"), line.get("fine_tune")) for line in daemon.logs())
    problems: list[str] = []
    for name, (_, again, outcome, http_status) in FAULTS.items():
        key = _key(VICTIMS[name])
        # state changes are logged, not repeats: poll.failed once (a refused token is logged as hub.unauthorized)
        want_logs = {"poll.failed": 1 if outcome == "error" else 0, "poll.recovered": 1}
        got_logs = {event: logged[(event, key)] for event in want_logs}
        if got_logs != want_logs:
            problems.append(f"{name}: logged {got_logs}, want {want_logs}")
        failed = after.get((key, outcome), 0) - before.get((key, outcome), 0)
        other = "unauthorized" if outcome == "error" else "error"
        answered = [r for r in hub.requests(key) if started <= r.at]
        if not again and failed != FAILED_POLLS:
            problems.append(f"{name}: {failed} failed polls counted for {FAILED_POLLS} faulty answers")
        if again and failed < THRESHOLD + 1:
            problems.append(f"{name}: only {failed} failed polls counted")
        if after.get((key, other), 0) != before.get((key, other), 0):
            problems.append(f"{name}: polls counted as {other!r}")
        if len(answered) < failed:
            problems.append(f"{name}: more failed polls ({failed}) than requests ({len(answered)})")
        got = [
            (
                e["type"],
                e["data"].get("checkpoint", {}).get("step"),
                e["data"].get("http_status"),
                e["data"].get("consecutive_failures"),
            )
            for e in events.get(key, [])
        ]
        want = [
            ("fine_tune.poll_failing", None, http_status, THRESHOLD),
            ("fine_tune.poll_recovered", None, 200, failed),
            ("checkpoint.created", 300, None, None),
        ]
        if got != want:
            problems.append(f"{name}: events {got}, want {want}")
    for ft in BYSTANDERS:
        key = _key(ft)
        if [change_of(e) for e in events.get(key, [])] != [(key, 300, "checkpoint.created", None)]:
            problems.append(f"bystander {key}: events {[change_of(e) for e in events.get(key, [])]}")
        if after.get((key, "error"), 0) != before.get((key, "error"), 0):
            problems.append(f"bystander {key}: failed polls")
        if logged[("poll.failed", key)] or logged[("poll.recovered", key)]:
            problems.append(f"bystander {key}: logged as failing")
        # the 429 victim closes the Hub-wide gate for 1 s at a time (a bystander's 200 reopens it and resets the
        # back-off), so a bystander waits a few seconds at most on a loaded machine; a back-off that kept doubling
        # (1, 2, 4 ... 60 s over the window) would starve it for far longer than this bound
        if (gap := _max_gap(hub, key, started, cleared)) > BYSTANDER_MAX_GAP_S:
            problems.append(f"bystander {key}: {gap:.1f}s without a poll during the fault window")
    assert not problems, "\n".join(problems)
    assert set(events) == set(keys)


def test_retry_after_holds_the_fine_tune_back_even_across_a_kill_9(hub, tmp_path, daemons):
    victim, bystander = _ft("ft_limited"), _ft("ft_calm")
    keys = [_key(victim), _key(bystander)]
    _setup(hub, [victim, bystander])
    db = tmp_path / "watcher.db"
    config = _write(tmp_path, hub, [victim, bystander])
    daemon = daemons(config)
    _wait_baseline(db, keys)
    hold_s = 11  # beyond the client's quick-retry budget (about 10 s): the poll fails and the hold persists
    hub.inject(keys[0], Fault(status=429, retry_after=str(hold_s), times=1))
    hub.add_checkpoint(keys[0], 300, loss=1.0)
    hub.add_checkpoint(keys[1], 300, loss=1.0)
    limited = wait_for(lambda: [r for r in hub.requests(keys[0]) if r.status == 429], what="the 429")[0]
    held = wait_for(
        lambda: (found := statuses(db, keys)) and found[keys[0]].not_before and found[keys[0]],
        what="the failed poll and its hold committed",
    )
    assert held.last_outcome == "error" and held.consecutive_failures == 1
    assert held.not_before >= limited.at + hold_s
    port = listen_port(daemon)
    assert healthz(port) == 200
    daemon.kill9()
    daemon = daemons(config)
    port = listen_port(daemon)
    wait_for(
        lambda: any(r.at > limited.at for r in hub.requests(keys[0])),
        timeout=hold_s + 10,
        what="the next request after the hold",
    )
    after = [r for r in hub.requests(keys[0]) if r.at > limited.at]
    assert after[0].at >= limited.at + hold_s, f"polled {after[0].at - limited.at:.2f}s after a {hold_s}s Retry-After"
    calm = [r for r in hub.requests(keys[1]) if limited.at < r.at < limited.at + hold_s]
    assert len(calm) >= 5 and all(r.status == 200 for r in calm), "the other fine-tune was held back too"
    wait_for(
        lambda: (
            (found := statuses(db, keys)) and found[keys[0]].last_outcome == "ok" and found[keys[0]].checkpoints == 3
        ),
        what="recovery",
    )
    assert healthz(port) == 200
    assert daemon.terminate() == 0
    assert sorted(change_of(e) for e in events_json(config)) == sorted(
        [(keys[0], 300, "checkpoint.created", None), (keys[1], 300, "checkpoint.created", None)]
    )


def _clone(source: SimHub, fine_tunes: list[dict[str, str]], *, port: int, then: Callable[[SimHub], None]) -> SimHub:
    """A new simulated Hub serving the same fine-tunes and checkpoints, changed by `then`, started on the same
    port."""

    def start() -> SimHub | None:
        clone = SimHub(token=TOKEN, port=port)
        for ft in fine_tunes:
            key = clone.add_fine_tune(ft["namespace"], ft["repo"], ft["id"])
            for checkpoint in source.checkpoints(key):
                fields = {k: v for k, v in checkpoint.items() if k != "step"}
                clone.add_checkpoint(key, checkpoint["step"])
                clone.update_checkpoint(key, checkpoint["step"], **fields)
        then(clone)
        try:
            return clone.start()
        except OSError:  # the port was, for a moment, the local end of one of the daemon's refused connects
            return None

    return wait_for(start, timeout=10, interval=0.1, what=f"port {port} free again")


def test_connection_refused_while_the_hub_is_down(tmp_path, daemons):
    fine_tunes = [_ft("ft_1"), _ft("ft_2"), _ft("ft_3")]
    keys = [_key(ft) for ft in fine_tunes]
    db = tmp_path / "watcher.db"
    with SimHub(token=TOKEN) as first:
        _setup(first, fine_tunes)
        port = first.port
        config = _write(
            tmp_path, first, fine_tunes, hub_options={"timeout_s": 1}, watch={"failure_threshold": THRESHOLD}
        )
        daemon = daemons(config)
        http_port = listen_port(daemon)
        _wait_baseline(db, keys)
    # the Hub is gone: nothing listens on its port
    wait_for(
        lambda: (found := statuses(db, keys)) and all(s.consecutive_failures >= THRESHOLD + 1 for s in found.values()),
        timeout=60,
        what="failed polls",
    )
    down = statuses(db, keys)
    assert down is not None
    assert all(s.last_outcome == "error" and s.last_error and s.last_http_status is None for s in down.values())
    assert daemon.proc is not None and daemon.proc.poll() is None and healthz(http_port) == 200
    assert events_json(config) and all(e["type"] == "fine_tune.poll_failing" for e in events_json(config))
    failed = {key: polls_total(http_port).get((key, "error"), 0) for key in keys}

    def meanwhile(hub: SimHub) -> None:
        for key in keys:
            hub.add_checkpoint(key, 300, loss=1.0, created_at="2026-01-01T02:00:00Z")
        hub.set_deployment_status(keys[0], 200, "INACTIVE")

    back = _clone(first, fine_tunes, port=port, then=meanwhile)
    try:
        wait_for(
            lambda: (
                (found := statuses(db, keys))
                and all(s.last_outcome == "ok" and s.checkpoints == 3 for s in found.values())
            ),
            timeout=30,
            what="recovery",
        )
        polled = {key: len(back.requests(key)) for key in keys}
        wait_for(lambda: all(len(back.requests(key)) >= polled[key] + 2 for key in keys), what="two more polls")
        totals = polls_total(http_port)
        assert daemon.terminate() == 0
    finally:
        back.stop()
    events = _by_key(events_json(config))
    for key in keys:
        got = [(e["type"], e["data"].get("consecutive_failures")) for e in events[key]]
        assert got[:2] == [
            ("fine_tune.poll_failing", THRESHOLD),
            ("fine_tune.poll_recovered", totals.get((key, "error"), 0)),
        ], key
        assert totals.get((key, "error"), 0) >= failed[key]
        want = [(key, 300, "checkpoint.created", None)]  # all from the first poll after the outage, in step order
        if key == keys[0]:
            want.insert(0, (key, 200, "checkpoint.deployment_changed", ("ACTIVE", "INACTIVE")))
        assert [change_of(e) for e in events[key][2:]] == want, key


# A regression test: with httpx-aiohttp as the Hub transport (commit 41b05f1) a refused connection was mapped to
# httpx.ConnectTimeout and reported as "timed out (ConnectTimeout)".
async def test_a_refused_connection_is_reported_as_a_connection_failure_not_a_timeout():
    hub = SimHub(token=TOKEN).start()
    url = hub.url
    hub.stop()  # nothing listens there now: connect() is refused at once
    client = HubClient(base_url=url, token=TOKEN, timeout_s=5, retry_budget_s=0.5, attempts=1)
    try:
        with pytest.raises(HubUnavailable) as raised:
            await client.fetch(FineTuneRef("acme", "faults", "ft_1", "ft_1"))
    finally:
        await client.aclose()
    assert raised.value.message.startswith("connection failed"), raised.value.message


def test_a_401_on_one_fine_tune_is_logged_once_not_on_every_poll(hub, tmp_path, daemons):
    refused, calm = _ft("ft_refused"), _ft("ft_calm")
    keys = [_key(refused), _key(calm)]
    _setup(hub, [refused, calm])
    config = _write(tmp_path, hub, [refused, calm])
    daemon = daemons(config)
    _wait_baseline(tmp_path / "watcher.db", keys)
    hub.inject(keys[0], Fault(status=401, times=None))  # e.g. the token lost access to this one repository
    wait_for(lambda: sum(r.status == 401 for r in hub.requests(keys[0])) >= 6, what="six refused polls")
    assert daemon.terminate() == 0
    logged = Counter(line.get("event") for line in daemon.logs())
    assert logged["hub.unauthorized"] == 1, logged
    assert logged["hub.authorized"] == 0, logged
