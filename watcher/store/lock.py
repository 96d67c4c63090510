"""The dispatch lock: one process delivers an outbox at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DispatchLock:
    """An exclusive lock file beside the database, held by the daemon's dispatcher.

    `once` delivers only when it can take the lock: beside a running daemon it leaves delivery to it, so no
    delivery is sent by two processes at once.
    """

    def __init__(self, database: str | Path) -> None:
        self.path = None if str(database) == ":memory:" else Path(f"{database}.dispatch.lock")
        self._file: Any = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        if self.path is None:
            return True
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.close()
            return False
        self._file = file
        return True

    def release(self) -> None:
        """Let go of the lock."""
        if self._file is not None:
            self._file.close()
            self._file = None
