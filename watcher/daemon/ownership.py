"""Which fine-tunes and sources this process polls, reads and delivers, and the leases its commits go under.

None stands for "everything" (SQLite: one process owns it all); on PostgreSQL the lease keeper answers
(replicas/keeper.py), and for `once` the leases it claimed (replicas/wiring.py)."""

from __future__ import annotations

from typing import Protocol

from watcher.store.replicas import Fence, LaneScope


class Ownership(LaneScope, Protocol):
    """What this process owns among replicas, as of its last lease round."""

    def owns(self, key: str) -> bool:
        """Whether this process holds the fine-tune's lease."""
        ...

    def fence(self, key: str) -> Fence | None:
        """(replica, epoch) a commit of this fine-tune goes under; None when it is not (or no longer) owned."""
        ...

    def source_fence(self, key: str) -> Fence | None:
        """(replica, epoch) a read of the source with this lease key commits under; None when another reads it."""
        ...

    def fenced(self, key: str, epoch: int | None = None) -> None:
        """A commit under the lease of `key` was refused: the lease moved on."""
        ...
