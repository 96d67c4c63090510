"""The configuration's sections as pydantic models: every key, its type, bounds and cross-key rules."""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from watcher.config.discovery import DiscoverConfig, LifecycleConfig
from watcher.core.models import EVENT_TYPES

NonEmpty = Annotated[str, Field(min_length=1)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_secret_sources(values: Mapping[str, Any], name: str, *, required: bool) -> None:
    given = [k for k in (name, f"{name}_env", f"{name}_file") if values.get(k) is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(given)}")
    if required and not given:
        raise ValueError(f"{name}: missing; give one of {name}, {name}_env, {name}_file")


class HubConfig(_Section):
    url: NonEmpty = "https://hub.oxen.ai"
    token: NonEmpty | None = None
    token_env: NonEmpty | None = None
    token_file: NonEmpty | None = None
    timeout_s: Seconds = 15.0
    max_concurrency: Annotated[int, Field(ge=1, le=1024)] = 8

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        if "@" in parts.netloc:  # the bearer token authenticates; credentials in the URL would clash with it
            raise ValueError("must not carry user:password@ credentials (set [hub] token, token_env or token_file)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_token_source(self) -> HubConfig:
        _check_secret_sources(self.__dict__, "token", required=False)
        return self


class WatchConfig(_Section):
    interval_s: Annotated[float, Field(ge=0.5, le=86400)] = 60.0
    jitter_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    baseline: bool = True
    failure_threshold: Annotated[int, Field(ge=1, le=1000)] = 3
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600)] = 10.0


class StateConfig(_Section):
    path: NonEmpty = "watcher.db"
    retain_days: Annotated[int, Field(ge=1)] = 30  # events (and their finished deliveries) older than this go
    # setting url (inline, url_env or url_file: a secret) selects the PostgreSQL store instead of SQLite at path
    url: NonEmpty | None = None
    url_env: NonEmpty | None = None
    url_file: NonEmpty | None = None
    lease_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    renew_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    replica: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_.:@-]*$")] = ""

    @model_validator(mode="after")
    def _one_store(self) -> StateConfig:
        _check_secret_sources(self.__dict__, "url", required=False)
        if self.postgresql and "path" in self.model_fields_set:
            raise ValueError("path: must not be set with url (url selects PostgreSQL)")
        if self.renew_s >= self.lease_s / 2:
            raise ValueError(f"renew_s: must be less than lease_s / 2 ({self.lease_s / 2:g})")
        return self

    @property
    def postgresql(self) -> bool:
        """Whether url (in any form) selects the PostgreSQL store."""
        return any(v is not None for v in (self.url, self.url_env, self.url_file))

    @property
    def kind(self) -> str:
        """The store kind: "postgresql" or "sqlite"."""
        return "postgresql" if self.postgresql else "sqlite"

    def replica_name(self) -> str:
        """This replica's name: the configured one, else "<hostname>-<pid>"."""
        return self.replica or f"{socket.gethostname()}-{os.getpid()}"


class HttpConfig(_Section):
    listen: NonEmpty = "127.0.0.1:9464"
    token: NonEmpty | None = None
    token_env: NonEmpty | None = None
    token_file: NonEmpty | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError('must be "host:port", e.g. "127.0.0.1:9464"')
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # a name must resolve now: found out at bind time, it would be a restart loop, not exit 78
            try:
                socket.getaddrinfo(host, None)
            except (OSError, UnicodeError):
                raise ValueError(f"cannot resolve host {host!r}; use an IP address such as 127.0.0.1") from None
        return value

    @model_validator(mode="after")
    def _one_token_source(self) -> HttpConfig:
        _check_secret_sources(self.__dict__, "token", required=False)
        return self

    @property
    def host(self) -> str:
        """The address to bind, without IPv6 brackets."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port to bind."""
        return int(self.listen.rpartition(":")[2])


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"


class FineTuneConfig(_Section):
    namespace: NonEmpty
    repo: NonEmpty
    id: NonEmpty
    name: NonEmpty | None = None
    interval_s: Annotated[float, Field(ge=0.5, le=86400)] | None = None

    @field_validator("namespace", "repo", "id")
    @classmethod
    def _path_segment(cls, value: str) -> str:
        if "/" in value or value.strip() != value or value in (".", ".."):
            raise ValueError("must be one URL path segment (no '/', no surrounding spaces)")
        return value

    @property
    def key(self) -> str:
        """The stable identity "namespace/repo/id"."""
        return f"{self.namespace}/{self.repo}/{self.id}"

    @property
    def display_name(self) -> str:
        """The configured name, else the id."""
        return self.name or self.id


DEFAULT_RETRY_SCHEDULE_S = (0.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
SecretRef = NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=8)]
Glob = Annotated[str, Field(min_length=1, max_length=200)]


