"""What replicas need of a shared store: leases with fencing epochs, a lock across replicas, the sources' watch
sets. PostgreSQL implements it (store/postgres/); SQLite has one process, which owns everything."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from watcher.core.models import Delivery, FineTuneRef, HubFineTune

Fence = tuple[str, int]  # (replica, epoch): a commit goes through only while this replica holds the lease at it
SourceFence = tuple[str, str, int]  # (source lease key, replica, epoch)


@dataclass(frozen=True, slots=True)
class ListedStatuses:
    """A source's list as its reader last read it: every fine-tune's status from that read, and when (Unix
    seconds). Replicas that own some of them but do not read the source take these as their status reads."""

    read_at: float
    fine_tunes: tuple[HubFineTune, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease held by a replica: the fine-tune, its epoch (fencing token) and expiry (Unix seconds, database clock).

    `previous_owner` is the replica it was taken over from (None when it was free or is being renewed).
    """

    key: str
    owner: str
    epoch: int
    expires_at: float
    previous_owner: str | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim did: the leases acquired, and the shares it was computed from."""

    acquired: tuple[Lease, ...]
    live: int
    share: int
    owned: int
    leader: str | None = None  # the first live replica by name: it delivers the lanes of fine-tunes nobody leases


class Leases(Protocol):
    """Sharing fine-tunes out among replicas."""

    replica: str

    def heartbeat(self) -> int:
        """Mark this replica live; returns how many replicas are live."""
        ...

    def claim(self, keys: Sequence[str], *, up_to: int | None = None) -> Claim:
        """Take free or expired leases among `keys`, up to the fair share (or `up_to` in all), never waiting."""
        ...

    def renew(self) -> list[Lease]:
        """Extend every lease this replica still holds; returns them (a lease not returned was lost)."""
        ...

    def release(self, keys: Sequence[str]) -> list[str]:
        """Give up these leases; returns the keys released."""
        ...

    def release_excess(self, keys: Sequence[str], *, sources: bool = False) -> list[str]:
        """Give up leases above the fair share of `keys`, and those not in `keys`, among the fine-tunes' leases (or
        the sources'); returns the keys released."""
        ...

    def owned(self) -> list[Lease]:
        """The unexpired leases this replica holds."""
        ...

    def live(self) -> int:
        """How many replicas are live."""
        ...

    def unowned(self, keys: Sequence[str] | None = None) -> int:
        """How many fine-tunes (of `keys`, else of every fine-tune's lease) have no live owner."""
        ...

    def leave(self) -> None:
        """Release every lease and stop counting as live (on shutdown)."""
        ...


SOURCE_LEASE_PREFIX = "source:"


def source_lease_key(namespace: str, repo: str) -> str:
    """The lease of a [[discover]] source's list: one per repository (sources of one repo are read by one replica)."""
    return f"{SOURCE_LEASE_PREFIX}{namespace}/{repo}"


def is_source_lease(key: str) -> bool:
    """Whether a lease key is a source's (else a fine-tune's)."""
    return key.startswith(SOURCE_LEASE_PREFIX) and key.count("/") == 1


class LaneScope(Protocol):
    """The outbox lanes a replica delivers and the leases it sends them under (what the dispatcher asks)."""

    @property
    def replica(self) -> str:
        """This replica's name."""
        ...

    def lanes(self) -> list[str]:
        """The fine-tunes whose lanes this process delivers under their lease (the owned ones)."""
        ...

    def unowned_lanes(self) -> bool:
        """Whether this process also delivers the lanes of fine-tunes no replica holds a live lease on."""
        ...

    def fence(self, key: str) -> Fence | None:
        """(replica, epoch) of the fine-tune's lease held here; None when not (or no longer) held."""
        ...


class Gate(Protocol):
    """A lock across replicas: one of them at a time runs what it guards (retention)."""

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another replica holds it."""
        ...

    def release(self) -> None:
        """Give the lock back."""
        ...


@runtime_checkable
class ReplicaStore(Protocol):
    """A store that several daemons share: the parts of it the replica wiring uses (PostgresStore)."""

    def leases(self, *, replica: str, lease_s: float, counted: bool = True) -> Leases:
        """The lease table, as this replica sees it; `counted=False` (`once`): it never counts as a live replica."""
        ...

    def retention_gate(self) -> Gate:
        """The lock one replica at a time holds while it prunes."""
        ...

    def load_watching(self, names: Sequence[str]) -> dict[str, list[FineTuneRef]]:
        """What these sources watch now, as their readers (other replicas) last committed it."""
        ...

    def load_listed(self, names: Sequence[str]) -> dict[str, ListedStatuses]:
        """The statuses these sources' readers (other replicas) last listed, with their read time."""
        ...

    def pool_stats(self) -> dict[str, int]:
        """The connection pool's size and waiting clients, for metrics."""
        ...

    def deliverable(self, head: Delivery, *, replica: str, epoch: int | None) -> float | None:
        """For how many more seconds (at least) `replica` may send this lane head: under its lease at `epoch`, or
        (None) as the replica delivering the lanes nobody leases; None when it may not (the lane moved on)."""
        ...
