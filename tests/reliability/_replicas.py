"""Helpers for the replica tests: real `oxen-watcher run` replicas sharing one PostgreSQL database, what the
database says (owners, events, deliveries), each replica's metrics, and a Hub that keeps changing.

A restarted replica gets a new name (`<slot>-<incarnation>`), as the default "<hostname>-<pid>" would, so the
leases of a killed process are taken over, never resumed by its successor.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from conftest import Daemon, write_config
from prometheus_client.parser import text_string_to_metric_families

from watcher.errors import StoreError
from watcher.store.postgres.store import PostgresStore
from watcher.testing.receiver import Receiver
from watcher.testing.simhub import SimHub

from ._changes import Change, HubChanges
from ._support import change_of, listen_port

URL_ENV = "OXEN_WATCHER_DB_URL"
ANSWERS = (200, 200, 200, 500, 503)  # mostly 200s, the rest 500/503


# --- the database, read directly ---------------------------------------------------------------------------


def _rows(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
    """The rows of one query, None while the database is unreachable (an outage test reads through it) or the
    first replica has not created the schema yet."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            return conn.execute(sql, args).fetchall()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return None


def owners(url: str) -> dict[str, str] | None:
    """Fine-tune key -> the replica holding an unexpired lease on it (database clock)."""
    rows = _rows(url, "SELECT fine_tune_key, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()")
    return None if rows is None else dict(rows)


def events(url: str) -> list[dict[str, Any]]:
    """Every stored event envelope, in sequence order."""
    import orjson

    rows = _rows(url, "SELECT envelope FROM events ORDER BY seq")
    assert rows is not None, "the database is unreachable"
    return [orjson.loads(envelope) for (envelope,) in rows]


def diagnose(url: str, pending: dict[Change, tuple[str, int]]) -> str:
    """What the database says about the fine-tunes of changes not seen committed (for a failure message)."""
    keys = sorted({key for key, _ in pending.values()})
    state = _rows(
        url,
        "SELECT f.fine_tune_key, f.last_outcome, f.last_error, f.consecutive_failures, f.not_before, "
        "f.last_poll_at, l.owner, l.epoch, l.expires_at FROM fine_tunes f LEFT JOIN leases l USING (fine_tune_key) "
        "WHERE f.fine_tune_key = ANY(%s)",
        (keys,),
    )
    steps = _rows(
        url,
        "SELECT fine_tune_key, array_agg(step ORDER BY step) FROM checkpoints WHERE fine_tune_key = ANY(%s) GROUP BY 1",
        (keys,),
    )
    return f"not committed: {sorted(pending, key=str)}\nstate: {state}\ncheckpoints stored: {steps}"


def baselined(url: str) -> int | None:
    """How many fine-tunes have their baseline committed (their first 200: its checkpoints recorded silently)."""
    rows = _rows(url, "SELECT count(*) FROM fine_tunes WHERE baselined")
    return None if rows is None else int(rows[0][0])


def last_seq(url: str) -> int:
    """The highest event sequence number committed so far (0 when there is none)."""
    rows = _rows(url, "SELECT coalesce(max(seq), 0) FROM events")
    assert rows is not None, "the database is unreachable"
    return int(rows[0][0])


def delivery_states(url: str) -> dict[tuple[str, str], str] | None:
    """(event id, notifier) -> outbox state."""
    rows = _rows(url, "SELECT event_id, notifier, state FROM deliveries")
    return None if rows is None else {(event_id, notifier): state for event_id, notifier, state in rows}


# --- replicas ----------------------------------------------------------------------------------------------


def all_delivered(producer: Producer, url: str) -> bool:
    """Every change the producer made is announced, and every delivery row is delivered."""
    if not producer.settled():
        return False
    states = delivery_states(url)
    return bool(states) and all(state == "delivered" for state in states.values())


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a replica's /metrics: (name, sorted labels) -> value."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


