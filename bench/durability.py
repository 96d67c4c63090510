"""SQLite's durability (issue 15, item 14): `synchronous = FULL` against `NORMAL`, and NORMAL with only the
commits that carry events synced (the store's choice), per commit.

In WAL mode NORMAL survives a crash of the process (kill -9) but a power loss can roll back the last commits, state
and events together: the next poll then announces the same change again under a new event id. FULL syncs the WAL
at every commit. Measured here on the disk the temporary directory is on (set TMPDIR to measure another), per
commit, wall and CPU time of this process:

- a poll that carries events (a new checkpoint: its checkpoint.created and one outbox row),
- a poll that fails (a commit without events: the failure count),
- the batch of unchanged polls' times (flush_touches, once a second: 200 fine-tunes in it).

Run alone: `python bench/durability.py` (or `bench/run.py --only durability`). DURABILITY_POLLS sets the number of
commits measured per kind (300 by default).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from watcher.core.diff import DiffOptions
from watcher.core.models import FineTuneRef, PollFailed, PollSuccess
from watcher.hub.schema import body_hash
from watcher.store import SqliteStore

POLLS = int(os.environ.get("DURABILITY_POLLS", "300"))
TOUCHED = 200
OPTIONS = DiffOptions()


def _checkpoint(step: int) -> dict[str, Any]:
    return {"step": step, "created_at": "2026-12-08T00:00:00Z", "metrics": {"loss": 1.0 / step}, "size_bytes": step}


def _success(steps: range) -> PollSuccess:
    checkpoints = tuple(_checkpoint(step) for step in steps)
    return PollSuccess(checkpoints, body_hash(orjson.dumps({"checkpoints": checkpoints})))


def _timed(fn: Any, count: int) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(count):
        fn(index)
    return {
        "wall_ms": (time.perf_counter() - wall) * 1000 / count,
        "cpu_ms": (time.process_time() - cpu) * 1000 / count,
    }


class Unsynced(SqliteStore):
    """The store as it was before: NORMAL, no commit synced."""

    def _commit(self) -> None:
        self._db.execute("COMMIT")


MODES = {
    "NORMAL": (Unsynced, "NORMAL"),  # before: a power loss can roll back the last events
    "FULL": (Unsynced, "FULL"),  # every commit synced
    "NORMAL+events synced": (SqliteStore, "NORMAL"),  # the store now: only commits with events synced
}


def measure(mode: str, folder: Path) -> dict[str, dict[str, float]]:
    """Per-commit wall and CPU of each kind of commit in one of MODES."""
    kind, synchronous = MODES[mode]
    store = kind(folder / f"{mode.replace(' ', '_').replace('+', '_')}.db")
    store._db.execute(f"PRAGMA synchronous={synchronous}")
    ref = FineTuneRef("bench", "repo", "ft_events", None)
    route = lambda event: ["hook"]  # noqa: E731 - one outbox row per event, as with one notifier
    store.apply_poll(ref, _success(range(1, 11)), options=OPTIONS, now=0.0, route=route)  # the baseline
    figures = {
        "events": _timed(
            lambda i: store.apply_poll(ref, _success(range(1, 12 + i)), options=OPTIONS, now=1.0 + i, route=route),
            POLLS,
        )
    }
    failing = FineTuneRef("bench", "repo", "ft_failing", None)
    failed = PollFailed("Hub answered 503", 503)
    figures["failure"] = _timed(
        lambda i: store.apply_poll(failing, failed, options=DiffOptions(failure_threshold=10**9), now=1.0 + i),
        POLLS,
    )
    refs = [FineTuneRef("bench", "repo", f"ft_{n}", None) for n in range(TOUCHED)]
    body = _success(range(1, 11))
    for index, other in enumerate(refs):
        store.apply_poll(other, body, options=OPTIONS, now=float(index))

    def flush(i: int) -> None:
        for other in refs:
            store.observe_unchanged(other.key, body.body_hash, now=1000.0 + i)
        store.flush_touches()

    figures["touch_batch"] = _timed(flush, max(10, POLLS // 10))
    store.close()
    return figures


def run() -> dict[str, Any]:
    """NORMAL against FULL, each kind of commit; prints the figures and the cost of FULL."""
    print(
        f"\n== 11. SQLite durability: synchronous = FULL against NORMAL, {POLLS} commits of each kind, "
        f"on {tempfile.gettempdir()} =="
    )
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        measure("NORMAL", folder)  # warm up the disk and the code paths
        result = {mode: measure(mode, folder) for mode in MODES}
    for kind in ("events", "failure", "touch_batch"):
        normal = result["NORMAL"][kind]
        print(f"{kind} (per commit, wall / CPU):")
        for mode in MODES:
            figures = result[mode][kind]
            print(
                f"  {mode:22s} {figures['wall_ms']:7.3f} ms / {figures['cpu_ms']:.3f} ms "
                f"(+{figures['wall_ms'] - normal['wall_ms']:.3f} / +{figures['cpu_ms'] - normal['cpu_ms']:.3f})"
            )
    return result


if __name__ == "__main__":
    run()
