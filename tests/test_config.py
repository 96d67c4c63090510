"""watcher/config.py: TOML -> validated Config, every error path, secrets, the oxen CLI fallback, check-config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli, write_config

from watcher.config.load import (
    Config,
    load_config,
    oxen_cli_token,
    parse_config,
    resolve_hub_token,
    resolve_secret,
)
from watcher.errors import ConfigError

SOURCE = "/etc/oxen-watcher/watcher.toml"
FT = {"namespace": "acme", "repo": "support-bot", "id": "ft_1"}


def ft(**overrides: Any) -> dict[str, Any]:
    """One [[fine_tunes]] table."""
    return {**FT, **overrides}


def parse(data: dict[str, Any], directory: Path | None = None) -> Config:
    return parse_config(data, source=SOURCE, directory=directory or Path("/srv/watcher"))


def parse_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return caught.value


def assert_one_line(err: ConfigError | str, *, path: str, key: str, problem: str) -> None:
    """The error's text is one line: `path: key: problem`."""
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    assert text.startswith(f"{path}: {key}: "), text
    assert problem in text.removeprefix(f"{path}: {key}: "), text


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No systemd directories, no oxen CLI config and an empty HOME, here and in CLI subprocesses."""
    for name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "OXEN_CONFIG_DIR", "OXEN_WATCHER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


# --- valid configurations ----------------------------------------------------------------------------


def test_empty_document_gives_documented_defaults() -> None:
    config = parse({})
    assert config.hub.url == "https://hub.oxen.ai"
    assert (config.hub.token, config.hub.token_env, config.hub.token_file) == (None, None, None)
    assert config.hub.timeout_s == 15
    assert config.hub.max_concurrency == 8
    assert config.watch.interval_s == 60
    assert config.watch.jitter_s == 5
    assert config.watch.baseline is True
    assert config.watch.failure_threshold == 3
    assert config.watch.shutdown_grace_s == 10
    assert config.model.state.path == "watcher.db"
    assert config.http.listen == "127.0.0.1:9464"
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9464)
    assert (config.log.level, config.log.format) == ("info", "auto")
    assert list(config.fine_tunes) == []
    assert config.source == SOURCE


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert [ft.key for ft in config.fine_tunes] == ["acme/support-bot/ft_123", "acme/summarizer/ft_456"]
    first, second = config.fine_tunes
    assert (first.display_name, config.interval_of(first)) == ("support-bot-sft", 30)
    assert (second.display_name, config.interval_of(second)) == ("ft_456", 60)
    assert config.hub.token_env == "OXEN_API_KEY"


def test_load_config_reads_every_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "watcher.toml",
        {
            "hub": {"url": "http://127.0.0.1:3000/", "token_env": "HUB_TOKEN", "timeout_s": 2.5, "max_concurrency": 2},
            "watch": {
                "interval_s": 30,
                "jitter_s": 0,
                "baseline": False,
                "failure_threshold": 5,
                "shutdown_grace_s": 0,
            },
            "state": {"path": "db/state.db"},
            "http": {"listen": "[::1]:0", "token_file": "metrics-token"},
            "log": {"level": "debug", "format": "json"},
            "fine_tunes": [ft(), ft(id="ft_2", name="Second", interval_s=0.5)],
        },
    )
    config = load_config(path)
    assert config.source == str(path)
    assert config.directory == tmp_path.resolve()
    assert config.hub.url == "http://127.0.0.1:3000"  # trailing slash dropped
    assert (config.hub.token_env, config.hub.timeout_s, config.hub.max_concurrency) == ("HUB_TOKEN", 2.5, 2)
    assert (config.watch.interval_s, config.watch.jitter_s, config.watch.baseline) == (30, 0, False)
    assert (config.watch.failure_threshold, config.watch.shutdown_grace_s) == (5, 0)
    assert (config.http.host, config.http.port, config.http.token_file) == ("::1", 0, "metrics-token")
    assert (config.log.level, config.log.format) == ("debug", "json")
    one, two = config.fine_tunes
    assert (one.key, one.name, one.display_name, config.interval_of(one)) == ("acme/support-bot/ft_1", None, "ft_1", 30)
    assert (two.key, two.display_name, config.interval_of(two)) == ("acme/support-bot/ft_2", "Second", 0.5)
    assert config.state_path({}) == tmp_path.resolve() / "db" / "state.db"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("hub", "timeout_s", 86400),
        ("hub", "timeout_s", 0.001),
        ("hub", "max_concurrency", 1),
        ("hub", "max_concurrency", 1024),
        ("hub", "url", "https://hub.example.com:8443/prefix"),
        ("watch", "interval_s", 0.5),
        ("watch", "interval_s", 86400),
        ("watch", "jitter_s", 0),
        ("watch", "jitter_s", 3600),
        ("watch", "failure_threshold", 1),
        ("watch", "failure_threshold", 1000),
        ("watch", "shutdown_grace_s", 0),
        ("watch", "shutdown_grace_s", 3600),
        ("watch", "baseline", False),
        ("http", "listen", "0.0.0.0:65535"),
        ("http", "listen", "localhost:0"),
        ("log", "level", "debug"),
        ("log", "level", "warning"),
        ("log", "level", "error"),
        ("log", "format", "json"),
        ("log", "format", "console"),
        ("state", "path", "/var/lib/oxen-watcher/w.db"),
    ],
)
def test_boundary_values_are_accepted(section: str, key: str, value: Any) -> None:
    config = parse({section: {key: value}})
    assert getattr(getattr(config.model, section), key) == value


@pytest.mark.parametrize("interval", [0.5, 86400, None])
def test_fine_tune_interval_override_bounds(interval: float | None) -> None:
    table = ft() if interval is None else ft(interval_s=interval)
    config = parse({"watch": {"interval_s": 42}, "fine_tunes": [table]})
    assert config.interval_of(config.fine_tunes[0]) == (42 if interval is None else interval)


def test_same_id_in_different_repos_is_not_a_duplicate() -> None:
    config = parse({"fine_tunes": [ft(), ft(repo="other"), ft(namespace="other")]})
    assert len(config.fine_tunes) == 3


# --- invalid configurations: one line naming the file, the key and the problem -----------------------

INVALID: list[Any] = [
    # unknown keys
    pytest.param({"notifier": {"url": "x"}}, "notifier", "unknown key", id="unknown-section"),
    pytest.param({"hub": {"tokn": "x"}}, "hub.tokn", "unknown key", id="unknown-hub-key"),
    pytest.param({"watch": {"interval": 5}}, "watch.interval", "unknown key", id="unknown-watch-key"),
    pytest.param({"state": {"dir": "x"}}, "state.dir", "unknown key", id="unknown-state-key"),
    pytest.param({"http": {"port": 1}}, "http.port", "unknown key", id="unknown-http-key"),
    pytest.param({"log": {"colour": True}}, "log.colour", "unknown key", id="unknown-log-key"),
    pytest.param(
        {"fine_tunes": [ft(), ft(id="b"), ft(id="c", intervall_s=5)]},
        "fine_tunes[2].intervall_s",
        "unknown key",
        id="unknown-fine-tune-key-0-based",
    ),
    # missing required keys
    pytest.param(
        {"fine_tunes": [{"namespace": "a", "repo": "r"}]}, "fine_tunes[0].id", "missing required key", id="missing-id"
    ),
    pytest.param(
        {"fine_tunes": [ft(), {"repo": "r", "id": "i"}]},
        "fine_tunes[1].namespace",
        "missing required key",
        id="missing-namespace",
    ),
    # wrong types
    pytest.param({"hub": "https://hub.oxen.ai"}, "hub", "valid dictionary", id="section-not-a-table"),
    pytest.param({"fine_tunes": {"namespace": "a"}}, "fine_tunes", "valid list", id="fine-tunes-not-array"),
    pytest.param({"hub": {"url": 443}}, "hub.url", "valid string", id="url-int"),
    pytest.param({"hub": {"timeout_s": "15"}}, "hub.timeout_s", "valid number", id="timeout-string"),
    pytest.param({"hub": {"timeout_s": True}}, "hub.timeout_s", "valid number", id="timeout-bool"),
    pytest.param({"hub": {"max_concurrency": 2.5}}, "hub.max_concurrency", "valid integer", id="concurrency-float"),
    pytest.param({"hub": {"max_concurrency": True}}, "hub.max_concurrency", "valid integer", id="concurrency-bool"),
    pytest.param({"hub": {"token": 12345}}, "hub.token", "valid string", id="token-int"),
    pytest.param({"watch": {"interval_s": "60"}}, "watch.interval_s", "valid number", id="interval-string"),
    pytest.param({"watch": {"baseline": "yes"}}, "watch.baseline", "valid boolean", id="baseline-string"),
    pytest.param({"watch": {"baseline": 1}}, "watch.baseline", "valid boolean", id="baseline-int"),
    pytest.param(
        {"watch": {"failure_threshold": 3.0}}, "watch.failure_threshold", "valid integer", id="threshold-float"
    ),
    pytest.param({"state": {"path": ["a"]}}, "state.path", "valid string", id="path-list"),
    pytest.param({"http": {"listen": 9464}}, "http.listen", "valid string", id="listen-int"),
    pytest.param({"fine_tunes": [ft(id=123)]}, "fine_tunes[0].id", "valid string", id="fine-tune-id-int"),
    pytest.param(
        {"fine_tunes": [ft(interval_s="30")]},
        "fine_tunes[0].interval_s",
        "valid number",
        id="fine-tune-interval-string",
    ),
    pytest.param({"fine_tunes": ["acme/bot/ft_1"]}, "fine_tunes[0]", "valid dictionary", id="fine-tune-not-a-table"),
    # out of range
    pytest.param({"hub": {"timeout_s": 0}}, "hub.timeout_s", "greater than 0", id="timeout-zero"),
    pytest.param({"hub": {"timeout_s": -1}}, "hub.timeout_s", "greater than 0", id="timeout-negative"),
    pytest.param({"hub": {"timeout_s": 86401}}, "hub.timeout_s", "less than or equal to 86400", id="timeout-high"),
    pytest.param({"hub": {"timeout_s": math.inf}}, "hub.timeout_s", "less than or equal", id="timeout-inf"),
    pytest.param({"hub": {"timeout_s": math.nan}}, "hub.timeout_s", "Input should be", id="timeout-nan"),
    pytest.param(
        {"hub": {"max_concurrency": 0}}, "hub.max_concurrency", "greater than or equal to 1", id="concurrency-zero"
    ),
    pytest.param(
        {"hub": {"max_concurrency": 1025}}, "hub.max_concurrency", "less than or equal to 1024", id="concurrency-high"
    ),
    pytest.param(
        {"watch": {"interval_s": 0.49}}, "watch.interval_s", "greater than or equal to 0.5", id="interval-low"
    ),
    pytest.param(
        {"watch": {"interval_s": 86401}}, "watch.interval_s", "less than or equal to 86400", id="interval-high"
    ),
    pytest.param({"watch": {"jitter_s": -0.1}}, "watch.jitter_s", "greater than or equal to 0", id="jitter-negative"),
    pytest.param({"watch": {"jitter_s": 3601}}, "watch.jitter_s", "less than or equal to 3600", id="jitter-high"),
    pytest.param(
        {"watch": {"failure_threshold": 0}},
        "watch.failure_threshold",
        "greater than or equal to 1",
        id="threshold-zero",
    ),
    pytest.param(
        {"watch": {"failure_threshold": 1001}},
        "watch.failure_threshold",
        "less than or equal to 1000",
        id="threshold-high",
    ),
    pytest.param(
        {"watch": {"shutdown_grace_s": -1}}, "watch.shutdown_grace_s", "greater than or equal to 0", id="grace-negative"
    ),
    pytest.param(
        {"watch": {"shutdown_grace_s": 3601}}, "watch.shutdown_grace_s", "less than or equal to 3600", id="grace-high"
    ),
    pytest.param(
        {"fine_tunes": [ft(interval_s=0.1)]},
        "fine_tunes[0].interval_s",
        "greater than or equal to 0.5",
        id="fine-tune-interval-low",
    ),
    pytest.param(
        {"fine_tunes": [ft(), ft(id="b", interval_s=86401)]},
        "fine_tunes[1].interval_s",
        "less than or equal to 86400",
        id="fine-tune-interval-high",
    ),
    pytest.param(
        {"log": {"level": "verbose"}}, "log.level", "'debug', 'info', 'warning' or 'error'", id="level-unknown"
    ),
    pytest.param({"log": {"level": "INFO"}}, "log.level", "'debug', 'info'", id="level-uppercase"),
    pytest.param({"log": {"format": "xml"}}, "log.format", "'json', 'console' or 'auto'", id="format-unknown"),
    # malformed values
    pytest.param({"hub": {"url": ""}}, "hub.url", "at least 1 character", id="url-empty"),
    pytest.param({"hub": {"url": "hub.oxen.ai"}}, "hub.url", "http:// or https://", id="url-no-scheme"),
    pytest.param({"hub": {"url": "ftp://hub.oxen.ai"}}, "hub.url", "http:// or https://", id="url-ftp"),
    pytest.param({"hub": {"url": "https://"}}, "hub.url", "http:// or https://", id="url-no-host"),
    pytest.param({"hub": {"url": "https://hub.oxen.ai/?x=1"}}, "hub.url", "query or fragment", id="url-query"),
    pytest.param({"hub": {"url": "https://hub.oxen.ai/#top"}}, "hub.url", "query or fragment", id="url-fragment"),
    pytest.param({"http": {"listen": "9464"}}, "http.listen", '"host:port"', id="listen-no-host"),
    pytest.param({"http": {"listen": ":9464"}}, "http.listen", '"host:port"', id="listen-empty-host"),
    pytest.param({"http": {"listen": "localhost:"}}, "http.listen", '"host:port"', id="listen-empty-port"),
    pytest.param({"http": {"listen": "localhost:http"}}, "http.listen", '"host:port"', id="listen-port-name"),
    pytest.param({"http": {"listen": "localhost:65536"}}, "http.listen", '"host:port"', id="listen-port-high"),
    pytest.param({"http": {"listen": ""}}, "http.listen", "at least 1 character", id="listen-empty"),
    pytest.param({"state": {"path": ""}}, "state.path", "at least 1 character", id="state-path-empty"),
    pytest.param(
        {"fine_tunes": [ft(namespace="acme/other")]},
        "fine_tunes[0].namespace",
        "one URL path segment",
        id="namespace-slash",
    ),
    pytest.param(
        {"fine_tunes": [ft(repo=" bot")]}, "fine_tunes[0].repo", "one URL path segment", id="repo-leading-space"
    ),
    pytest.param({"fine_tunes": [ft(id="ft_1 ")]}, "fine_tunes[0].id", "one URL path segment", id="id-trailing-space"),
    pytest.param({"fine_tunes": [ft(id="..")]}, "fine_tunes[0].id", "one URL path segment", id="id-dotdot"),
    pytest.param({"fine_tunes": [ft(repo=".")]}, "fine_tunes[0].repo", "one URL path segment", id="repo-dot"),
    pytest.param(
        {"fine_tunes": [ft(namespace="")]}, "fine_tunes[0].namespace", "at least 1 character", id="namespace-empty"
    ),
    pytest.param({"fine_tunes": [ft(name="")]}, "fine_tunes[0].name", "at least 1 character", id="name-empty"),
    # secrets: empty inline values, more than one source
    pytest.param({"hub": {"token": ""}}, "hub.token", "at least 1 character", id="hub-token-empty"),
    pytest.param({"hub": {"token_env": ""}}, "hub.token_env", "at least 1 character", id="hub-token-env-empty"),
    pytest.param({"hub": {"token_file": ""}}, "hub.token_file", "at least 1 character", id="hub-token-file-empty"),
    pytest.param({"http": {"token": ""}}, "http.token", "at least 1 character", id="http-token-empty"),
    pytest.param(
        {"hub": {"token": "t", "token_env": "E"}}, "hub", "give only one of token, token_env", id="hub-token-and-env"
    ),
    pytest.param(
        {"hub": {"token_env": "E", "token_file": "f"}},
        "hub",
        "give only one of token_env, token_file",
        id="hub-env-and-file",
    ),
    pytest.param(
        {"hub": {"token": "t", "token_env": "E", "token_file": "f"}},
        "hub",
        "give only one of token, token_env, token_file",
        id="hub-all-three",
    ),
    pytest.param(
        {"http": {"token": "t", "token_file": "f"}},
        "http",
        "give only one of token, token_file",
        id="http-token-and-file",
    ),
    # duplicate fine-tunes (0-based; the name does not make a fine-tune distinct)
    pytest.param(
        {"fine_tunes": [ft(), ft()]},
        "fine_tunes[1]",
        "duplicate fine-tune acme/support-bot/ft_1 (also fine_tunes[0])",
        id="duplicate",
    ),
    pytest.param(
        {"fine_tunes": [ft(), ft(id="b"), ft(name="again", interval_s=5)]},
        "fine_tunes[2]",
        "duplicate fine-tune acme/support-bot/ft_1 (also fine_tunes[0])",
        id="duplicate-other-name",
    ),
]


@pytest.mark.parametrize(("data", "key", "problem"), INVALID)
def test_invalid_config_raises_one_line_error(data: dict[str, Any], key: str, problem: str) -> None:
    err = parse_error(data)
    assert_one_line(err, path=SOURCE, key=key, problem=problem)
    assert err.path == SOURCE
    assert err.exit_code == 78


def test_every_problem_is_reported_on_one_line() -> None:
    err = parse_error({"hub": {"timeout_s": 0, "bogus": 1}, "fine_tunes": [ft(interval_s=0)]})
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"{SOURCE}: ")
    assert "hub.timeout_s: Input should be greater than 0" in text
    assert "hub.bogus: unknown key" in text
    assert "fine_tunes[0].interval_s: Input should be greater than or equal to 0.5" in text


def test_inline_secret_value_is_never_echoed() -> None:
    err = parse_error({"hub": {"token": "s3cr3t-value", "token_env": "ALSO"}})
    assert "s3cr3t-value" not in str(err)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        pytest.param("missing.toml", None, "cannot read: No such file or directory", id="missing"),
        pytest.param("folder", "DIR", "cannot read", id="directory"),
        pytest.param("latin1.toml", b'[hub]\ntoken = "caf\xe9"\n', "not UTF-8 text", id="not-utf8"),
        pytest.param("broken.toml", b"[hub\nurl = 1\n", "invalid TOML", id="unclosed-table"),
        pytest.param(
            "dupkey.toml", b'[hub]\nurl = "https://a"\nurl = "https://b"\n', "invalid TOML", id="duplicate-toml-key"
        ),
        pytest.param("value.toml", b"[watch]\ninterval_s = \n", "invalid TOML", id="missing-value"),
    ],
)
def test_load_config_unreadable_files(tmp_path: Path, name: str, content: bytes | str | None, problem: str) -> None:
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {problem}"), text
    assert caught.value.exit_code == 78


def test_load_config_validation_error_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "w.toml", {"fine_tunes": [ft(), ft(id="b"), ft(id="c", intervall_s=3)]})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert_one_line(caught.value, path=str(path), key="fine_tunes[2].intervall_s", problem="unknown key")


# --- the state path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "environ", "expected"),
    [
        pytest.param("/var/lib/w.db", {"STATE_DIRECTORY": "/state"}, "/var/lib/w.db", id="absolute-wins"),
        pytest.param("w.db", {}, "/srv/watcher/w.db", id="relative-to-config-folder"),
        pytest.param("sub/w.db", {}, "/srv/watcher/sub/w.db", id="nested-relative"),
        pytest.param(
            "w.db", {"STATE_DIRECTORY": "/var/lib/oxen-watcher"}, "/var/lib/oxen-watcher/w.db", id="state-directory"
        ),
        pytest.param("w.db", {"STATE_DIRECTORY": "/first:/second"}, "/first/w.db", id="state-directory-list"),
        pytest.param("w.db", {"STATE_DIRECTORY": ""}, "/srv/watcher/w.db", id="state-directory-empty"),
    ],
)
def test_state_path(path: str, environ: dict[str, str], expected: str) -> None:
    config = parse({"state": {"path": path}}, directory=Path("/srv/watcher"))
    assert config.state_path(environ) == Path(expected)


def test_state_path_default_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse({}, directory=Path("/srv/watcher"))
    assert config.state_path() == Path("/srv/watcher/watcher.db")
    monkeypatch.setenv("STATE_DIRECTORY", "/run/state")
    assert config.state_path() == Path("/run/state/watcher.db")


def test_load_config_state_path_is_relative_to_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    write_config(folder / "w.toml", {"state": {"path": "w.db"}})
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("etc/w.toml")).state_path({}) == folder.resolve() / "w.db"


# --- secrets ----------------------------------------------------------------------------------------------


def _secret_setup(tmp_path: Path, how: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A [section] table and an environ giving the secret "s3cret" the way `how` says."""
    config_dir = tmp_path / "cfg"
    creds = tmp_path / "creds"
    config_dir.mkdir(exist_ok=True)
    creds.mkdir(exist_ok=True)
    if how == "inline":
        return {"token": "s3cret"}, {}
    if how == "inline-padded":
        return {"token": "  s3cret \n"}, {}
    if how == "env":
        return {"token_env": "MY_TOKEN"}, {"MY_TOKEN": "s3cret"}
    if how == "env-newline":
        return {"token_env": "MY_TOKEN"}, {"MY_TOKEN": "s3cret\n"}
    if how == "file-absolute":
        (tmp_path / "abs-token").write_text("s3cret")
        return {"token_file": str(tmp_path / "abs-token")}, {"CREDENTIALS_DIRECTORY": str(creds)}
    if how == "file-relative-config-dir":
        (config_dir / "token").write_text("s3cret\n")
        return {"token_file": "token"}, {}
    if how == "file-relative-credentials":
        (config_dir / "token").write_text("wrong")
        (creds / "token").write_text("s3cret\n")
        return {"token_file": "token"}, {"CREDENTIALS_DIRECTORY": str(creds)}
    if how == "file-empty-credentials-var":
        (config_dir / "token").write_text("s3cret")
        return {"token_file": "token"}, {"CREDENTIALS_DIRECTORY": ""}
    raise AssertionError(how)


