"""Replicas on PostgreSQL: CPU per poll against SQLite in the same run, and the takeover time after a kill -9.

Called from bench/run.py (`--only replicas`). Starts its own throwaway PostgreSQL cluster
(watcher/testing/pgcluster.py: initdb into a temporary directory, Unix socket, fsync off).

1. CPU per poll: the same workload through the real poller (watcher.poller.Watcher, in this process) and the
   real store, once on SQLite and once on PostgreSQL: F fine-tunes x 10 checkpoints on the simulated Hub (its own
   process), R rounds of polling every fine-tune, a new checkpoint on one in ten of them between rounds (so most
   polls are unchanged, some write an event). CPU is this process's (poller, client, store, driver threads) plus,
   for PostgreSQL, the server's (the postmaster and its backends, from /proc).
2. Takeover: three real `oxen-watcher run` replicas share F fine-tunes; one is killed with SIGKILL; the time from
   the kill until every fine-tune it owned is owned by another replica (read from the leases table), compared with
   the bound lease_s + renew_s (+ the claim period).
3. Discovery (issue 15): two real replicas share one [[discover]] source of 200 fine-tunes (bench/lifecycle.py's
   mix and its x20 time scale); one of them reads the list, the other takes its owned fine-tunes' statuses from
   that read (stored with the source's findings). Hub requests in a steady window of 10 simulated minutes, against
   polling all 200 every interval_s (issue 9's goal: at most 25 %).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """utime + stime of a process and its children still running (the PostgreSQL server and its backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def cpu_per_poll(*, fine_tunes: int = 200, rounds: int = 15) -> dict[str, Any]:
    """CPU per poll of the same workload on SQLite and on PostgreSQL (watcher + database server)."""
    sys.path.insert(0, str(ROOT))
    from common import Hub

    from watcher.config.load import parse_config
    from watcher.daemon.poller import Watcher
    from watcher.hub.client import HubClient
    from watcher.observe.logs import configure_logging
    from watcher.store import SqliteStore
    from watcher.store.postgres.store import PostgresStore
    from watcher.testing.pgcluster import throwaway_cluster

    configure_logging(level="warning")
    print(
        f"\n== 7a. CPU per poll, SQLite vs PostgreSQL: {fine_tunes} fine-tunes x 10 checkpoints, {rounds} rounds, "
        "a new checkpoint on 1 in 10 between rounds =="
    )
    results: dict[str, Any] = {}
    hub = Hub(fine_tunes=fine_tunes, checkpoints=10)
    next_step = dict.fromkeys(range(fine_tunes), 1100)
    try:
        with tempfile.TemporaryDirectory() as folder, throwaway_cluster() as cluster:
            url = cluster.create_database("bench")
            for kind in ("sqlite", "postgresql"):
                config = parse_config(
                    {
                        "hub": {"url": hub.url, "token": "simhub-token", "timeout_s": 30, "max_concurrency": 8},
                        "state": {"path": str(Path(folder) / "w.db")} if kind == "sqlite" else {"url": url},
                        "fine_tunes": [
                            {"namespace": "bench", "repo": "repo", "id": f"ft_{i}"} for i in range(fine_tunes)
                        ],
                    },
                    source="bench",
                    directory=Path(folder),
                )
                store: Any = SqliteStore(Path(folder) / "w.db") if kind == "sqlite" else PostgresStore(url)
                server = cluster.postmaster_pid() if kind == "postgresql" else None

                async def measure() -> tuple[float, float, float, int]:
                    watcher = Watcher(
                        config=config,
                        store=store,
                        client=HubClient(base_url=hub.url, token="simhub-token", timeout_s=30),
                    )
                    try:
                        await watcher.poll_all()  # the baselines: not measured
                        await watcher.flush_touches()
                        cpu = wall = server_cpu = 0.0
                        polls = 0
                        for round_no in range(rounds):
                            for index in range(round_no % 10, fine_tunes, 10):
                                hub.add(f"bench/repo/ft_{index}", next_step[index])
                                next_step[index] += 100
                            s0 = _tree_cpu_s(server) if server else 0.0
                            c0, t0 = time.process_time(), time.perf_counter()
                            reports = await watcher.poll_all()
                            await watcher.flush_touches()
                            cpu += time.process_time() - c0
                            wall += time.perf_counter() - t0
                            server_cpu += (_tree_cpu_s(server) - s0) if server else 0.0
                            polls += len(reports)
                        return cpu, server_cpu, wall, polls
                    finally:
                        await watcher.aclose()

                try:
                    cpu, server_cpu, wall, polls = asyncio.run(measure())
                finally:
                    store.close()
                results[kind] = {
                    "polls": polls,
                    "watcher_cpu_ms_per_poll": cpu / polls * 1000,
                    "server_cpu_ms_per_poll": server_cpu / polls * 1000,
                    "total_cpu_ms_per_poll": (cpu + server_cpu) / polls * 1000,
                    "wall_ms_per_poll": wall / polls * 1000,
                }
                r = results[kind]
                print(
                    f"{kind:<11} {polls} polls: watcher {r['watcher_cpu_ms_per_poll']:.3f} ms CPU/poll, "
                    f"database server {r['server_cpu_ms_per_poll']:.3f} ms, total {r['total_cpu_ms_per_poll']:.3f} ms "
                    f"(wall {r['wall_ms_per_poll']:.3f} ms/poll at concurrency 8)"
                )
    finally:
        hub.stop()
    ratio = results["postgresql"]["total_cpu_ms_per_poll"] / results["sqlite"]["total_cpu_ms_per_poll"]
    results["ratio_total"] = ratio
    print(f"PostgreSQL / SQLite, total CPU per poll: {ratio:.2f}x")
    return results


def _owners(url: str) -> dict[str, str]:
    """Fine-tune key -> its live owner, from the leases table (empty until the first replica made the schema)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        try:
            rows = conn.execute(
                "SELECT fine_tune_key, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()"
            )
        except psycopg.errors.UndefinedTable:
            return {}
        return dict(rows.fetchall())


def _spawn(config: Path, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A real `oxen-watcher run` process as replica `name` (a config of its own), its output in <name>.log."""
    own = config.with_name(f"{name}.toml")
    own.write_text(config.read_text().replace("[state]\n", f'[state]\nreplica = "{name}"\n'))
    with own.with_suffix(".log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "watcher", "run", "-c", str(own)], stdout=log, stderr=log, cwd=ROOT, env=env
        )


def takeover(*, fine_tunes: int = 30, kills: int = 5, lease_s: float = 3.0, renew_s: float = 1.0) -> dict[str, Any]:
    """Kill -9 one of three replicas, several times: seconds until its fine-tunes are owned by another replica."""
    sys.path.insert(0, str(ROOT))
    from common import Hub, wait_until

    from watcher.testing.pgcluster import throwaway_cluster

    print(
        f"\n== 7b. Takeover: 3 replicas, {fine_tunes} fine-tunes, lease_s {lease_s:g}, renew_s {renew_s:g}, "
        f"{kills} kill -9 (bound: lease + renew + 2 s = {lease_s + renew_s + 2:g} s) =="
    )
    hub = Hub(fine_tunes=fine_tunes, checkpoints=10)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    times: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as folder, throwaway_cluster() as cluster:
            url = cluster.create_database("takeover")
            lines = [
                "[hub]",
                f'url = "{hub.url}"',
                'token = "simhub-token"',
                "[watch]",
                "interval_s = 1",
                "jitter_s = 0",
                "[state]",
                'url_env = "OXEN_WATCHER_DB_URL"',
                f"lease_s = {lease_s}",
                f"renew_s = {renew_s}",
                "[http]",
                'listen = "127.0.0.1:0"',
                "[log]",
                'level = "warning"',
                'format = "json"',
            ]
            for index in range(fine_tunes):
                lines += ["[[fine_tunes]]", 'namespace = "bench"', 'repo = "repo"', f'id = "ft_{index}"']
            config = Path(folder) / "replicas.toml"
            config.write_text("\n".join(lines) + "\n")
            env = {**os.environ, "OXEN_WATCHER_DB_URL": url}
            # a restarted replica gets a new name (as the default "<hostname>-<pid>" would)
            names = {slot: f"{slot}-0" for slot in ("r1", "r2", "r3")}
            for slot, name in names.items():
                procs[slot] = _spawn(config, name, env)
            for kill in range(kills):
                spread = wait_until(
                    lambda: (o := _owners(url)) and len(o) == fine_tunes and len(set(o.values())) == 3 and o,
                    timeout=120,
                    what="every fine-tune owned, by all three replicas",
                )
                slot = ("r1", "r2", "r3")[kill % 3]
                victim = names[slot]
                lost = {key for key, owner in spread.items() if owner == victim}
                procs[slot].send_signal(signal.SIGKILL)
                t0 = time.monotonic()
                procs[slot].wait(10)
                wait_until(
                    lambda lost=lost, victim=victim: (
                        (o := _owners(url)) and all(o.get(key) not in (None, victim) for key in lost)
                    ),
                    timeout=60,
                    what="the killed replica's fine-tunes re-owned",
                )
                took = time.monotonic() - t0
                times.append(took)
                print(f"kill {kill + 1}: {victim} owned {len(lost)} fine-tunes, re-owned after {took:.2f} s")
                names[slot] = f"{slot}-{kill + 1}"
                procs[slot] = _spawn(config, names[slot], env)
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        hub.stop()
    result = {
        "takeover_s": times,
        "mean_s": statistics.fmean(times),
        "max_s": max(times),
        "bound_s": lease_s + renew_s + 2,
    }
    print(
        f"takeover: mean {result['mean_s']:.2f} s, max {result['max_s']:.2f} s "
        f"(bound {result['bound_s']:g} s: {'met' if result['max_s'] <= result['bound_s'] else 'MISSED'})"
    )
    return result


def discovery(*, window_sim_s: float = 600.0) -> dict[str, Any]:
    """Two replicas with discovery: Hub requests per endpoint in a steady window, against polling everything."""
    sys.path.insert(0, str(ROOT / "bench"))
    from collections import Counter

    import lifecycle
    from common import wait_until

    from watcher.testing.pgcluster import throwaway_cluster
    from watcher.testing.simhub import SimHub

    scale, fine_tunes = lifecycle.SCALE, lifecycle.FINE_TUNES
    interval = lifecycle.INTERVAL_S / scale
    print(
        f"\n== 7c. Discovery on 2 replicas: {fine_tunes} fine-tunes in one source ({lifecycle.RUNNING} running), "
        f"time x{scale:g}, a steady window of {window_sim_s / 60:g} simulated minutes (goal: <= 25 % of polling all) =="
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (
            tempfile.TemporaryDirectory() as folder,
            throwaway_cluster() as cluster,
            SimHub(token="simhub-token") as hub,
        ):
            lifecycle.seed(hub)
            url = cluster.create_database("discovery")
            lines = [
                "[hub]",
                f'url = "{hub.url}"',
                'token = "simhub-token"',
                "timeout_s = 15",
                "[watch]",
                f"interval_s = {interval}",
                "jitter_s = 0",
                "[state]",
                'url_env = "OXEN_WATCHER_DB_URL"',
                "lease_s = 3",
                "renew_s = 1",
                "[http]",
                'listen = "127.0.0.1:0"',
                "[log]",
                'level = "warning"',
                'format = "json"',
                "[lifecycle]",
                f"status_interval_s = {interval}",
                f"idle_interval_s = {600 / scale}",
                "[[discover]]",
                'name = "bench"',
                'namespace = "bench"',
                'repo = "repo"',
                f"interval_s = {interval}",
            ]
            config = Path(folder) / "discovery.toml"
            config.write_text("\n".join(lines) + "\n")
            env = {**os.environ, "OXEN_WATCHER_DB_URL": url}
            procs = [_spawn(config, name, env) for name in ("d1", "d2")]
            half = fine_tunes // 2
            wait_until(
                lambda: (
                    sorted(Counter(v for k, v in _owners(url).items() if not k.startswith("source:")).values())
                    == [half, half]
                ),
                timeout=120,
                what="100 fine-tunes owned by each replica",
            )
            # past the start: every fine-tune's first poll after the last lease move, one idle interval
            settle = time.monotonic() + 600 / scale
            wait_until(lambda: time.monotonic() > settle, timeout=120, what="one idle interval")
            mark = len(hub.requests())
            started = time.monotonic()
            wait_until(lambda: time.monotonic() - started >= window_sim_s / scale, timeout=600, what="the window")
            window = hub.requests()[mark:]
            elapsed = time.monotonic() - started
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    by_endpoint = dict(Counter(record.endpoint for record in window))
    sim_hours = elapsed * scale / 3600
    yardstick = fine_tunes * 3600 / lifecycle.INTERVAL_S
    result = {
        "requests": len(window),
        "by_endpoint": by_endpoint,
        "requests_per_hour": round(len(window) / sim_hours),
        "yardstick_per_hour": round(yardstick),
        "share": round(len(window) / sim_hours / yardstick, 4),
    }
    print(
        f"discovery on 2 replicas: {result['requests_per_hour']} Hub requests per simulated hour "
        f"({result['share']:.1%} of polling all {fine_tunes} every {lifecycle.INTERVAL_S:.0f} s = "
        f"{result['yardstick_per_hour']}/h; by endpoint {by_endpoint} in {elapsed * scale / 60:.1f} simulated "
        f"minutes) ({'met' if result['share'] <= 0.25 else 'MISSED'})"
    )
    return result


def run(*, fine_tunes: int = 200) -> dict[str, Any]:
    """The three figures."""
    return {"cpu_per_poll": cpu_per_poll(fine_tunes=fine_tunes), "takeover": takeover(), "discovery": discovery()}
