"""TOML configuration -> frozen, validated objects; secrets resolved only by the commands that need them."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .config_discovery import DiscoverConfig, LifecycleConfig
from .errors import ConfigError
from .models import EVENT_TYPES

DEFAULT_CONFIG_PATH = "/etc/oxen-watcher/config.toml"
CONFIG_ENV = "OXEN_WATCHER_CONFIG"

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


def _key_of(loc: Sequence[str | int]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key


def _is_type_tag(part: str | int) -> bool:
    # pydantic puts the member types of a union (e.g. "constrained-str", "list[constrained-str]") and
    # validator kinds into error locations; key names never contain "-" or "["
    return isinstance(part, str) and (bool(re.search(r"[-\[]", part)) or part in {"str", "int", "float", "bool"})


def _problem_of(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def parse_config(data: Mapping[str, Any], *, source: str = "<config>", directory: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError naming the file, the key and the problem."""
    try:
        model = ConfigModel.model_validate(data)
    except ValidationError as err:
        found: list[tuple[str, str, bool]] = []
        for error in err.errors(include_url=False, include_input=False):
            loc = [p for p in error["loc"] if not _is_type_tag(p)]
            problem = _problem_of(error)
            # a section's own validator names the key it rejects as "key: problem"
            named = re.match(r"^([a-z_]+): (.+)$", problem) if error["type"] == "value_error" else None
            if named:
                loc, problem = [*loc, named.group(1)], named.group(2)
            union = len(loc) != len(error["loc"])
            found.append((_key_of(loc) or "(top level)", problem, union))
        # a union ("a string or a list of strings") fails in every branch: keep the branch that got deepest
        deeper = {key for key, _, union in found if union}
        problems = [
            f"{key}: {problem}"
            for key, problem, union in found
            if not (union and any(other.startswith(key + "[") for other in deeper))
        ]
        raise ConfigError("; ".join(problems), path=source) from None
    seen: dict[str, int] = {}
    for index, fine_tune in enumerate(model.fine_tunes):
        if fine_tune.key in seen:
            raise ConfigError(
                f"duplicate fine-tune {fine_tune.key} (also fine_tunes[{seen[fine_tune.key]}])",
                path=source,
                key=f"fine_tunes[{index}]",
            )
        seen[fine_tune.key] = index
    names: dict[str, int] = {}
    for index, notifier in enumerate(model.notifiers):
        if notifier.name in names:
            raise ConfigError(
                f"duplicate notifier name {notifier.name!r} (also notifiers[{names[notifier.name]}])",
                path=source,
                key=f"notifiers[{index}].name",
            )
        names[notifier.name] = index
    sources: dict[str, int] = {}
    for index, discover in enumerate(model.discover):
        if discover.name in sources:
            raise ConfigError(
                f"duplicate discover name {discover.name!r} (also discover[{sources[discover.name]}])",
                path=source,
                key=f"discover[{index}].name",
            )
        sources[discover.name] = index
    return Config(model=model, source=source, directory=directory or Path.cwd())


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}", path=str(file)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=str(file)) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err}", path=str(file)) from None
    return parse_config(data, source=str(file), directory=file.resolve().parent)


def default_config_path(environ: Mapping[str, str] | None = None) -> str:
    """The config path when -c is not given: $OXEN_WATCHER_CONFIG, else /etc/oxen-watcher/config.toml."""
    env = os.environ if environ is None else environ
    return env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


# --- secrets -----------------------------------------------------------------------------------------


