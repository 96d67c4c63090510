"""A simulated Oxen Hub: the checkpoints and fine-tune endpoints as the reference documents them, on 127.0.0.1.

A real HTTP server (aiohttp, in its own thread and event loop) with a thread-safe programmatic API to add
fine-tunes and checkpoints, change deployment statuses, script fine-tune status transitions (created ->
tokenizing -> enqueued -> running -> completed / errored / stopped), make fine-tunes appear later, and inject
faults into any endpoint. Tests, `demo` and the benchmark use it; `python -m watcher.simhub` serves one.
"""

from __future__ import annotations

from watcher.testing.simhub.faults import Endpoint, Fault, RequestRecord
from watcher.testing.simhub.hub import DEFAULT_TOKEN, SimHub, keys_of
from watcher.testing.simhub.runs import StatusStep
from watcher.testing.simhub.serving import FINE_TUNE_PATH, LIST_PATH, PATH

__all__ = [
    "DEFAULT_TOKEN",
    "FINE_TUNE_PATH",
    "LIST_PATH",
    "PATH",
    "Endpoint",
    "Fault",
    "RequestRecord",
    "SimHub",
    "StatusStep",
    "keys_of",
]
