"""Notifiers: one module each, built from [[notifiers]] with their resolved secrets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import httpx
import orjson
import structlog

from watcher.config.load import Config, NotifierConfig, NotifierSecrets
from watcher.delivery.notifiers.base import DeliveryResult, Notifier, Paced, classify
from watcher.delivery.notifiers.log import LogNotifier
from watcher.delivery.notifiers.slack import DEFAULT_DIGEST_OVER, RateLimiter, SlackNotifier
from watcher.delivery.notifiers.webhook import WebhookNotifier

__all__ = [
    "DeliveryResult",
    "Notifier",
    "NotifierSet",
    "Paced",
    "PreparedNotifiers",
    "build_notifiers",
    "classify",
]
log = structlog.get_logger("watcher.notifiers")


@dataclass(frozen=True, slots=True)
class PreparedNotifiers:
    """A reload's notifiers, built but not yet in force."""

    built: Mapping[str, tuple[str, Notifier]]  # name -> (settings fingerprint, notifier)
    fresh: tuple[Notifier, ...]  # built for this reload (closed if it is discarded)
    slack_urls: frozenset[str]

    @property
    def notifiers(self) -> dict[str, Notifier]:
        """The notifiers by name."""
        return {name: notifier for name, (_, notifier) in self.built.items()}


def fingerprint(entry: NotifierConfig, resolved: NotifierSecrets) -> str:
    """A digest of the settings that shape a notifier object (type, URL, keys, timeout, digest, format).

    Filters, retry schedule, max age and concurrency are the dispatcher's: changing them keeps the object.
    """
    shape = [entry.type, resolved.url, [key.hex() for key in resolved.keys], entry.timeout_s]
    shape += [entry.digest_over, entry.format]
    return hashlib.sha256(orjson.dumps(shape)).hexdigest()


def _build(
    entry: NotifierConfig,
    resolved: NotifierSecrets,
    limiters: dict[str, RateLimiter],
    transport: httpx.AsyncBaseTransport | None,
) -> Notifier:
    if entry.type == "log":
        return LogNotifier(name=entry.name, fmt=entry.format)
    assert resolved.url is not None
    if entry.type == "webhook":
        return WebhookNotifier(
            name=entry.name, url=resolved.url, keys=resolved.keys, timeout_s=entry.timeout_s, transport=transport
        )
    return SlackNotifier(
        name=entry.name,
        url=resolved.url,
        limiter=limiters.setdefault(resolved.url, RateLimiter()),
        digest_over=entry.digest_over if entry.digest_over is not None else DEFAULT_DIGEST_OVER,
        timeout_s=entry.timeout_s,
        transport=transport,
    )


def build_notifiers(
    config: Config,
    secrets: Mapping[str, NotifierSecrets],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Notifier]:
    """One notifier per [[notifiers]] entry; Slack notifiers sharing a URL share its rate limit."""
    limiters: dict[str, RateLimiter] = {}
    return {entry.name: _build(entry, secrets[entry.name], limiters, transport) for entry in config.notifiers}


