"""An aiohttp application served from its own thread and event loop, for the simulated Hub and the receiver."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

from aiohttp import web


class BackgroundServer:
    """Binds on start() (so the port is known at once) and serves until stop()."""

    def __init__(self, make_app: Callable[[], web.Application], *, host: str, port: int, name: str) -> None:
        self._make_app = make_app
        self._host = host
        self._port = port
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self.port = 0

    def start(self) -> None:
        """Bind the socket and serve from a daemon thread; raise what start-up met."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(sock,), name=self._name, daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            runner = web.AppRunner(self._make_app(), access_log=None, handle_signals=False)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock, backlog=1024).start())
        except BaseException as err:  # noqa: BLE001 - reported to start(), which re-raises it
            self._startup_error = err
            self._started.set()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()
