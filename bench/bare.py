"""A bare client loop: N GETs of the checkpoints endpoint plus JSON parsing at a fixed concurrency.

The yardstick for the watcher's cost per poll: `python bench/bare.py aiohttp|httpx URL N CONCURRENCY KEYS`.
Prints one JSON line: requests, CPU seconds (this process), wall seconds.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

TOKEN = "simhub-token"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_aiohttp(url: str, paths: list[str], concurrency: int) -> None:
    import aiohttp

    queue = iter(paths)
    async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"}) as session:

        async def worker() -> None:
            for path in queue:
                async with session.get(path) as response:
                    json.loads(await response.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_httpx(url: str, paths: list[str], concurrency: int) -> None:
    import httpx

    queue = iter(paths)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:

        async def worker() -> None:
            for path in queue:
                response = await client.get(path)
                response.json()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def main() -> None:
    kind, url, count, concurrency, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    paths = [f"/api/repos/bench/repo/fine_tunes/ft_{i % keys}/checkpoints" for i in range(count)]
    runner = run_aiohttp if kind == "aiohttp" else run_httpx
    # warm up: connections, imports, caches
    asyncio.run(runner(url, paths[:200], concurrency))
    start_cpu, start_wall = cpu(), time.perf_counter()
    asyncio.run(runner(url, paths, concurrency))
    print(json.dumps({"requests": count, "cpu_s": cpu() - start_cpu, "wall_s": time.perf_counter() - start_wall}))


if __name__ == "__main__":
    main()
