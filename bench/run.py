"""oxen-watcher benchmark: scale, the bare-client yardsticks, big responses, end-to-end latency, replicas, the
start-up window and SQLite durability.

Run with `make bench` (not part of CI). Everything runs on 127.0.0.1: the simulated Hub in its own process,
the watcher in its own process, each yardstick loop in its own process. Prints each figure and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import PY, ROOT, Hub, free_port, proc_cpu_s, proc_cpu_split, proc_peak_rss_mb, wait_until


def write_config(
    folder: Path, hub: Hub, *, fine_tunes: int, interval_s: float, jitter_s: float, listen_port: int, extra: str = ""
) -> Path:
    lines = [
        "[hub]",
        f'url = "{hub.url}"',
        'token = "simhub-token"',
        "timeout_s = 15",
        "max_concurrency = 8",
        "",
        "[watch]",
        f"interval_s = {interval_s}",
        f"jitter_s = {jitter_s}",
        "",
        "[state]",
        f'path = "{folder / "watcher.db"}"',
        "",
        "[http]",
        f'listen = "127.0.0.1:{listen_port}"',
        "",
        "[log]",
        'level = "warning"',
        'format = "json"',
        "",
        extra,
    ]
    for index in range(fine_tunes):
        lines += ["[[fine_tunes]]", 'namespace = "bench"', 'repo = "repo"', f'id = "ft_{index}"', ""]
    path = folder / "config.toml"
    path.write_text("\n".join(lines))
    return path


def start_watcher(config: Path) -> subprocess.Popen[bytes]:
    log = config.with_suffix(".log").open("wb")
    return subprocess.Popen([PY, "-m", "watcher", "run", "-c", str(config)], stdout=log, stderr=log, cwd=ROOT)


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- 1. scale -------------------------------------------------------------------------------------------


def scale(args: argparse.Namespace) -> dict:
    print(
        f"\n== 1. Scale: {args.fine_tunes} fine-tunes x 10 checkpoints, {args.interval}s interval, "
        f"{args.duration}s measured =="
    )
    hub = Hub(fine_tunes=args.fine_tunes, checkpoints=10)
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        config = write_config(
            Path(folder), hub, fine_tunes=args.fine_tunes, interval_s=args.interval, jitter_s=0, listen_port=port
        )
        watcher = start_watcher(config)
        try:
            wait_until(lambda: ready(port), timeout=args.interval * 6 + 60, what="every fine-tune polled once")
            time.sleep(args.interval)  # one more round: the baselines are written, the schedule is steady
            before = hub.stats()["requests"]
            (user_before, sys_before), t0 = proc_cpu_split(watcher.pid), time.time()
            time.sleep(args.duration)
            (user_after, sys_after), t1 = proc_cpu_split(watcher.pid), time.time()
            cpu_before, cpu_after = user_before + sys_before, user_after + sys_after
            stats = hub.stats()
            rss = proc_peak_rss_mb(watcher.pid)
        finally:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(60)
            hub.stop()
    polls = stats["requests"] - before
    gaps = []
    for times in stats["times"].values():
        inside = [t for t in times if t0 - args.interval <= t <= t1]
        gaps += [b - a - args.interval for a, b in zip(inside, inside[1:], strict=False)]
    result = {
        "polls_per_s": polls / (t1 - t0),
        "target_per_s": args.fine_tunes / args.interval,
        "cpu_s_per_poll": (cpu_after - cpu_before) / max(1, polls),
        "cpu_util": (cpu_after - cpu_before) / (t1 - t0),
        "user_share": (user_after - user_before) / max(1e-9, cpu_after - cpu_before),
        "drift_mean_s": statistics.fmean(gaps) if gaps else float("nan"),
        "drift_p95_s": pct(gaps, 0.95) if gaps else float("nan"),
        "drift_max_s": max(gaps) if gaps else float("nan"),
        "peak_rss_mb": rss,
    }
    print(
        f"achieved {result['polls_per_s']:.1f} polls/s against the {result['target_per_s']:.0f}/s target "
        f"({result['polls_per_s'] / result['target_per_s']:.2f}x)"
    )
    print(
        f"schedule drift (actual gap - interval): mean {result['drift_mean_s'] * 1000:.1f} ms, "
        f"p95 {result['drift_p95_s'] * 1000:.1f} ms, max {result['drift_max_s'] * 1000:.1f} ms"
    )
    print(
        f"watcher CPU: {result['cpu_s_per_poll'] * 1000:.3f} ms per poll ({result['cpu_util'] * 100:.0f}% of a core, "
        f"{result['user_share'] * 100:.0f}% of it user time)"
    )
    print(f"watcher peak RSS: {result['peak_rss_mb']:.0f} MB")
    return result


# --- 5. poll rate with jitter on --------------------------------------------------------------------------


def jitter_rate(args: argparse.Namespace) -> dict:
    """The poll rate with jitter on: interval_s is the mean period, so the rate must reach the configured one."""
    jitter = 1.0
    print(
        f"\n== 5. Poll rate with jitter on: {args.fine_tunes} fine-tunes, {args.interval}s interval, "
        f"{jitter}s jitter, {args.duration}s measured (goal >= 99 % of the configured rate) =="
    )
    hub = Hub(fine_tunes=args.fine_tunes, checkpoints=10)
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        config = write_config(
            Path(folder), hub, fine_tunes=args.fine_tunes, interval_s=args.interval, jitter_s=jitter, listen_port=port
        )
        watcher = start_watcher(config)
        try:
            wait_until(lambda: ready(port), timeout=args.interval * 6 + 60, what="every fine-tune polled once")
            time.sleep(args.interval)  # steady state: every fine-tune is on its own phase
            before, t0 = hub.stats()["requests"], time.time()
            time.sleep(args.duration)
            after, t1 = hub.stats()["requests"], time.time()
        finally:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(60)
            hub.stop()
    result = {"polls_per_s": (after - before) / (t1 - t0), "target_per_s": args.fine_tunes / args.interval}
    result["ratio"] = result["polls_per_s"] / result["target_per_s"]
    print(
        f"achieved {result['polls_per_s']:.1f} polls/s against the {result['target_per_s']:.0f}/s target: "
        f"ratio {result['ratio']:.3f} ({result['ratio'] * 100:.1f} %): {'met' if result['ratio'] >= 0.99 else 'MISSED'}"
    )
    return result


# --- 10. the start-up window (issue 15) --------------------------------------------------------------------


def startup(args: argparse.Namespace) -> dict:
    """The first minute after a start against steady state: checkpoint polls per second and watcher CPU per poll
    in each interval from the start (goal: the configured rate from the second interval on, at the steady-state
    CPU per poll within 1.5x). The first status sweep (every fine-tune's status GET) falls in the first minute;
    the steady window spans one status_interval_s (60 s), so it holds one sweep too."""
    windows = int(os.environ.get("STARTUP_WINDOWS", "6"))
    steady_s = float(os.environ.get("STARTUP_STEADY_S", "60"))
    print(
        f"\n== 10. Start-up window: {args.fine_tunes} listed fine-tunes x 10 checkpoints, {args.interval}s interval, "
        f"the first {windows} intervals against {steady_s:g}s of steady state (goal: the configured rate from the "
        "second interval on, CPU per poll within 1.5x of steady state) =="
    )
    hub = Hub(fine_tunes=args.fine_tunes, checkpoints=10)

    def sample(pid: int) -> tuple[float, int, float]:
        polls = hub.stats()["endpoints"].get("checkpoints", 0)
        return time.monotonic(), polls, proc_cpu_s(pid)

    samples: list[tuple[float, int, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        config = write_config(
            Path(folder), hub, fine_tunes=args.fine_tunes, interval_s=args.interval, jitter_s=0, listen_port=port
        )
        watcher = start_watcher(config)
        try:
            # from the first poll on (the imports and the store's opening are not the window)
            wait_until(lambda: hub.stats()["endpoints"].get("checkpoints", 0) > 0, timeout=120, what="the first poll")
            samples.append(sample(watcher.pid))
            for index in range(1, windows + 1):
                time.sleep(max(0.0, samples[0][0] + index * args.interval - time.monotonic()))
                samples.append(sample(watcher.pid))
            time.sleep(args.interval)  # settle
            steady_from = sample(watcher.pid)
            time.sleep(steady_s)
            steady_to = sample(watcher.pid)
        finally:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(60)
            hub.stop()

    def window(a: tuple[float, int, float], b: tuple[float, int, float]) -> dict:
        polls = b[1] - a[1]
        return {"polls_per_s": polls / (b[0] - a[0]), "cpu_ms_per_poll": (b[2] - a[2]) * 1000 / max(1, polls)}

    target = args.fine_tunes / args.interval
    steady = window(steady_from, steady_to)
    intervals = [window(a, b) for a, b in zip(samples, samples[1:], strict=False)]
    later = intervals[1:]
    result = {
        "target_per_s": target,
        "steady": steady,
        "intervals": intervals,
        "worst_rate_ratio_from_second": min(w["polls_per_s"] for w in later) / target if later else float("nan"),
        "worst_rate_vs_steady_from_second": min(w["polls_per_s"] for w in later) / steady["polls_per_s"]
        if later
        else float("nan"),
        "worst_cpu_ratio_from_second": max(w["cpu_ms_per_poll"] for w in later) / steady["cpu_ms_per_poll"]
        if later
        else float("nan"),
    }
    for index, figures in enumerate(intervals, start=1):
        print(
            f"interval {index} ({(index - 1) * args.interval:g}-{index * args.interval:g} s): "
            f"{figures['polls_per_s']:.1f} polls/s, {figures['cpu_ms_per_poll']:.3f} ms CPU per poll"
        )
    print(f"steady state: {steady['polls_per_s']:.1f} polls/s, {steady['cpu_ms_per_poll']:.3f} ms CPU per poll")
    rate_ok = result["worst_rate_ratio_from_second"] >= 0.99
    cpu_ok = result["worst_cpu_ratio_from_second"] <= 1.5
    print(
        f"from the second interval on: worst rate {result['worst_rate_ratio_from_second']:.3f} of {target:.0f}/s "
        f"({'met' if rate_ok else 'MISSED'}; {result['worst_rate_vs_steady_from_second']:.3f} of the steady-state "
        f"rate), worst CPU per poll {result['worst_cpu_ratio_from_second']:.2f}x "
        f"steady state ({'met' if cpu_ok else 'MISSED'})"
    )
    return result


# --- 2. yardsticks --------------------------------------------------------------------------------------


def yardsticks(args: argparse.Namespace, watcher_cpu_per_poll: float) -> dict:
    print(f"\n== 2. Yardsticks: bare loops, same GETs + JSON parse, concurrency 8, {args.requests} requests ==")
    hub = Hub(fine_tunes=200, checkpoints=10)
    results = {}
    try:
        for kind in ("aiohttp", "httpx"):
            out = subprocess.run(
                [PY, str(ROOT / "bench" / "bare.py"), kind, hub.url, str(args.requests), "8", "200"],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            measured = json.loads(out.stdout)
            results[kind] = measured["cpu_s"] / measured["requests"]
            print(
                f"bare {kind:<8} {results[kind] * 1000:.3f} ms CPU per request "
                f"({measured['requests'] / measured['wall_s']:.0f} req/s)"
            )
    finally:
        hub.stop()
    ratio_aiohttp = watcher_cpu_per_poll / results["aiohttp"]
    ratio_httpx = watcher_cpu_per_poll / results["httpx"]
    print(f"watcher/aiohttp = {ratio_aiohttp:.2f}x (goal <= 3x): {'met' if ratio_aiohttp <= 3 else 'MISSED'}")
    print(f"watcher/httpx   = {ratio_httpx:.2f}x (goal <= 0.5x): {'met' if ratio_httpx <= 0.5 else 'MISSED'}")
    return {
        "aiohttp_cpu_s": results["aiohttp"],
        "httpx_cpu_s": results["httpx"],
        "watcher_over_aiohttp": ratio_aiohttp,
        "watcher_over_httpx": ratio_httpx,
    }


# --- 3. big responses -----------------------------------------------------------------------------------


def big_responses(args: argparse.Namespace) -> dict:
    print(f"\n== 3. Big responses: one fine-tune with {args.big} checkpoints carrying inference samples ==")
    sys.path.insert(0, str(ROOT))
    from watcher.config.load import parse_config
    from watcher.daemon.app import Watcher
    from watcher.hub.client import HubClient
    from watcher.observe.logs import configure_logging
    from watcher.store import SqliteStore

    configure_logging(level="warning")

    hub = Hub(fine_tunes=1, checkpoints=args.big, samples=3)
    results: dict = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            db = Path(folder) / "w.db"
            config = parse_config(
                {
                    "hub": {"url": hub.url, "token": "simhub-token"},
                    "state": {"path": str(db)},
                    "fine_tunes": [{"namespace": "bench", "repo": "repo", "id": "ft_0"}],
                },
                source="bench",
                directory=Path(folder),
            )
            body = httpx.get(
                f"{hub.url}/api/repos/bench/repo/fine_tunes/ft_0/checkpoints",
                headers={"Authorization": "Bearer simhub-token"},
            ).content
            print(f"body: {len(body) / 1e6:.1f} MB")
            store = SqliteStore(db)
            store._db.execute("CREATE TEMP TABLE writes (n INTEGER)")
            for op in ("INSERT", "UPDATE", "DELETE"):
                store._db.execute(
                    f"CREATE TEMP TRIGGER count_{op.lower()} AFTER {op} ON main.checkpoints "
                    "BEGIN INSERT INTO writes VALUES (1); END"
                )

            def rows_written() -> int:
                return store._db.execute("SELECT COUNT(*) FROM writes").fetchone()[0]

            async def measure() -> None:
                watcher = Watcher(
                    config=config, store=store, client=HubClient(base_url=hub.url, token="simhub-token", timeout_s=60)
                )
                try:
                    for label in (
                        "baseline (first poll)",
                        "no change",
                        "no change, body re-parsed",
                        "one new checkpoint",
                    ):
                        if label == "one new checkpoint":
                            hub.add("bench/repo/ft_0", (args.big + 1) * 100)
                        if label == "no change, body re-parsed":
                            watcher.store._cache.clear()  # force the full parse + diff path on identical content
                            store._db.execute("UPDATE fine_tunes SET body_hash = 'x'")
                        before_rows, cpu0, t0 = rows_written(), time.process_time(), time.perf_counter()
                        report = await watcher.poll("bench/repo/ft_0")
                        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                        written = rows_written() - before_rows
                        results[label] = {
                            "cpu_s": cpu,
                            "wall_s": wall,
                            "checkpoint_rows_written": written,
                            "events": len(report.events) if report else 0,
                        }
                        print(
                            f"{label:<28} wall {wall * 1000:8.1f} ms  CPU {cpu * 1000:8.1f} ms  "
                            f"checkpoint rows written {written:5d}  events {results[label]['events']}"
                        )
                finally:
                    await watcher.aclose()

            asyncio.run(measure())
    finally:
        hub.stop()
    assert results["no change"]["checkpoint_rows_written"] == 0
    assert results["no change, body re-parsed"]["checkpoint_rows_written"] == 0
    print("proof: the no-change polls wrote 0 checkpoint rows (counted by triggers on the checkpoints table)")
    return results


# --- 4. latency -----------------------------------------------------------------------------------------


def latency(args: argparse.Namespace) -> dict:
    print(
        f"\n== 4. Latency: checkpoint on the Hub -> verified webhook delivery, 2 s interval, {args.samples} samples =="
    )
    sys.path.insert(0, str(ROOT))
    import base64
    import random

    from watcher.testing.receiver import Receiver

    secret = "whsec_" + base64.b64encode(b"bench-secret-bytes-32-bytes-long").decode()
    hub = Hub(fine_tunes=1, checkpoints=1)
    rng = random.Random(7)
    latencies = []
    with tempfile.TemporaryDirectory() as folder, Receiver(secret=secret) as receiver:
        port = free_port()
        extra = "\n".join(
            [
                "[[notifiers]]",
                'name = "bench"',
                'type = "webhook"',
                f'url = "{receiver.url}"',
                f'secret = "{secret}"',
                "",
            ]
        )
        config = write_config(Path(folder), hub, fine_tunes=1, interval_s=2, jitter_s=0, listen_port=port, extra=extra)
        watcher = start_watcher(config)
        try:
            wait_until(lambda: ready(port), timeout=60, what="first poll")
            for n in range(args.samples):
                step = 10_000 + n
                added = time.time()
                hub.add("bench/repo/ft_0", step)
                got = wait_until(
                    lambda: [
                        r for r in receiver.deliveries() if r.verified and r.json["data"]["checkpoint"]["step"] == step
                    ],
                    timeout=30,
                    what=f"delivery of step {step}",
                )
                latencies.append(got[0].at - added)
                time.sleep(rng.uniform(0.1, 1.5))  # land at a random point of the poll cycle
        finally:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(60)
            hub.stop()
    result = {"p50_s": pct(latencies, 0.5), "p95_s": pct(latencies, 0.95), "max_s": max(latencies)}
    print(
        f"latency: p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s, max {result['max_s']:.2f} s "
        "(the poll interval bounds it: expect about interval/2 on average)"
    )
    return result


SECTIONS = (
    "scale",
    "yardsticks",
    "transports",
    "big",
    "latency",
    "pages",
    "jitter",
    "aged",
    "lifecycle",
    "replicas",
    "startup",
    "durability",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fine-tunes", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--big", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    only = set(args.only or SECTIONS)
    print(
        f"oxen-watcher bench on {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )
    figures: dict = {}
    if "scale" in only or "yardsticks" in only:
        figures["scale"] = scale(args)
    if "yardsticks" in only:
        figures["yardsticks"] = yardsticks(args, figures["scale"]["cpu_s_per_poll"])
    if "transports" in only:  # the Hub client's transport: CPU per fetch with each candidate (bench/transports.py)
        import transports

        hub = Hub(fine_tunes=transports.KEYS, checkpoints=10)
        try:
            figures["transports"] = transports.run(hub.url, requests=args.requests // 2)
        finally:
            hub.stop()
    if "big" in only:
        figures["big"] = big_responses(args)
    if "latency" in only:
        figures["latency"] = latency(args)
    if "pages" in only:
        import pages  # bench/pages.py: the status page, in this process

        figures["pages"] = pages.run(fine_tunes=args.fine_tunes)
    if "jitter" in only:
        figures["jitter"] = jitter_rate(args)
    if "aged" in only:  # a year of history (AGED_SCALE=0.01 for a quick run)
        import aged

        figures["aged"] = aged.run()
        from watcher.testing.pgcluster import find_server_bindir

        if find_server_bindir() is not None:  # the same history on PostgreSQL (AGED_PG_SCALE, default 0.1)
            import aged_postgres

            figures["aged_postgres"] = aged_postgres.run()
    if "lifecycle" in only:  # discovery and adaptive polling, time sped up x20 (LIFECYCLE_SCALE)
        import lifecycle

        figures["lifecycle"] = lifecycle.run()
    if "replicas" in only:  # PostgreSQL vs SQLite, takeover (kill -9), 2 replicas with discovery (a new cluster)
        import replicas

        figures["replicas"] = replicas.run()
    if "startup" in only:
        figures["startup"] = startup(args)
    if "durability" in only:  # SQLite's synchronous = FULL against NORMAL for commits that carry events
        import durability

        figures["durability"] = durability.run()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