class NotifierConfig(_Section):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    type: Literal["webhook", "slack", "log"]
    url: NonEmpty | None = None
    url_env: NonEmpty | None = None
    url_file: NonEmpty | None = None
    secret: SecretRef | None = None
    secret_env: SecretRef | None = None
    secret_file: SecretRef | None = None
    events: Annotated[list[Glob], Field(min_length=1)] | None = None
    fine_tunes: Annotated[list[Glob], Field(min_length=1)] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    max_age_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0
    retry_schedule_s: Annotated[list[Annotated[float, Field(ge=0, le=86400)]], Field(min_length=1, max_length=50)] = (
        Field(default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE_S))
    )
    max_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    digest_over: Annotated[int, Field(ge=1, le=1000)] | None = None
    format: Literal["text", "json"] = "text"

    @field_validator("retry_schedule_s")
    @classmethod
    def _no_hot_loop(cls, value: list[float]) -> list[float]:
        # the first attempt may be immediate; every wait after a failure (and the repeated last step) may not
        if any(delay < 0.1 for delay in value[1:]) or value[-1] < 0.1:
            raise ValueError("every retry after the first attempt must wait at least 0.1 s")
        return value

    @field_validator("events")
    @classmethod
    def _known_event_types(cls, value: list[str] | None) -> list[str] | None:
        for glob in value or []:
            if not any(fnmatch.fnmatchcase(kind, glob) for kind in EVENT_TYPES):
                raise ValueError(f"{glob!r} matches no event type ({', '.join(EVENT_TYPES)})")
        return value

    @model_validator(mode="after")
    def _fits_its_type(self) -> NotifierConfig:
        given = self.__dict__
        if self.type == "log":
            for name in ("url", "url_env", "url_file"):
                if given[name] is not None:
                    raise ValueError(f"{name}: a log notifier has no URL")
        else:
            _check_secret_sources(given, "url", required=True)
            for name in ("url", "url_env", "url_file"):
                if isinstance(given[name], list):
                    raise ValueError(f"{name}: one URL, not a list")
        if self.type != "webhook":
            for name in ("secret", "secret_env", "secret_file"):
                if given[name] is not None:
                    raise ValueError(f"{name}: only webhook notifiers sign")
        else:
            _check_secret_sources(given, "secret", required=False)
        if self.digest_over is not None and self.type != "slack":
            raise ValueError("digest_over: only slack notifiers send digests")
        return self

    def wants(self, event_type: str, fine_tune_key: str) -> bool:
        """Whether this notifier's filters route an event of this type and fine-tune to it."""
        return (self.events is None or any(fnmatch.fnmatchcase(event_type, g) for g in self.events)) and (
            self.fine_tunes is None or any(fnmatch.fnmatchcase(fine_tune_key, g) for g in self.fine_tunes)
        )


class ConfigModel(_Section):
    hub: HubConfig = HubConfig()
    watch: WatchConfig = WatchConfig()
    state: StateConfig = StateConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    fine_tunes: list[FineTuneConfig] = Field(default_factory=list)
    notifiers: list[NotifierConfig] = Field(default_factory=list)
    discover: list[DiscoverConfig] = Field(default_factory=list)
    lifecycle: LifecycleConfig = LifecycleConfig()


@dataclass(frozen=True, slots=True)
class Config:
    """A validated configuration plus where it came from (relative paths resolve against `directory`)."""

    model: ConfigModel
    source: str
    directory: Path

    @property
    def hub(self) -> HubConfig:
        """The [hub] section."""
        return self.model.hub

    @property
    def watch(self) -> WatchConfig:
        """The [watch] section."""
        return self.model.watch

    @property
    def http(self) -> HttpConfig:
        """The [http] section."""
        return self.model.http

    @property
    def log(self) -> LogConfig:
        """The [log] section."""
        return self.model.log

    @property
    def state(self) -> StateConfig:
        """The [state] section."""
        return self.model.state

    @property
    def notifiers(self) -> Sequence[NotifierConfig]:
        """The configured notifiers, in configuration order."""
        return self.model.notifiers

    @property
    def fine_tunes(self) -> Sequence[FineTuneConfig]:
        """The watched fine-tunes, in configuration order."""
        return self.model.fine_tunes

    @property
    def discover(self) -> Sequence[DiscoverConfig]:
        """The [[discover]] sources, in configuration order."""
        return self.model.discover

    @property
    def lifecycle(self) -> LifecycleConfig:
        """The [lifecycle] section."""
        return self.model.lifecycle

    def state_path(self, environ: Mapping[str, str] | None = None) -> Path:
        """The database path: relative paths resolve against $STATE_DIRECTORY, else the config's folder."""
        env = os.environ if environ is None else environ
        path = Path(self.model.state.path).expanduser()
        if path.is_absolute():
            return path
        state_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
        return (Path(state_dir) if state_dir else self.directory) / path

    def interval_of(self, fine_tune: FineTuneConfig) -> float:
        """The poll interval of one fine-tune: its override, else [watch] interval_s."""
        return fine_tune.interval_s if fine_tune.interval_s is not None else self.watch.interval_s
