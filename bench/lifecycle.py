"""Lifecycle and adaptive polling (issue 9): one [[discover]] source over a repository of 200 fine-tunes, 20
running and 180 terminal, for 10 simulated minutes.

Time is sped up by SCALE (20 by default): every interval is divided by it (interval_s 60 -> 3 s, idle 600 ->
30 s, status and list 60 -> 3 s), so 10 simulated minutes take 30 s. Hub requests per simulated hour are the
requests counted by the simulated Hub divided by the simulated duration; the yardstick is polling all 200
checkpoint lists every interval_s (200 * 60 an hour). Detection latency is real time from a checkpoint appearing
on a running fine-tune to its checkpoint.created commit, against the scaled interval + 1 s (the 1 s is not
scaled, so the bound is stricter than at full scale).

Run alone: `python bench/lifecycle.py` (or `bench/run.py --only lifecycle`).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from watcher.config.load import parse_config
from watcher.core.models import Event
from watcher.daemon.app import App, resolve_all
from watcher.observe.logs import configure_logging
from watcher.testing.simhub import SimHub

SCALE = float(os.environ.get("LIFECYCLE_SCALE", "20"))
FINE_TUNES, RUNNING, CHECKPOINTS = 200, 20, 10
SIM_S = 600.0
INTERVAL_S = 60.0


def seed(hub: SimHub) -> list[str]:
    """200 fine-tunes in bench/repo: the newest 20 running, the rest finished an hour ago; returns the running."""
    now = time.time()
    running = []
    for index in range(FINE_TUNES):
        terminal = index < FINE_TUNES - RUNNING
        key = hub.add_fine_tune(
            "bench",
            "repo",
            f"ft_{index}",
            status="completed" if terminal else "running",
            created_at=now - 7200 + index,
            finished_at=now - 3600 if terminal else None,
        )
        for step in range(1, CHECKPOINTS + 1):
            hub.add_checkpoint(key, step * 100, loss=round(2.0 / step, 4))
        if not terminal:
            running.append(key)
    return running


def config_of(hub: SimHub, folder: Path) -> Any:
    interval = INTERVAL_S / SCALE
    data = {
        "hub": {"url": hub.url, "token": "simhub-token", "timeout_s": 15},
        "watch": {"interval_s": interval, "jitter_s": 0},
        "state": {"path": str(folder / "watcher.db")},
        "http": {"listen": "127.0.0.1:0"},
        "log": {"level": "warning", "format": "json"},
        "discover": [{"name": "bench", "namespace": "bench", "repo": "repo", "interval_s": interval}],
        "lifecycle": {"status_interval_s": interval, "idle_interval_s": 600 / SCALE},
    }
    return parse_config(data, source="<bench>", directory=folder)


async def measure(hub: SimHub, running: list[str], folder: Path) -> dict[str, Any]:
    config = config_of(hub, folder)
    committed: dict[tuple[str, int], float] = {}

    def sink(event: Event) -> None:
        if event.type == "checkpoint.created":
            committed[(event.fine_tune_key, event.data["checkpoint"]["step"])] = time.monotonic()

    app = App(config, resolve_all(config), registry=CollectorRegistry(), sinks=[sink])
    task = asyncio.create_task(app.run())
    started = time.monotonic()
    real_s = SIM_S / SCALE
    added: dict[tuple[str, int], float] = {}
    rng = random.Random(9)
    steps = dict.fromkeys(running, CHECKPOINTS * 100)
    # new checkpoints on running fine-tunes, about one every 0.5 s, after the first list read settled
    await asyncio.sleep(INTERVAL_S / SCALE * 2)
    while time.monotonic() - started < real_s:
        key = rng.choice(running)
        steps[key] += 100
        hub.add_checkpoint(key, steps[key], loss=0.1)
        added[(key, steps[key])] = time.monotonic()
        await asyncio.sleep(0.5)
    elapsed = time.monotonic() - started
    records = hub.requests()
    deadline = time.monotonic() + INTERVAL_S / SCALE + 5
    while time.monotonic() < deadline and not all(k in committed for k in added):  # noqa: ASYNC110 - a deadline
        await asyncio.sleep(0.05)
    app.stop.set()
    await task
    by_endpoint: dict[str, int] = {}
    for record in records:
        by_endpoint[record.endpoint] = by_endpoint.get(record.endpoint, 0) + 1
    sim_hours = elapsed * SCALE / 3600
    per_hour = len(records) / sim_hours
    yardstick = FINE_TUNES * 3600 / INTERVAL_S
    latencies = sorted(committed[k] - at for k, at in added.items() if k in committed)
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan")
    return {
        "scale": SCALE,
        "simulated_s": round(elapsed * SCALE),
        "requests": len(records),
        "by_endpoint": by_endpoint,
        "requests_per_hour": round(per_hour),
        "yardstick_per_hour": round(yardstick),
        "share": round(per_hour / yardstick, 4),
        "checkpoints_added": len(added),
        "detected": len(latencies),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(p95, 3),
        "latency_bound_s": INTERVAL_S / SCALE + 1,
    }


def run() -> dict[str, Any]:
    """The lifecycle section: prints and returns its figures."""
    configure_logging(level="warning", fmt="json")
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as folder, SimHub(token="simhub-token") as hub:
        running = seed(hub)
        figures = asyncio.run(measure(hub, running, Path(folder)))
    print(
        f"lifecycle: {figures['requests_per_hour']} Hub requests per simulated hour "
        f"({figures['share']:.1%} of polling all {FINE_TUNES} every {INTERVAL_S:.0f} s = "
        f"{figures['yardstick_per_hour']}/h; by endpoint {figures['by_endpoint']}); "
        f"new checkpoint detected p50 {figures['latency_p50_s']} s, "
        f"p95 {figures['latency_p95_s']} s (bound {figures['latency_bound_s']} s, {figures['detected']}/"
        f"{figures['checkpoints_added']} detected; time x{SCALE:g})"
    )
    assert figures["share"] <= 0.25, "over 25 % of polling everything"
    assert figures["latency_p95_s"] <= figures["latency_bound_s"], "detection slower than interval + 1 s"
    return figures


if __name__ == "__main__":
    run()