class NotifierSet:
    """The notifiers in force across reloads, and their lifetimes.

    A notifier whose settings did not change is kept (its HTTP client and, for Slack, the rate limiter of its
    URL with any 429 back-off); a replaced or removed one is closed once its in-flight deliveries finish.
    """

    def __init__(self) -> None:
        self._built: dict[str, tuple[str, Notifier]] = {}  # name -> (settings fingerprint, notifier)
        # per Slack webhook URL, shared by every notifier posting there and kept while any does
        self._limiters: dict[str, RateLimiter] = {}
        self._busy: dict[int, int] = {}  # id(notifier) -> deliveries using it now
        self._retiring: dict[int, Notifier] = {}  # replaced while busy: closed when the last delivery ends
        self._unclosed: list[Notifier] = []  # replaced with no event loop running: closed by aclose()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def current(self) -> dict[str, Notifier]:
        """The notifiers in force, by name."""
        return {name: notifier for name, (_, notifier) in self._built.items()}

    def prepare(
        self,
        config: Config,
        secrets: Mapping[str, NotifierSecrets],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> PreparedNotifiers:
        """Build what a config needs anew, keeping unchanged notifiers; nothing in force changes yet."""
        built: dict[str, tuple[str, Notifier]] = {}
        fresh: list[Notifier] = []
        try:
            for entry in config.notifiers:
                resolved = secrets[entry.name]
                mark = fingerprint(entry, resolved)
                kept = self._built.get(entry.name)
                if kept is not None and kept[0] == mark:
                    built[entry.name] = kept
                else:
                    notifier = _build(entry, resolved, self._limiters, transport)
                    fresh.append(notifier)
                    built[entry.name] = (mark, notifier)
        except BaseException:  # all or nothing: the notifiers in force stay, the ones just built are closed
            for notifier in fresh:
                self._close_soon(notifier)
            raise
        slack_urls = frozenset(secrets[entry.name].url or "" for entry in config.notifiers if entry.type == "slack")
        return PreparedNotifiers(built, tuple(fresh), slack_urls)

    def commit(self, prepared: PreparedNotifiers) -> dict[str, Notifier]:
        """Put prepared notifiers in force; the replaced ones are closed once idle. Returns those in force."""
        self._limiters = {url: limiter for url, limiter in self._limiters.items() if url in prepared.slack_urls}
        kept_ids = {id(notifier) for _, notifier in prepared.built.values()}
        retired = [notifier for _, notifier in self._built.values() if id(notifier) not in kept_ids]
        self._built = dict(prepared.built)
        for notifier in retired:
            self.retire(notifier)
        return self.current

    def discard(self, prepared: PreparedNotifiers) -> None:
        """Close what a prepared (never committed) reload built."""
        for notifier in prepared.fresh:
            self._close_soon(notifier)

    def update(
        self,
        config: Config,
        secrets: Mapping[str, NotifierSecrets],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> dict[str, Notifier]:
        """Adopt a config's notifiers, keeping unchanged ones and retiring the others; returns those in force."""
        return self.commit(self.prepare(config, secrets, transport=transport))

    def retire(self, notifier: Notifier) -> None:
        """Close a notifier no longer in force: now if idle, else when its last in-flight delivery ends."""
        if self._busy.get(id(notifier)):
            self._retiring[id(notifier)] = notifier
        else:
            self._close_soon(notifier)

    @contextlib.contextmanager
    def lease(self, notifier: Notifier) -> Iterator[Notifier]:
        """Mark a notifier in use for one delivery, so that a reload never closes it under the delivery."""
        key = id(notifier)
        self._busy[key] = self._busy.get(key, 0) + 1
        try:
            yield notifier
        finally:
            left = self._busy.pop(key) - 1
            if left:
                self._busy[key] = left
            elif (retiring := self._retiring.pop(key, None)) is not None:
                self._close_soon(retiring)

    def _close_soon(self, notifier: Notifier) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._unclosed.append(notifier)
            return
        task = loop.create_task(_close(notifier), name=f"close notifier {notifier.name}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self, also: Iterable[Notifier] = ()) -> None:
        """Close every notifier, in force or retired, and `also` these (call once deliveries are drained)."""
        everything = [*self.current.values(), *self._retiring.values(), *self._unclosed, *also]
        self._built, self._retiring, self._unclosed = {}, {}, []
        unique = {id(notifier): notifier for notifier in everything}
        await asyncio.gather(*self._closing, *(_close(notifier) for notifier in unique.values()))


async def _close(notifier: Notifier) -> None:
    try:
        await notifier.aclose()
    except asyncio.CancelledError:
        raise
    except Exception:  # the top of a close job: a failed close leaks one pool, it must not stop the others
        log.exception("notifier.close_failed", notifier=notifier.name)
