"""TOML configuration -> frozen, validated objects; their secrets are resolved in secrets.py."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from watcher.config.discovery import DiscoverConfig, LifecycleConfig
from watcher.config.secrets import (
    NotifierSecrets,
    oxen_cli_token,
    resolve_hub_token,
    resolve_notifier_secrets,
    resolve_secret,
    resolve_secrets,
    resolve_state_url,
    signing_key,
)
from watcher.config.sections import (
    DEFAULT_RETRY_SCHEDULE_S,
    Config,
    ConfigModel,
    FineTuneConfig,
    HttpConfig,
    HubConfig,
    LogConfig,
    NotifierConfig,
    StateConfig,
    WatchConfig,
)
from watcher.errors import ConfigError

# the section models and secret resolution live in sections.py and secrets.py; callers import them from here
__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_RETRY_SCHEDULE_S",
    "Config",
    "ConfigModel",
    "DiscoverConfig",
    "FineTuneConfig",
    "HttpConfig",
    "HubConfig",
    "LifecycleConfig",
    "LogConfig",
    "NotifierConfig",
    "NotifierSecrets",
    "StateConfig",
    "WatchConfig",
    "default_config_path",
    "load_config",
    "oxen_cli_token",
    "parse_config",
    "resolve_hub_token",
    "resolve_notifier_secrets",
    "resolve_secret",
    "resolve_secrets",
    "resolve_state_url",
    "signing_key",
]

DEFAULT_CONFIG_PATH = "/etc/oxen-watcher/config.toml"
CONFIG_ENV = "OXEN_WATCHER_CONFIG"


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


def _unique(names: Iterable[str], *, what: str, section: str, field: str, source: str) -> None:
    """Raise ConfigError at the first entry of a section whose name (`field`; "": the whole entry) repeats one."""
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            key = f"{section}[{index}]" + (f".{field}" if field else "")
            raise ConfigError(f"duplicate {what.format(name)} (also {section}[{first[name]}])", path=source, key=key)
        first[name] = index


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
    # a fine-tune is named by its key (namespace/repo/id), notifiers and sources by their `name`
    _unique((ft.key for ft in model.fine_tunes), what="fine-tune {}", section="fine_tunes", field="", source=source)
    _unique(
        (n.name for n in model.notifiers), what="notifier name {!r}", section="notifiers", field="name", source=source
    )
    _unique(
        (d.name for d in model.discover), what="discover name {!r}", section="discover", field="name", source=source
    )
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