def resolve_secrets(
    section: BaseModel,
    name: str,
    *,
    key: str,
    config: Config,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The values of secret `name` given inline, as `name_env` or as `name_file` (each a string or a list).

    Empty when none is given. Raises ConfigError (naming the key, never the value) when a source is
    missing or empty.
    """
    env = os.environ if environ is None else environ
    for suffix in ("", "_env", "_file"):
        given = getattr(section, f"{name}{suffix}")
        if given is None:
            continue
        many = isinstance(given, list)
        values = []
        for index, item in enumerate(given if many else [given]):
            where = f"{key}.{name}{suffix}" + (f"[{index}]" if many else "")
            values.append(_read_secret(suffix, item, where=where, config=config, env=env))
        return values
    return []


def _read_secret(suffix: str, given: str, *, where: str, config: Config, env: Mapping[str, str]) -> str:
    if suffix == "_env":
        value = env.get(given)
        if value is None:
            raise ConfigError(f"environment variable {given} is not set", path=config.source, key=where)
    elif suffix == "_file":
        path = Path(given).expanduser()
        if not path.is_absolute():
            base = env.get("CREDENTIALS_DIRECTORY")
            path = (Path(base) if base else config.directory) / path
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise ConfigError(f"cannot read {path}: {reason}", path=config.source, key=where) from None
    else:
        value = given
    value = value.strip()
    if not value:
        raise ConfigError("secret is empty", path=config.source, key=where)
    return value


def resolve_secret(
    section: BaseModel,
    name: str,
    *,
    key: str,
    config: Config,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The value of a single-valued secret `name` (inline, `name_env` or `name_file`); None when not given."""
    values = resolve_secrets(section, name, key=key, config=config, environ=environ)
    return values[0] if values else None


def signing_key(secret: str, *, where: str, config: Config) -> bytes:
    """The HMAC key of a Standard Webhooks secret "whsec_<base64 of 24 to 64 bytes>"."""
    if not secret.startswith("whsec_"):
        raise ConfigError('a signing secret starts with "whsec_"', path=config.source, key=where)
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("signing secret is not valid base64 after whsec_", path=config.source, key=where) from None
    if not 24 <= len(key) <= 64:
        raise ConfigError(f"signing secret decodes to {len(key)} bytes; use 24 to 64", path=config.source, key=where)
    return key


@dataclass(frozen=True, slots=True)
class NotifierSecrets:
    """A notifier's resolved URL and signing keys (never logged)."""

    url: str | None
    secrets: tuple[str, ...]
    keys: tuple[bytes, ...]


def resolve_notifier_secrets(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, NotifierSecrets]:
    """Every notifier's URL and signing secrets, validated; ConfigError names the key of the first problem."""
    resolved: dict[str, NotifierSecrets] = {}
    for index, notifier in enumerate(config.notifiers):
        key = f"notifiers[{index}]"
        url = resolve_secret(notifier, "url", key=key, config=config, environ=environ)
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("URL must be http:// or https://", path=config.source, key=f"{key}.url")
        secrets = resolve_secrets(notifier, "secret", key=key, config=config, environ=environ)
        keys = tuple(signing_key(secret, where=f"{key}.secret", config=config) for secret in secrets)
        resolved[notifier.name] = NotifierSecrets(url, tuple(secrets), keys)
    return resolved


def resolve_state_url(config: Config, environ: Mapping[str, str] | None = None) -> str | None:
    """The PostgreSQL URL from [state] url/url_env/url_file, validated (None for SQLite); errors never show it."""
    url = resolve_secret(config.state, "url", key="state", config=config, environ=environ)
    if url is None:
        return None
    where = next(f"state.{n}" for n in ("url", "url_env", "url_file") if getattr(config.state, n) is not None)
    if url.partition("://")[0].lower() not in ("postgresql", "postgres") or "://" not in url:
        raise ConfigError("must be a postgresql:// or postgres:// URL", path=config.source, key=where)
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except (PsycopgError, ValueError):
        raise ConfigError("is not a valid PostgreSQL URL", path=config.source, key=where) from None
    if not all(p.isdigit() for p in str(params.get("port") or "5432").split(",")):
        raise ConfigError("is not a valid PostgreSQL URL (port)", path=config.source, key=where)
    return url


def oxen_cli_token(hub_url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The oxen CLI's token for the Hub's host from auth_config.toml ($OXEN_CONFIG_DIR or ~/.config/oxen)."""
    env = os.environ if environ is None else environ
    folder = env.get("OXEN_CONFIG_DIR")
    base = Path(folder) if folder else Path(env.get("HOME", str(Path.home()))) / ".config" / "oxen"
    try:
        data = tomllib.loads((base / "auth_config.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    parts = urlsplit(hub_url)
    wanted = {parts.netloc.lower(), (parts.hostname or "").lower()}
    entries = data.get("host_configs")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        host = str(entry.get("host", "")).lower()
        host = urlsplit(host).netloc if "://" in host else host
        token = entry.get("auth_token")
        if host in wanted and isinstance(token, str) and token.strip():
            return token.strip()
    return None


def resolve_hub_token(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """The Hub token from [hub] token/token_env/token_file, else the oxen CLI's auth_config.toml."""
    token = resolve_secret(config.hub, "token", key="hub", config=config, environ=environ)
    if token is None:
        token = oxen_cli_token(config.hub.url, environ)
    if token is None:
        raise ConfigError(
            "no Hub token: set one of token, token_env, token_file (or log in with the oxen CLI)",
            path=config.source,
            key="hub.token",
        )
    return token
