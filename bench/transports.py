"""The Hub client's transport: CPU per checkpoint fetch through HubClient with each candidate transport.

Candidates: the project's own aiohttp transport (watcher/hub/transport.py, the default), httpx-aiohttp's
`AiohttpTransport` (when installed), and httpx's default `AsyncHTTPTransport`; the yardstick is the bare aiohttp
GET + JSON loop of bench/bare.py. Every loop fetches the same checkpoint lists at concurrency 8 and parses each
body, in its own process against the simulated Hub in another; the kinds run interleaved, `rounds` times, and
the lowest figure of each kind is kept (the machine is shared: noise only ever adds CPU).

`python bench/transports.py [REQUESTS] [ROUNDS]`, or `bench/run.py --only transports`.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "simhub-token"
KINDS = ("bare-aiohttp", "own-aiohttp", "httpx-aiohttp", "httpx-default")
KEYS = 200


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _client_loop(kind: str, url: str, ids: list[str], concurrency: int) -> None:
    import httpx

    from watcher.core.models import FineTuneRef
    from watcher.hub.client import FetchedBody, HubClient

    transport: httpx.AsyncBaseTransport | None = None
    if kind == "httpx-aiohttp":
        import httpx_aiohttp

        transport = httpx_aiohttp.AiohttpTransport()
    elif kind == "httpx-default":
        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
    refs = {fine_tune_id: FineTuneRef("bench", "repo", fine_tune_id, fine_tune_id) for fine_tune_id in set(ids)}
    queue = iter(ids)
    async with HubClient(base_url=url, token=TOKEN, transport=transport) as client:

        async def worker() -> None:
            for fine_tune_id in queue:
                fetched = await client.fetch(refs[fine_tune_id])
                assert isinstance(fetched, FetchedBody), fetched
                json.loads(fetched.body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _bare_loop(url: str, ids: list[str], concurrency: int) -> None:
    import aiohttp

    queue = iter(ids)
    async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"}) as session:

        async def worker() -> None:
            for fine_tune_id in queue:
                async with session.get(f"/api/repos/bench/repo/fine_tunes/{fine_tune_id}/checkpoints") as response:
                    json.loads(await response.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _child(kind: str, url: str, count: int) -> None:
    ids = [f"ft_{i % KEYS}" for i in range(count)]

    def loop(some: list[str]) -> None:
        if kind == "bare-aiohttp":
            asyncio.run(_bare_loop(url, some, 8))
        else:
            asyncio.run(_client_loop(kind, url, some, 8))

    loop(ids[:200])  # warm up: imports, connections, caches
    cpu, wall = _cpu(), time.perf_counter()
    loop(ids)
    print(json.dumps({"requests": count, "cpu_s": _cpu() - cpu, "wall_s": time.perf_counter() - wall}))


def available(kind: str) -> bool:
    """Whether a kind's transport is installed (httpx-aiohttp is not a dependency)."""
    if kind != "httpx-aiohttp":
        return True
    try:
        import httpx_aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def run(url: str, *, requests: int = 10_000, rounds: int = 2) -> dict[str, float]:
    """CPU seconds per request of each kind (the lowest of `rounds` interleaved runs), printed with the ratios."""
    kinds = [kind for kind in KINDS if available(kind)]
    print(f"\n== Transports: HubClient.fetch + JSON parse, concurrency 8, {requests} requests x {rounds} rounds ==")
    if len(kinds) < len(KINDS):
        print("httpx-aiohttp is not installed: left out")
    best: dict[str, float] = {}
    for _ in range(rounds):
        for kind in kinds:
            out = subprocess.run(
                [sys.executable, str(Path(__file__)), "--child", kind, url, str(requests)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            measured = json.loads(out.stdout)
            best[kind] = min(best.get(kind, float("inf")), measured["cpu_s"] / measured["requests"])
    for kind in kinds:
        ratio = best[kind] / best["bare-aiohttp"]
        print(f"{kind:<14} {best[kind] * 1000:.3f} ms CPU per request ({ratio:.2f}x bare aiohttp)")
    return best


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    command = [sys.executable, "-m", "watcher.simhub", "--fine-tunes", str(KEYS), "--checkpoints", "10"]
    hub = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert hub.stdout is not None
        port = int(hub.stdout.readline().split()[1])
        run(f"http://127.0.0.1:{port}", requests=requests, rounds=rounds)
    finally:
        hub.send_signal(signal.SIGINT)
        hub.wait(10)


if __name__ == "__main__":
    main()
