"""The store's own thread: every store call of the daemon runs there, in order, off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class StoreThread:
    """One thread for the store's calls, so a slow disk or database never blocks the event loop (an InStore)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, "store")

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the store's thread and wait for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        """Wait for the calls under way, then end the thread."""
        self._executor.shutdown(wait=True)
