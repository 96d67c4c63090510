"""[state] for PostgreSQL: url / url_env / url_file select it, path must then be unset, lease settings are checked,
check-config names the store kind, and the URL (a secret) never appears in its output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import cli, write_config

from watcher.config.load import parse_config, resolve_state_url
from watcher.errors import ConfigError
from watcher.observe.logs import SecretRedactor, database_url_secrets

URL = "postgresql://watcher:pa55-w0rd-xyz@db.example.internal:5432/watcher?sslmode=verify-full"
FT = [{"namespace": "ox", "repo": "models", "id": "ft_1"}]


def config_file(tmp_path: Path, state: dict[str, Any]) -> Path:
    return write_config(tmp_path / "w.toml", {"hub": {"token": "t"}, "state": state, "fine_tunes": FT})


def check(tmp_path: Path, state: dict[str, Any], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = cli("check-config", "-c", str(config_file(tmp_path, state)), env=env)
    return result.returncode, result.stdout, result.stderr


def test_defaults_are_sqlite_with_the_documented_lease_settings() -> None:
    state = parse_config({}).state
    assert (state.kind, state.postgresql, state.path) == ("sqlite", False, "watcher.db")
    assert (state.lease_s, state.renew_s, state.replica) == (15.0, 5.0, "")
    name = state.replica_name()
    host, _, pid = name.rpartition("-")
    assert host and pid.isdigit()


@pytest.mark.parametrize("form", ["url", "url_env", "url_file"])
def test_each_url_form_selects_postgresql(tmp_path: Path, form: str) -> None:
    (tmp_path / "db-url").write_text(URL + "\n")
    value = {"url": URL, "url_env": "OW_TEST_DB_URL", "url_file": str(tmp_path / "db-url")}[form]
    config = parse_config({"state": {form: value, "replica": "a-1"}}, directory=tmp_path)
    assert config.state.kind == "postgresql"
    assert config.state.replica_name() == "a-1"
    assert resolve_state_url(config, {"OW_TEST_DB_URL": URL}) == URL
    code, out, err = check(tmp_path, {form: value}, env={"OW_TEST_DB_URL": URL})
    assert code == 0, err
    assert out.strip() == f"{tmp_path / 'w.toml'}: OK (1 fine-tunes, 0 notifiers, postgresql store)"
    assert URL not in out + err and "pa55-w0rd-xyz" not in out + err


def test_sqlite_is_named_by_check_config(tmp_path: Path) -> None:
    code, out, _ = check(tmp_path, {"path": str(tmp_path / "w.db")})
    assert code == 0
    assert out.strip().endswith("OK (1 fine-tunes, 0 notifiers, sqlite store)")


@pytest.mark.parametrize(
    ("state", "env", "key", "problem"),
    [
        ({"url": URL, "path": "w.db"}, {}, "state.path", "must not be set with url"),
        ({"url_env": "OW_TEST_DB_URL", "path": "w.db"}, {"OW_TEST_DB_URL": URL}, "state.path", "must not be set"),
        ({"url": URL, "url_env": "OW_TEST_DB_URL"}, {}, "state", "give only one of url, url_env"),
        ({"url": URL.replace("postgresql://", "mysql://")}, {}, "state.url", "postgresql:// or postgres://"),
        ({"url_env": "OW_TEST_DB_URL"}, {"OW_TEST_DB_URL": "https://pa55-w0rd-xyz@x/y"}, "state.url_env", "postgres"),
        ({"url": "postgresql://u:pa55-w0rd-xyz@[::1/db"}, {}, "state.url", "not a valid PostgreSQL URL"),
        ({"url": "postgresql://u:pa55-w0rd-xyz@h/db?bogus=1"}, {}, "state.url", "not a valid PostgreSQL URL"),
        ({"url": "postgresql://u:pa55-w0rd-xyz@h:port/db"}, {}, "state.url", "not a valid PostgreSQL URL"),
        ({"url_env": "OW_TEST_DB_URL_UNSET"}, {}, "state.url_env", "is not set"),
        ({"url": URL, "lease_s": 10, "renew_s": 5}, {}, "state.renew_s", "less than lease_s / 2 (5)"),
        ({"renew_s": 8}, {}, "state.renew_s", "less than lease_s / 2"),
        ({"lease_s": 0}, {}, "state.lease_s", "greater than 0"),
        ({"lease_s": "15"}, {}, "state.lease_s", "number"),
        ({"replica": "a b"}, {}, "state.replica", "pattern"),
    ],
)
def test_bad_state_settings_exit_78_naming_the_key(
    tmp_path: Path, state: dict[str, Any], env: dict[str, str], key: str, problem: str
) -> None:
    code, out, err = check(tmp_path, state, env=env)
    assert code == 78, out + err
    line = err.strip()
    assert "\n" not in line
    assert line.startswith(f"oxen-watcher: {tmp_path / 'w.toml'}: {key}: "), line
    assert problem in line, line
    assert "pa55-w0rd-xyz" not in out + err


def test_resolve_state_url_is_none_for_sqlite() -> None:
    assert resolve_state_url(parse_config({})) is None


def test_a_bad_url_error_never_contains_the_url() -> None:
    config = parse_config({"state": {"url": "postgresql://u:pa55-w0rd-xyz@h/db?bogus=1"}})
    with pytest.raises(ConfigError) as caught:
        resolve_state_url(config)
    assert "pa55-w0rd-xyz" not in str(caught.value)
    assert caught.value.key == "state.url"


def test_the_redactor_hides_the_url_and_its_password() -> None:
    encoded = "postgresql://watcher:p%40ss-w0rd@db/watcher"
    redactor = SecretRedactor(database_url_secrets(URL) + database_url_secrets(encoded))
    assert redactor.redact(f"cannot connect to {URL}") == "cannot connect to [REDACTED]"
    assert "pa55-w0rd-xyz" not in redactor.redact('FATAL: password "pa55-w0rd-xyz" rejected')
    assert "p@ss-w0rd" not in redactor.redact("password p@ss-w0rd") and "p%40ss-w0rd" not in redactor.redact(encoded)
    assert database_url_secrets("postgresql://u@h/db") == ["postgresql://u@h/db"]