class Replicas:
    """Three (or more) slots, each running one real daemon at a time; every restart is a new replica name."""

    def __init__(self, folder: Path, config: dict[str, Any], *, url: str, slots: int = 3) -> None:
        self.folder = folder
        self.config = config
        self.env = {URL_ENV: url, "PYTHONFAULTHANDLER": "1"}
        self.slots = [f"r{i + 1}" for i in range(slots)]
        self.incarnation = dict.fromkeys(self.slots, 0)
        self.daemons: dict[str, Daemon] = {}
        self.every: list[Daemon] = []  # for the final cleanup

    def name(self, slot: str) -> str:
        """The replica name of the process running in a slot now."""
        return f"{slot}-{self.incarnation[slot]}"

    def start(self, slot: str) -> Daemon:
        """Start a new replica in a slot (a new name)."""
        self.incarnation[slot] += 1
        name = self.name(slot)
        state = {**self.config["state"], "replica": name}
        config = write_config(self.folder / f"{name}.toml", {**self.config, "state": state})
        daemon = Daemon(config, env=self.env).start()
        self.daemons[slot] = daemon
        self.every.append(daemon)
        return daemon

    def start_all(self) -> None:
        """Start every slot."""
        for slot in self.slots:
            self.start(slot)

    def kill9(self, slot: str) -> None:
        """SIGKILL the slot's process."""
        self.daemons[slot].kill9()

    def signal(self, slot: str, sig: signal.Signals) -> None:
        """Send a signal (SIGSTOP, SIGCONT) to the slot's process."""
        proc = self.daemons[slot].proc
        assert proc is not None
        proc.send_signal(sig)

    def port(self, slot: str) -> int:
        """The slot's metrics/health port."""
        return listen_port(self.daemons[slot])

    def lease_changes(self, slot: str) -> dict[str, float]:
        """oxen_watcher_lease_changes_total by change, from the slot's /metrics."""
        found: dict[str, float] = {}
        for (name, labels), value in scrape(self.port(slot)).items():
            if name == "oxen_watcher_lease_changes_total":
                found[dict(labels)["change"]] = value
        return found

    def stop_all(self, timeout: float = 30) -> list[int | None]:
        """SIGTERM every running replica at once; their exit codes (None for one that did not exit in time: it
        gets SIGABRT, so its stderr shows where every thread was, through PYTHONFAULTHANDLER)."""
        procs = [daemon.proc for daemon in self.daemons.values() if daemon.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in procs:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)
                proc.wait(10)
                codes.append(None)
        return codes

    def cleanup(self) -> None:
        """Kill whatever still runs (a failed test), resuming a stopped one first."""
        for daemon in self.every:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGCONT)
                daemon.proc.kill()
                daemon.proc.wait(10)


# --- the Hub that keeps changing ----------------------------------------------------------------------------


class Producer(threading.Thread, HubChanges):
    """Keeps changing the Hub's fine-tunes: new checkpoints, deployment transitions, metric updates, removals.

    Changes never coalesce: a checkpoint changes again only once its previous change is committed (seen in the
    store), so each change is observed by exactly one poll, whichever replica polls it."""

    def __init__(self, hub: SimHub, url: str, keys: list[str], rng: random.Random, *, per_round: int = 2) -> None:
        super().__init__(name="producer", daemon=True)
        self._init_changes(hub, keys, rng)
        self.keys = keys
        self.per_round = per_round
        self.reader = PostgresStore(url, readonly=True, pool_max=1, connect_timeout_s=1)  # an outage: no long waits
        self.stop = threading.Event()
        self.paused = threading.Event()  # set: no new changes (the observer still runs)
        self.error: BaseException | None = None
        self.last_seq = 0
        self._lock = threading.RLock()  # one change round or one observation at a time

    def observe(self) -> bool:
        """Mark the changes whose events are committed; False while the database is unreachable."""
        with self._lock:
            try:
                found = self.reader.events_after(self.last_seq, limit=100_000)
            except StoreError:
                return False
            for seq, event in found:
                self.pending.pop(change_of(event.envelope()), None)
                self.last_seq = seq
            return True

    def settled(self) -> bool:
        """Every change made so far is committed."""
        self.observe()
        return not self.pending

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self._lock:
                    self.observe()
                    if not self.paused.is_set():
                        for key in self.rng.sample(self.keys, self.per_round):
                            if sum(1 for ft, _ in self.pending.values() if ft == key) < 2:
                                self.change(key)
                self.stop.wait(self.rng.uniform(0.2, 0.5))
        except BaseException as err:  # reported by the test
            self.error = err

    def close(self) -> None:
        """Stop the thread and the store reader."""
        self.stop.set()
        self.join(10)
        self.reader.close()


def extra_deliveries(receiver: Receiver) -> int:
    """2xx answers beyond the first per webhook-id (at-least-once duplicates)."""
    firsts: set[str] = set()
    extra = 0
    for got in receiver.deliveries():
        if 200 <= got.status < 300:
            if got.webhook_id in firsts:
                extra += 1
            firsts.add(str(got.webhook_id))
    return extra
