"""Crash loop: the real daemon is killed with SIGKILL at 20 random (seeded) moments while the simulated Hub keeps
changing three fine-tunes and two webhook receivers fail at random. Afterwards every change the test made must
have produced exactly one event, and every event must have reached every notifier that wants it (at least once).

Changes never coalesce: a change to a checkpoint is made only once the previous change to that same checkpoint
is committed (seen in the database), so each change is observed by exactly one poll, whenever that poll runs.
Changes to different checkpoints pile up freely while the daemon is down.
"""

from __future__ import annotations

import base64
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import base_config, wait_for, write_config

from watcher.testing.simhub import SimHub

from ._changes import HubChanges, ScriptedReceiver, first_2xx_order, random_answers
from ._support import change_of, events_json, fine_tune_key, statuses, stored_events

SEED = 20_240_611
CYCLES = 20
ANSWERS = (200, 200, 500, 503)  # half the deliveries fail
SECRET = "whsec_" + base64.b64encode(b"crash-loop-signing-secret-32byte").decode()
FINE_TUNES = [
    {"namespace": "acme", "repo": "bot", "id": "ft_a", "name": "bot-a"},
    {"namespace": "acme", "repo": "bot", "id": "ft_b"},
    {"namespace": "acme", "repo": "summarizer", "id": "ft_c"},
]
KEYS = [f"{ft['namespace']}/{ft['repo']}/{ft['id']}" for ft in FINE_TUNES]


class Producer(threading.Thread, HubChanges):
    """Keeps changing the Hub: new checkpoints, deployment transitions, metric updates, removals."""

    def __init__(self, hub: SimHub, db: Path, rng: random.Random) -> None:
        super().__init__(name="producer", daemon=True)
        self._init_changes(hub, KEYS, rng)
        self.db = db
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.last_seq = 0

    def observe(self) -> None:
        """Mark the changes whose events are committed."""
        found = stored_events(self.db, after=self.last_seq)
        for seq, envelope in found or ():
            self.pending.pop(change_of(envelope), None)
            self.last_seq = seq

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.observe()
                for key in KEYS:
                    in_flight = sum(1 for ft, _ in self.pending.values() if ft == key)
                    if in_flight < 3 and self.rng.random() < 0.5:
                        self.change(key)
                self.stop.wait(self.rng.uniform(0.03, 0.12))
        except BaseException as err:  # reported by the test
            self.error = err