SECRET_WAYS = [
    "inline",
    "inline-padded",
    "env",
    "env-newline",
    "file-absolute",
    "file-relative-config-dir",
    "file-relative-credentials",
    "file-empty-credentials-var",
]


@pytest.mark.parametrize("section", ["hub", "http"])
@pytest.mark.parametrize("how", SECRET_WAYS)
def test_resolve_secret(tmp_path: Path, section: str, how: str) -> None:
    table, environ = _secret_setup(tmp_path, how)
    config = parse({section: table}, directory=tmp_path / "cfg")
    value = resolve_secret(getattr(config.model, section), "token", key=section, config=config, environ=environ)
    assert value == "s3cret"


@pytest.mark.parametrize("section", ["hub", "http"])
def test_resolve_secret_none_given(section: str) -> None:
    config = parse({})
    assert resolve_secret(getattr(config.model, section), "token", key=section, config=config, environ={}) is None


@pytest.mark.parametrize(
    ("table", "files", "environ", "key", "problem"),
    [
        pytest.param({"token": "   "}, {}, {}, "token", "secret is empty", id="inline-blank"),
        pytest.param(
            {"token_env": "MY_TOKEN"}, {}, {}, "token_env", "environment variable MY_TOKEN is not set", id="env-unset"
        ),
        pytest.param({"token_env": "MY_TOKEN"}, {}, {"MY_TOKEN": ""}, "token_env", "secret is empty", id="env-empty"),
        pytest.param(
            {"token_env": "MY_TOKEN"}, {}, {"MY_TOKEN": " \n"}, "token_env", "secret is empty", id="env-blank"
        ),
        pytest.param({"token_file": "token"}, {}, {}, "token_file", "cannot read", id="file-missing"),
        pytest.param({"token_file": "token"}, {"cfg/token": b""}, {}, "token_file", "secret is empty", id="file-empty"),
        pytest.param(
            {"token_file": "token"}, {"cfg/token": b"\n\n"}, {}, "token_file", "secret is empty", id="file-blank"
        ),
        pytest.param(
            {"token_file": "token"}, {"cfg/token": b"\xff\xfe\x00"}, {}, "token_file", "cannot read", id="file-not-utf8"
        ),
        pytest.param(
            {"token_file": "token"},
            {"cfg/token": b"s3cret"},
            {"CREDENTIALS_DIRECTORY": "CREDS"},
            "token_file",
            "cannot read",
            id="file-not-in-credentials-directory",
        ),
        pytest.param({"token_file": "cfg"}, {}, {}, "token_file", "cannot read", id="file-is-directory"),
    ],
)
@pytest.mark.parametrize("section", ["hub", "http"])
def test_resolve_secret_errors(
    tmp_path: Path,
    section: str,
    table: dict[str, Any],
    files: dict[str, bytes],
    environ: dict[str, str],
    key: str,
    problem: str,
) -> None:
    (tmp_path / "cfg" / "cfg").mkdir(parents=True)
    (tmp_path / "creds").mkdir()
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    environ = {k: (str(tmp_path / "creds") if v == "CREDS" else v) for k, v in environ.items()}
    config = parse({section: table}, directory=tmp_path / "cfg")
    with pytest.raises(ConfigError) as caught:
        resolve_secret(getattr(config.model, section), "token", key=section, config=config, environ=environ)
    assert_one_line(caught.value, path=SOURCE, key=f"{section}.{key}", problem=problem)
    assert caught.value.key == f"{section}.{key}"
    assert "s3cret" not in str(caught.value)


