"""Shared fixtures: the simulated Hub on 127.0.0.1, config files, the real daemon process, deadline waits; and the
markers (unit, e2e, postgres, browser, slow) that every test gets here, from what it uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from watcher.testing.simhub import SimHub

# the throwaway PostgreSQL cluster (`pg_cluster`, session) and a fresh database per test (`pg_url`)
pytest_plugins = ["pgcluster"]

T = TypeVar("T")
TOKEN = "simhub-token"
ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    """A TOML literal for a Python value (enough for test configs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write a config dict (tables and arrays of tables) as TOML."""
    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
                lines.append("")
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
            lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def hub() -> Iterator[SimHub]:
    """A running simulated Hub."""
    with SimHub(token=TOKEN) as simulated:
        yield simulated


def base_config(hub: SimHub, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A fast-polling config against the simulated Hub, state in tmp_path; sections override keys."""
    config: dict[str, Any] = {
        "hub": {"url": hub.url, "token": TOKEN, "timeout_s": 5},
        "watch": {"interval_s": 0.5, "jitter_s": 0, "failure_threshold": 3, "shutdown_grace_s": 5},
        "state": {"path": str(tmp_path / "watcher.db")},
        "http": {"listen": "127.0.0.1:0"},
        "log": {"level": "info", "format": "json"},
        "fine_tunes": [],
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config[section] = {**config.get(section, {}), **values}
        else:
            config[section] = values
    return config


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m watcher ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


class Daemon:
    """The real `oxen-watcher run` process, its output captured to files."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env
        self.stdout = config.with_suffix(".stdout.log")
        self.stderr = config.with_suffix(".stderr.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0

    def start(self) -> Daemon:
        """Start the daemon (logs() then reads only what this run writes)."""
        self.offset = self.stderr.stat().st_size if self.stderr.exists() else 0
        out = self.stdout.open("ab")
        err = self.stderr.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "run", "-c", str(self.config)],
            stdout=out,
            stderr=err,
            env={**os.environ, **(self.env or {})},
            cwd=ROOT,
        )
        out.close()
        err.close()
        return self

    def kill9(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines this run wrote so far."""
        found = []
        for line in self.stderr.read_bytes()[self.offset :].splitlines():
            try:
                found.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return found

    def output(self) -> str:
        """Everything the daemon printed so far."""
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """A factory of daemons that are all stopped at the end of the test."""
    started: list[Daemon] = []

    def make(config: Path, **kwargs: Any) -> Daemon:
        daemon = Daemon(config, **kwargs).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


# --- markers ----------------------------------------------------------------------------------------------
#
# Every test gets at least one of unit / e2e / postgres / browser here, from what it uses, so that a new test is
# classified without anyone remembering to: `browser` for tests/browser; `postgres` for a test that needs the
# throwaway cluster (the `pg_cluster` fixture, or a parameter naming PostgreSQL); `e2e` for a test that starts
# processes (the `daemons` fixture, or `cli`, `Daemon` or `subprocess` named in its code, its fixtures or the
# test helpers they call) and for the long in-process runs below; `unit` for the rest: quick, in this process
# (a unit test that starts a process fails, see `_unit_tests_stay_in_process`). `slow` marks the long ones,
# which also get a longer timeout than pyproject's.

# names whose use means "starts another process"
_PROCESS_NAMES = frozenset({"cli", "Daemon", "subprocess"})

# in-process tests too long for the quick unit selection (5 s and more on a loaded 2-core machine): the daemon's
# app end to end, soak loops of it, long property searches, rate limits and back-off storms waited out in real time
_LONG_IN_PROCESS = (
    "tests/test_lifecycle_daemon.py",
    "tests/reliability/test_properties.py",
    "tests/test_reload_notifiers.py::test_500_reloads_",
    "tests/test_reload_notifiers.py::test_300_reloads_",
    "tests/test_reload_notifiers.py::test_unchanged_slack_notifier_keeps_its_rate_limit_",
    "tests/test_schema.py::test_document_shaped_junk_",
    "tests/test_schema.py::test_arbitrary_json_values_",
    "tests/test_schema.py::test_documents_valid_under_the_spec_",
    "tests/test_watcher.py::test_a_429_storm_",
    "tests/test_slack.py::test_waiting_for_the_rate_limit_",
    "tests/test_slack.py::test_one_message_per_second_",
)

# the known-long tests among those that start processes or PostgreSQL: crash loops, fault runs, the config
# matrix, replica pairs
_LONG_OUT_OF_PROCESS = (
    "tests/reliability/",
    "tests/test_replicas.py",
    "tests/test_replicas_sources.py",
    "tests/test_pages_replicas.py",
)
SLOW_TIMEOUT_S = 1800  # pyproject's is 600 s


def _starts_processes(code: types.CodeType, scope: dict[str, Any], seen: set[int]) -> bool:
    """True when `code` (or a test helper it names, followed through functions and classes) names a process API."""
    if id(code) in seen:
        return False
    seen.add(id(code))
    if _PROCESS_NAMES.intersection(code.co_names):
        return True
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and _starts_processes(const, scope, seen):
            return True
    for name in code.co_names:
        target = scope.get(name)
        if not _is_test_helper(target):
            continue
        functions = vars(target).values() if isinstance(target, type) else [target]
        for function in functions:
            inner = getattr(function, "__code__", None) or getattr(getattr(function, "fget", None), "__code__", None)
            module = sys.modules.get(getattr(target, "__module__", ""))
            if inner is not None and _starts_processes(inner, vars(module) if module else scope, seen):
                return True
    return False


def _is_test_helper(target: Any) -> bool:
    """A function or class defined in a file under tests/ (never one of the library's)."""
    if not isinstance(target, type | types.FunctionType):
        return False
    module = sys.modules.get(getattr(target, "__module__", ""))
    source = getattr(module, "__file__", None) or ""
    return source.startswith(str(ROOT / "tests"))


def _uses_processes(item: pytest.Item) -> bool:
    """The test function or one of its fixtures from tests/ starts processes."""
    functions = [getattr(item, "function", None)]
    fixtures = getattr(item, "_fixtureinfo", None)
    for name, definitions in getattr(fixtures, "name2fixturedefs", {}).items():
        if name != "_unit_tests_stay_in_process":  # the guard below names subprocess to refuse it
            functions += [definition.func for definition in definitions]
    seen: set[int] = set()
    for function in functions:
        if not _is_test_helper(function):
            continue
        module = sys.modules[function.__module__]
        if _starts_processes(function.__code__, vars(module), seen):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test its markers (see above)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        kinds = {marker.name for marker in item.iter_markers() if marker.name in {"unit", "e2e", "postgres", "browser"}}
        if item.nodeid.startswith("tests/browser/"):
            kinds.add("browser")
        if "pg_cluster" in names or any(str(value).startswith("postgresql") for value in params.values()):
            kinds.add("postgres")
        long_in_process = item.nodeid.startswith(_LONG_IN_PROCESS)
        if long_in_process or "daemons" in names or _uses_processes(item):
            kinds.add("e2e")
        if not kinds:
            kinds.add("unit")
        for kind in sorted(kinds):
            item.add_marker(kind)
        if long_in_process or (kinds != {"unit"} and item.nodeid.startswith(_LONG_OUT_OF_PROCESS)):
            item.add_marker("slow")
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked unit (only) that starts a process fails and says so: the marker hook above missed it."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(
            f"{request.node.nodeid} is marked unit but starts a process: mark it e2e (tests/conftest.py)"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
