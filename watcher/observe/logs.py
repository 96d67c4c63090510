"""structlog set-up: JSON lines off a TTY, console on one, and secrets redacted from everything."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"
# Libraries that log full request URLs (webhook URLs are secrets) or per-run chatter at INFO.
_QUIET_LOGGERS = ("httpx", "httpcore", "apscheduler", "aiohttp.access", "asyncio")


class SecretRedactor:
    """A structlog processor that replaces every known secret in any logged value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Register more secrets (longest first, so a secret containing another is fully hidden)."""
        merged = set(self._secrets) | {s for s in secrets if s and len(s) >= 4}
        self._secrets = sorted(merged, key=len, reverse=True)

    def redact(self, value: Any) -> Any:
        """A copy of value with every secret replaced."""
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.redact(v) for v in value)
        if isinstance(value, BaseException):
            return self.redact(repr(value))
        return value

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event_dict
        for key, value in list(event_dict.items()):
            event_dict[key] = self.redact(value)
        return event_dict


REDACTOR = SecretRedactor()


def database_url_secrets(url: str) -> list[str]:
    """What to redact of a database URL: the URL itself and its password (raw and percent-decoded)."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return [url, *([password, unquote(password)] if password else [])]


def configure_logging(
    *, level: str = "info", fmt: str = "auto", stream: TextIO | None = None, redactor: SecretRedactor = REDACTOR
) -> None:
    """Route structlog and stdlib logging to one stream, JSON or console, with secrets redacted."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))
    # stamina's own instrumentation logs a warning per Hub retry; the watcher logs its retries itself
    # (poll.retry_scheduled), and its Hub client leaves stamina's process-wide hooks as they are
    logging.getLogger("stamina").setLevel(logging.ERROR)