# --- the oxen CLI's auth_config.toml ----------------------------------------------------------------------

AUTH = """
default_host = "hub.oxen.ai"

[[host_configs]]
host = "localhost:3000"
auth_token = "local-token"

[[host_configs]]
host = "hub.oxen.ai"
auth_token = "hub-token"

[[host_configs]]
host = "https://Staging.Oxen.ai"
auth_token = " staging-token\\n"
"""


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("https://hub.oxen.ai", "hub-token", id="host"),
        pytest.param("https://HUB.oxen.ai/", "hub-token", id="case-insensitive-url"),
        pytest.param("https://hub.oxen.ai:443", "hub-token", id="url-with-port"),
        pytest.param("http://localhost:3000", "local-token", id="host-with-port"),
        pytest.param("https://staging.oxen.ai", "staging-token", id="entry-with-scheme-and-case"),
        pytest.param("https://other.example.com", None, id="no-entry-for-host"),
        pytest.param("http://localhost:4000", None, id="other-port"),
    ],
)
def test_oxen_cli_token_matches_host(tmp_path: Path, url: str, expected: str | None) -> None:
    (tmp_path / "auth_config.toml").write_text(AUTH)
    assert oxen_cli_token(url, {"OXEN_CONFIG_DIR": str(tmp_path), "HOME": "/nonexistent"}) == expected


