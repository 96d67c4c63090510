"""Secrets of a configuration (Hub token, notifier URLs and signing keys, the database URL), resolved only by the
commands that need them, from the value, an environment variable or a file; errors name the key, never the value."""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel

from watcher.errors import ConfigError

if TYPE_CHECKING:
    from watcher.config.sections import Config


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
