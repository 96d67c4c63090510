"""The one exception tree of oxen-watcher: every error the package raises derives from WatcherError."""

from __future__ import annotations

from typing import ClassVar, Literal


class WatcherError(Exception):
    """Base of every error raised by oxen-watcher."""


class ConfigError(WatcherError):
    """The configuration is invalid; the message names the file, the key and the problem."""

    exit_code = 78  # EX_CONFIG

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        self.problem = message
        prefix = ": ".join(part for part in (path, key) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class PollError(WatcherError):
    """One poll of one fine-tune failed; the next poll still happens.

    `outcome` is the metrics label (error, unauthorized); `http_status` is the Hub's status or None;
    `retry_after_s` is the Hub's Retry-After in seconds when it sent one.
    """

    outcome: ClassVar[Literal["error", "unauthorized"]] = "error"
    retryable = False

    def __init__(self, message: str, *, http_status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.retry_after_s = retry_after_s


class HubUnavailable(PollError):
    """A transient Hub failure (429, 502, 503, 504, timeout, connection error): retried inside the poll."""

    retryable = True


class HubUnauthorized(PollError):
    """The Hub refused the token (401/403)."""

    outcome: ClassVar[Literal["error", "unauthorized"]] = "unauthorized"


class InvalidResponse(PollError):
    """The Hub answered 200 with a body that is not JSON or breaks the CheckpointListResponse schema."""


class StoreError(WatcherError):
    """The state database failed (locked, read-only, full disk, corrupt); nothing was committed."""


class LeaseLost(StoreError):
    """A poll's commit was fenced: this replica no longer holds the fine-tune's lease at the epoch it polled
    under (another replica took it over); nothing was committed."""