def test_oxen_cli_token_defaults_to_home_config(tmp_path: Path) -> None:
    folder = tmp_path / ".config" / "oxen"
    folder.mkdir(parents=True)
    (folder / "auth_config.toml").write_text(AUTH)
    assert oxen_cli_token("https://hub.oxen.ai", {"HOME": str(tmp_path)}) == "hub-token"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="no-file"),
        pytest.param(b"[[host_configs]\nhost =", id="invalid-toml"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(
            b"host_configs = 5\n",
            id="host-configs-not-array",
        ),
        pytest.param(b'[host_configs]\nhost = "hub.oxen.ai"\nauth_token = "t"\n', id="host-configs-a-table"),
        pytest.param(b'host_configs = ["hub.oxen.ai"]\n', id="entry-not-table"),
        pytest.param(b'[[host_configs]]\nhost = "hub.oxen.ai"\n', id="no-auth-token"),
        pytest.param(b'[[host_configs]]\nhost = "hub.oxen.ai"\nauth_token = "  "\n', id="blank-auth-token"),
        pytest.param(b'[[host_configs]]\nhost = "hub.oxen.ai"\nauth_token = 42\n', id="auth-token-not-string"),
        pytest.param(b'[[host_configs]]\nauth_token = "t"\n', id="no-host"),
    ],
)
def test_oxen_cli_token_absent_or_unusable(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / "auth_config.toml").write_bytes(content)
    assert oxen_cli_token("https://hub.oxen.ai", {"OXEN_CONFIG_DIR": str(tmp_path)}) is None