def test_kill_9_at_random_moments_loses_nothing_and_announces_each_change_once(hub, tmp_path, daemons):
    rng = random.Random(SEED)
    for ft in FINE_TUNES:
        key = hub.add_fine_tune(ft["namespace"], ft["repo"], ft["id"], name=ft.get("name"))
        hub.add_checkpoint(key, 100, loss=2.5)
        hub.add_checkpoint(key, 200, loss=2.0)
    db = tmp_path / "watcher.db"
    with ScriptedReceiver(secret=SECRET) as everything, ScriptedReceiver(secret=SECRET) as created_only:
        everything.script(*random_answers(rng, 600, statuses=ANSWERS))
        created_only.script(*random_answers(rng, 300, statuses=ANSWERS))
        fast = {"secret": SECRET, "retry_schedule_s": [0, 0.2, 0.5], "timeout_s": 3}
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=FINE_TUNES,
            notifiers=[
                {"name": "all", "type": "webhook", "url": everything.url, **fast},
                {
                    "name": "created",
                    "type": "webhook",
                    "url": created_only.url,
                    "events": ["checkpoint.created"],
                    **fast,
                },
            ],
        )
        config = write_config(tmp_path / "c.toml", data)

        daemon = daemons(config)
        wait_for(
            lambda: (found := statuses(db, KEYS)) and all(s.last_outcome == "ok" for s in found.values()),
            timeout=60,
            what="the silent baseline of every fine-tune",
        )
        producer = Producer(hub, db, random.Random(SEED + 1))
        producer.start()
        crash_rng = random.Random(SEED + 2)
        pause = threading.Event()  # never set: its wait() is the randomized crash moment
        for cycle in range(CYCLES):
            during_start_up = crash_rng.random() < 0.2
            after = crash_rng.uniform(0.0, 0.6) if during_start_up else crash_rng.uniform(0.0, 1.6)
            if not during_start_up:  # the moment is drawn from the start, so a slow machine still polls
                try:
                    # a loaded machine may take long to start a daemon; one that exits instead fails at once
                    wait_for(
                        lambda: (
                            daemon.proc is not None
                            and (
                                daemon.proc.poll() is not None
                                or any(e.get("event") == "watcher.started" for e in daemon.logs())
                            )
                        ),
                        timeout=90,
                        what="watcher.started",
                    )
                    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon exited"
                except AssertionError as err:  # say what the daemon was doing instead of starting
                    raise AssertionError(f"{err}; its output:\n{daemon.output()[-4000:]}") from err
            pause.wait(after)
            daemon.kill9()
            pause.wait(crash_rng.uniform(0.0, 0.5))  # down: changes pile up unobserved
            assert producer.error is None, producer.error
            if cycle < CYCLES - 1:
                daemon = daemons(config)
        producer.stop.set()
        producer.join(10)
        assert producer.error is None, producer.error

        # once more, with receivers that answer 200: everything is announced and delivered
        everything.clear_script()
        created_only.clear_script()
        daemon = daemons(config)

        def settled() -> list[dict[str, Any]] | None:
            producer.observe()
            if producer.pending:
                return None
            events = events_json(config, check=False)
            if events is not None and all(d["state"] == "delivered" for event in events for d in event["deliveries"]):
                return events
            return None

        wait_for(settled, timeout=180, interval=0.3, what="every change announced and delivered")
        # a few more polls of each fine-tune: nothing else may turn up
        polled = {key: len(hub.requests(key)) for key in KEYS}
        wait_for(
            lambda: all(len(hub.requests(key)) >= polled[key] + 3 for key in KEYS), timeout=60, what="three more polls"
        )
        wait_for(settled, timeout=60, interval=0.3, what="everything delivered")
        assert daemon.terminate() == 0

    events = events_json(config)
    ids = [event["id"] for event in events]
    by_id = {event["id"]: event for event in events}
    print(
        f"\n{len(producer.made)} changes, {len(events)} events, "
        f"{len(everything.deliveries())} + {len(created_only.deliveries())} webhook requests"
    )

    # every change produced exactly one event, nothing else was announced
    made = Counter(producer.made)
    assert all(count == 1 for count in made.values())
    announced = Counter(change_of(event) for event in events)
    missing, extra = made - announced, announced - made
    assert not missing and not extra, f"missing: {sorted(missing, key=str)}\nextra: {sorted(extra, key=str)}"
    assert len(set(ids)) == len(ids)
    assert len(events) >= 30, "the crash loop made too few changes to mean anything"
    for event in events:
        if event["type"] == "checkpoint.created":
            step = event["data"]["checkpoint"]["step"]
            assert event["data"]["checkpoint"] == producer.created[(fine_tune_key(event), step)]

    # every event reached every notifier that wants it, signed, with the body the database holds
    for event in events:
        wanted = {"all", "created"} if event["type"] == "checkpoint.created" else {"all"}
        assert {d["notifier"]: d["state"] for d in event["deliveries"]} == dict.fromkeys(wanted, "delivered")
    created_ids = {event_id for event_id in ids if by_id[event_id]["type"] == "checkpoint.created"}
    for receiver, want in ((everything, set(ids)), (created_only, created_ids)):
        received = receiver.deliveries()
        assert all(got.verified for got in received)
        assert {got.webhook_id for got in received if 200 <= got.status < 300} == want
        bodies: dict[str, bytes] = {}
        for got in received:
            envelope = {k: v for k, v in by_id[got.webhook_id].items() if k != "deliveries"}
            assert got.json == envelope
            assert bodies.setdefault(got.webhook_id, got.body) == got.body  # the same bytes on every retry
        # in event order per (notifier, fine-tune): a retry holds back the later events of its fine-tune
        for key, order in first_2xx_order(received).items():
            assert order == [i for i in ids if i in set(order)], key
    assert not any(got.json["type"] != "checkpoint.created" for got in created_only.deliveries())
    failures = sum(not 200 <= got.status < 300 for got in everything.deliveries() + created_only.deliveries())
    print(f"{failures} webhook requests answered 5xx")
    assert failures >= 5, "the receivers hardly failed: the retries were not exercised"

    # at least once: duplicates are allowed (a kill between the 2xx and its record), and reported
    for name, receiver in (("all", everything), ("created", created_only)):
        twice = {
            i: n
            for i, n in Counter(got.webhook_id for got in receiver.deliveries() if 200 <= got.status < 300).items()
            if n > 1
        }
        print(
            f"notifier {name}: {len(twice)} duplicate deliveries"
            + "".join(f"\n  {i} ({by_id[i]['type']}) x{n}" for i, n in sorted(twice.items()))
        )
