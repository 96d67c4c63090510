"""A database outage under load: PostgreSQL stops for 30 s while three replicas poll changing fine-tunes and
deliver, then starts again. Meanwhile /healthz tells the truth (503 once renewing has failed past the lease);
afterwards the replicas recover on their own, and every change was announced once and delivered."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import httpx
from conftest import base_config, wait_for

from watcher.testing.receiver import Receiver

from ._replicas import URL_ENV, Producer, Replicas, all_delivered, delivery_states, diagnose, events, owners
from ._support import change_of

SEED = 20_261_204
FINE_TUNES = 12
LEASE_S, RENEW_S = 3.0, 1.0
OUTAGE_S = 30.0


def health(port: int) -> int | None:
    """The /healthz status, None when the replica does not answer."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_a_30s_database_outage_loses_nothing_and_the_replicas_recover_alone(hub, tmp_path, pg_cluster, pg_url):
    keys = [hub.add_fine_tune("acme", "bot", f"ft_{i:02d}") for i in range(FINE_TUNES)]
    for key in keys:
        hub.add_checkpoint(key, 100, loss=2.5)
        hub.add_checkpoint(key, 200, loss=2.0)
    with Receiver() as receiver:
        config = base_config(
            hub,
            tmp_path,
            watch={"interval_s": 1.0},
            state={"url_env": URL_ENV, "lease_s": LEASE_S, "renew_s": RENEW_S},
            fine_tunes=[dict(zip(("namespace", "repo", "id"), key.split("/"), strict=True)) for key in keys],
            notifiers=[{"name": "hook", "type": "webhook", "url": receiver.url, "retry_schedule_s": [0, 0.5, 1]}],
        )
        del config["state"]["path"]
        replicas = Replicas(tmp_path, config, url=pg_url)
        producer: Producer | None = None
        database_down = False
        try:
            replicas.start_all()
            ports = [replicas.port(slot) for slot in replicas.slots]
            wait_for(
                lambda: (found := owners(pg_url)) and len(found) == FINE_TUNES and len(set(found.values())) == 3,
                timeout=60,
                what="every fine-tune owned, shared by the three replicas",
            )
            assert [health(port) for port in ports] == [200, 200, 200]
            producer = Producer(hub, pg_url, keys, random.Random(SEED), per_round=1)  # the schema exists now
            producer.start()
            wait_for(
                lambda: producer.error is not None or (len(producer.made) >= 10 and producer.observe()),
                timeout=30,
                what="changes flowing",
            )
            assert producer.error is None, producer.error

            pg_cluster.stop("fast")
            database_down = True
            stopped = time.monotonic()
            # renewing fails past the lease: each replica stops polling and delivering, and says so
            wait_for(
                lambda: all(health(port) == 503 for port in ports),
                timeout=LEASE_S + RENEW_S + 10,
                what="/healthz 503 on every replica while the database is down",
            )
            unhealthy_after = time.monotonic() - stopped
            made_before = len(producer.made)
            threading.Event().wait(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))  # the outage itself
            assert all(health(port) == 503 for port in ports), "a replica claimed health without its database"
            assert all(daemon.proc is not None and daemon.proc.poll() is None for daemon in replicas.daemons.values())
            made_during = len(producer.made) - made_before
            assert producer.error is None, producer.error
            pg_cluster.start()
            database_down = False
            restarted = time.monotonic()

            # psycopg_pool retries a lost connection with exponential backoff (1 s, doubling): after a 30 s outage
            # its next attempt can be up to about 30 s away
            wait_for(
                lambda: all(health(port) == 200 for port in ports),
                timeout=90,
                what="/healthz 200 again on every replica",
            )
            healthy_after = time.monotonic() - restarted
            wait_for(
                lambda: (found := owners(pg_url)) is not None and len(found) == FINE_TUNES,
                timeout=30,
                what="every fine-tune owned again",
            )
            owned_after = time.monotonic() - restarted
            producer.paused.set()

            try:
                wait_for(
                    lambda: all_delivered(producer, pg_url),
                    timeout=90,
                    interval=0.3,
                    what="every change announced and delivered",
                )
            except AssertionError as err:
                undelivered = {k: v for k, v in (delivery_states(pg_url) or {}).items() if v != "delivered"}
                raise AssertionError(
                    f"{err}\nproducer error: {producer.error!r}; reader sees the database: {producer.observe()}\n"
                    f"{diagnose(pg_url, producer.pending)}\nundelivered: {undelivered}"
                ) from None
            assert all(code == 0 for code in replicas.stop_all())
        finally:
            if database_down:
                pg_cluster.start()
            if producer is not None:
                producer.close()
            replicas.cleanup()

    print(
        f"\noutage {OUTAGE_S:g} s: /healthz 503 on all after {unhealthy_after:.1f} s; after the restart "
        f"/healthz 200 in {healthy_after:.1f} s, every fine-tune owned in {owned_after:.1f} s; "
        f"{made_during} changes made during the outage, {len(producer.made)} in all"
    )
    stored = events(pg_url)
    made = Counter(producer.made)
    announced = Counter(change_of(event) for event in stored)
    assert made_during >= 5, "the Hub hardly changed during the outage"
    assert made - announced == Counter() and announced - made == Counter()
    states = delivery_states(pg_url)
    assert states is not None and set(states) == {(event["id"], "hook") for event in stored}
    assert set(states.values()) == {"delivered"}
    assert {got.webhook_id for got in receiver.deliveries() if got.status == 200} == {e["id"] for e in stored}
