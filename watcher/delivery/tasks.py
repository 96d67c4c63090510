"""A small asyncio helper shared by the poll and delivery shutdowns."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any


async def finish_or_cancel(tasks: Collection[asyncio.Task[Any]], grace_s: float) -> int:
    """Let tasks finish within grace_s, cancel the rest (and give them 5 s to unwind); returns how many."""
    if not tasks:
        return 0
    _, late = await asyncio.wait(tasks, timeout=grace_s)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late, timeout=5)
    return len(late)
