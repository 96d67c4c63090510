"""TOML configuration -> frozen, validated objects; secrets resolved only by the commands that need them."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

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
        raise ValueError(f"missing: give one of {name}, {name}_env, {name}_file")


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


class ConfigModel(_Section):
    hub: HubConfig = HubConfig()
    watch: WatchConfig = WatchConfig()
    state: StateConfig = StateConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    fine_tunes: list[FineTuneConfig] = Field(default_factory=list)


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
    def fine_tunes(self) -> Sequence[FineTuneConfig]:
        """The watched fine-tunes, in configuration order."""
        return self.model.fine_tunes

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
        problems = []
        for error in err.errors(include_url=False, include_input=False):
            loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            problems.append(f"{_key_of(loc) or '(top level)'}: {_problem_of(error)}")
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


def resolve_secret(
    section: BaseModel,
    name: str,
    *,
    key: str,
    config: Config,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The value of secret `name` given inline, as `name_env` or as `name_file`; None when none is given.

    Raises ConfigError (naming `key`, never the value) when the source is missing or empty.
    """
    env = os.environ if environ is None else environ
    inline = getattr(section, name)
    env_name = getattr(section, f"{name}_env")
    file_name = getattr(section, f"{name}_file")
    if inline is not None:
        value, where = inline, f"{key}.{name}"
    elif env_name is not None:
        where = f"{key}.{name}_env"
        value = env.get(env_name)
        if value is None:
            raise ConfigError(f"environment variable {env_name} is not set", path=config.source, key=where)
    elif file_name is not None:
        where = f"{key}.{name}_file"
        path = Path(file_name).expanduser()
        if not path.is_absolute():
            base = env.get("CREDENTIALS_DIRECTORY")
            path = (Path(base) if base else config.directory) / path
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise ConfigError(f"cannot read {path}: {reason}", path=config.source, key=where) from None
    else:
        return None
    value = value.strip()
    if not value:
        raise ConfigError("secret is empty", path=config.source, key=where)
    return value


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
    for entry in data.get("host_configs") or []:
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
