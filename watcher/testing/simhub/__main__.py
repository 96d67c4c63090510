"""`python -m watcher.simhub`: a simulated Hub in the foreground, with routes for benchmarks to drive it."""

from __future__ import annotations

import socket
import time

import orjson
from aiohttp import web

from watcher.testing.simhub.hub import DEFAULT_TOKEN, SimHub


def _stats_route(hub: SimHub) -> web.RouteDef:
    async def stats(request: web.Request) -> web.Response:
        records = hub.requests()
        per_key: dict[str, list[float]] = {}
        per_endpoint: dict[str, int] = {}
        for record in records:
            per_key.setdefault(record.key, []).append(record.at)
            per_endpoint[record.endpoint] = per_endpoint.get(record.endpoint, 0) + 1
        document = {"requests": len(records), "times": per_key, "endpoints": per_endpoint}
        return web.Response(body=orjson.dumps(document), content_type="application/json")

    return web.get("/_sim/stats", stats)


def _add_route(hub: SimHub) -> web.RouteDef:
    async def add(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        checkpoint = hub.add_checkpoint(payload["key"], payload.get("step"), loss=payload.get("loss"))
        return web.Response(body=orjson.dumps(checkpoint), content_type="application/json")

    return web.post("/_sim/checkpoint", add)


def _status_route(hub: SimHub) -> web.RouteDef:
    async def status(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        hub.set_status(payload["key"], payload["status"], error=payload.get("error"))
        return web.Response(body=orjson.dumps(hub.fine_tune(payload["key"])), content_type="application/json")

    return web.post("/_sim/status", status)


def main() -> None:
    """Serve a simulated Hub in the foreground: `python -m watcher.simhub --fine-tunes 2000 --checkpoints 10`."""
    import argparse

    parser = argparse.ArgumentParser(description="A simulated Oxen Hub on 127.0.0.1 (for benchmarks).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--fine-tunes", type=int, default=0, help="fine-tunes bench/ft_<n> in namespace bench")
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--samples", type=int, default=0, help="inference samples per checkpoint")
    parser.add_argument("--terminal", type=int, default=0, help="the first N fine-tunes completed an hour ago")
    args = parser.parse_args()
    hub = SimHub(token=args.token, port=args.port)
    now = time.time()
    for index in range(args.fine_tunes):
        if index < args.terminal:
            key = hub.add_fine_tune(
                "bench",
                "repo",
                f"ft_{index}",
                status="completed",
                created_at=now - 7200 + index,
                finished_at=now - 3600,
            )
        else:
            key = hub.add_fine_tune("bench", "repo", f"ft_{index}", created_at=now - 7200 + index)
        for step in range(1, args.checkpoints + 1):
            samples = [{"prompt": f"prompt {n}", "completion": "lorem ipsum " * 40} for n in range(args.samples)]
            hub.add_checkpoint(key, step * 100, loss=round(2.0 / step, 4), inference_samples=samples)
    app = hub.make_app()
    app.router.add_routes([_stats_route(hub), _add_route(hub), _status_route(hub)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"listening {sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