def test_oxen_cli_token_skips_unusable_entries(tmp_path: Path) -> None:
    (tmp_path / "auth_config.toml").write_text(
        'host_configs = ["junk", {host = "hub.oxen.ai", auth_token = ""}, {host = "hub.oxen.ai", auth_token = "ok"}]\n'
    )
    assert oxen_cli_token("https://hub.oxen.ai", {"OXEN_CONFIG_DIR": str(tmp_path)}) == "ok"


@pytest.mark.parametrize(
    ("hub", "environ_kind", "expected"),
    [
        pytest.param({"token": "configured"}, "cli", "configured", id="configured-beats-cli"),
        pytest.param({"token_env": "T"}, "cli", "from-env", id="env-beats-cli"),
        pytest.param({}, "cli", "hub-token", id="falls-back-to-cli"),
        pytest.param({"url": "http://localhost:3000"}, "cli", "local-token", id="cli-matched-to-url"),
    ],
)
def test_resolve_hub_token(tmp_path: Path, hub: dict[str, Any], environ_kind: str, expected: str) -> None:
    (tmp_path / "auth_config.toml").write_text(AUTH)
    environ = {"OXEN_CONFIG_DIR": str(tmp_path), "T": "from-env"}
    assert resolve_hub_token(parse({"hub": hub}), environ) == expected


