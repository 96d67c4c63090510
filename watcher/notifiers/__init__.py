"""Notifiers: one module each, built from [[notifiers]] with their resolved secrets."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from ..config import Config, NotifierSecrets
from .base import DeliveryResult, Notifier, classify
from .log import LogNotifier
from .slack import DEFAULT_DIGEST_OVER, RateLimiter, SlackNotifier
from .webhook import WebhookNotifier

__all__ = ["DeliveryResult", "Notifier", "build_notifiers", "classify"]


def build_notifiers(
    config: Config,
    secrets: Mapping[str, NotifierSecrets],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Notifier]:
    """One notifier per [[notifiers]] entry; Slack notifiers sharing a URL share its rate limit."""
    limiters: dict[str, RateLimiter] = {}
    built: dict[str, Notifier] = {}
    for entry in config.notifiers:
        resolved = secrets[entry.name]
        if entry.type == "log":
            built[entry.name] = LogNotifier(name=entry.name, fmt=entry.format)
        elif entry.type == "webhook":
            assert resolved.url is not None
            built[entry.name] = WebhookNotifier(
                name=entry.name, url=resolved.url, keys=resolved.keys, timeout_s=entry.timeout_s, transport=transport
            )
        else:
            assert resolved.url is not None
            limiter = limiters.setdefault(resolved.url, RateLimiter())
            built[entry.name] = SlackNotifier(
                name=entry.name,
                url=resolved.url,
                limiter=limiter,
                digest_over=entry.digest_over if entry.digest_over is not None else DEFAULT_DIGEST_OVER,
                timeout_s=entry.timeout_s,
                transport=transport,
            )
    return built