@pytest.mark.parametrize(
    ("hub", "write_auth", "key", "problem"),
    [
        pytest.param({}, False, "hub.token", "no Hub token", id="nothing-anywhere"),
        pytest.param(
            {"url": "https://other.example.com"}, True, "hub.token", "no Hub token", id="cli-has-no-entry-for-host"
        ),
        pytest.param(
            {"token_env": "UNSET_VAR"},
            True,
            "hub.token_env",
            "UNSET_VAR is not set",
            id="missing-configured-secret-no-fallback",
        ),
    ],
)
def test_resolve_hub_token_errors(
    tmp_path: Path, hub: dict[str, Any], write_auth: bool, key: str, problem: str
) -> None:
    if write_auth:
        (tmp_path / "auth_config.toml").write_text(AUTH)
    with pytest.raises(ConfigError) as caught:
        resolve_hub_token(parse({"hub": hub}), {"OXEN_CONFIG_DIR": str(tmp_path), "HOME": str(tmp_path)})
    assert_one_line(caught.value, path=SOURCE, key=key, problem=problem)


# --- the real CLI: oxen-watcher check-config ---------------------------------------------------------------


def _cli_case(tmp_path: Path, case: str) -> tuple[Path, dict[str, str]]:
    """Write the files of one check-config case; return the config path and extra environment."""
    good_ft = [ft()]
    if case == "ok-inline":
        return write_config(tmp_path / "w.toml", {"hub": {"token": "t"}, "fine_tunes": good_ft}), {}
    if case == "ok-env":
        return write_config(tmp_path / "w.toml", {"hub": {"token_env": "OW_TEST_TOKEN"}, "fine_tunes": good_ft}), {
            "OW_TEST_TOKEN": "t"
        }
    if case == "ok-credentials-file":
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "hub-token").write_text("t\n")
        path = write_config(tmp_path / "w.toml", {"hub": {"token_file": "hub-token"}, "fine_tunes": good_ft})
        return path, {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    if case == "ok-oxen-cli":
        (tmp_path / "oxen").mkdir()
        (tmp_path / "oxen" / "auth_config.toml").write_text(AUTH)
        return write_config(tmp_path / "w.toml", {"fine_tunes": good_ft}), {"OXEN_CONFIG_DIR": str(tmp_path / "oxen")}
    if case == "unknown-key":
        data = {"hub": {"token": "t"}, "fine_tunes": [ft(), ft(id="b"), ft(id="c", intervall_s=5)]}
        return write_config(tmp_path / "w.toml", data), {}
    if case == "duplicate":
        return write_config(tmp_path / "w.toml", {"hub": {"token": "t"}, "fine_tunes": [ft(), ft()]}), {}
    if case == "out-of-range":
        return write_config(tmp_path / "w.toml", {"hub": {"token": "t"}, "watch": {"interval_s": 0.1}}), {}
    if case == "env-unset":
        return write_config(tmp_path / "w.toml", {"hub": {"token_env": "OW_TEST_UNSET_VAR"}}), {}
    if case == "file-empty":
        (tmp_path / "hub-token").write_text("\n")
        return write_config(tmp_path / "w.toml", {"hub": {"token_file": "hub-token"}}), {}
    if case == "oxen-cli-malformed":
        (tmp_path / "oxen").mkdir()
        (tmp_path / "oxen" / "auth_config.toml").write_text("host_configs = 1\n")
        return write_config(tmp_path / "w.toml", {"fine_tunes": good_ft}), {"OXEN_CONFIG_DIR": str(tmp_path / "oxen")}
    if case == "no-token":
        return write_config(tmp_path / "w.toml", {"fine_tunes": good_ft}), {}
    if case == "invalid-toml":
        path = tmp_path / "w.toml"
        path.write_text("[hub\n")
        return path, {}
    if case == "missing-file":
        return tmp_path / "absent.toml", {}
    if case == "http-env-unset":
        data = {"hub": {"token": "t"}, "http": {"token_env": "OW_TEST_UNSET_METRICS"}}
        return write_config(tmp_path / "w.toml", data), {}
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        pytest.param("ok-inline", 0, "OK (1 fine-tunes, 0 notifiers, sqlite store)", id="ok-inline"),
        pytest.param("ok-env", 0, "OK (1 fine-tunes, 0 notifiers, sqlite store)", id="ok-env"),
        pytest.param(
            "ok-credentials-file", 0, "OK (1 fine-tunes, 0 notifiers, sqlite store)", id="ok-credentials-file"
        ),
        pytest.param("ok-oxen-cli", 0, "OK (1 fine-tunes, 0 notifiers, sqlite store)", id="ok-oxen-cli-fallback"),
        pytest.param("unknown-key", 78, "fine_tunes[2].intervall_s: unknown key", id="unknown-key"),
        pytest.param("duplicate", 78, "fine_tunes[1]: duplicate fine-tune", id="duplicate"),
        pytest.param(
            "out-of-range", 78, "watch.interval_s: Input should be greater than or equal to 0.5", id="out-of-range"
        ),
        pytest.param(
            "env-unset", 78, "hub.token_env: environment variable OW_TEST_UNSET_VAR is not set", id="missing-secret"
        ),
        pytest.param("file-empty", 78, "hub.token_file: secret is empty", id="empty-secret"),
        pytest.param("no-token", 78, "hub.token: no Hub token", id="no-token"),
        pytest.param(
            "oxen-cli-malformed",
            78,
            "hub.token: no Hub token",
            id="malformed-oxen-cli-config",
        ),
        pytest.param("invalid-toml", 78, "invalid TOML", id="invalid-toml"),
        pytest.param("missing-file", 78, "cannot read", id="missing-file"),
        pytest.param(
            "http-env-unset",
            78,
            "http.token_env: environment variable OW_TEST_UNSET_METRICS is not set",
            id="missing-http-secret",
        ),
    ],
)
def test_check_config_cli(tmp_path: Path, case: str, code: int, message: str) -> None:
    path, env = _cli_case(tmp_path, case)
    result = cli("check-config", "-c", str(path), env=env)
    assert result.returncode == code, result.stdout + result.stderr
    if code == 0:
        assert result.stdout.strip() == f"{path}: {message}"
    else:
        line = result.stderr.strip()
        assert "\n" not in line, line
        assert line.startswith(f"oxen-watcher: {path}: "), line
        assert message in line, line
        assert result.stdout == ""


def test_check_config_cli_reads_config_path_from_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path / "w.toml", {"hub": {"token": "t"}, "fine_tunes": [ft(), ft(id="b")]})
    result = cli("check-config", env={"OXEN_WATCHER_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK (2 fine-tunes, 0 notifiers, sqlite store)"


def test_check_config_cli_never_prints_the_secret(tmp_path: Path) -> None:
    path = write_config(tmp_path / "w.toml", {"hub": {"token": "s3cret-token-value"}, "watch": {"interval_s": 0}})
    result = cli("check-config", "-c", str(path))
    assert result.returncode == 78
    assert "s3cret-token-value" not in result.stdout + result.stderr
