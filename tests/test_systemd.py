"""The systemd unit (systemd/oxen-watcher.service) and the daemon's side of the contract it declares.

The unit is checked with systemd-analyze (verify, and the offline security score); the daemon is run for real
with $NOTIFY_SOCKET pointing at a datagram socket this test binds, laid out the way the unit lays it out
($STATE_DIRECTORY, $CREDENTIALS_DIRECTORY holding the token, a relative state path and token_file).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ROOT, TOKEN, base_config, wait_for, write_config

from watcher.cli.main import EX_CONFIG
from watcher.core.health import LongOperation, Verdict
from watcher.daemon.health import liveness, status_line
from watcher.store import SqliteStore

UNIT = ROOT / "systemd" / "oxen-watcher.service"
SHIPPED_EXEC = "/usr/local/bin/oxen-watcher"
MAX_EXPOSURE = 2.0
FT = {"namespace": "acme", "repo": "bot", "id": "ft_1"}
KEY = "acme/bot/ft_1"


def _directives(text: str) -> dict[str, list[str]]:
    """Key -> values, in order, over all sections (enough for this unit: no continuation lines)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, f"unsupported time span {value!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.fixture
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or next(
        (p for p in ("/usr/bin/systemd-analyze", "/bin/systemd-analyze") if Path(p).exists()), None
    )
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this venv's console script (verify checks it exists)."""
    script = shutil.which("oxen-watcher") or str(Path(sys.executable).parent / "oxen-watcher")
    assert Path(script).is_file(), f"console script not installed: {script}"
    # quoted, with % and $ escaped, so any venv path is one literal argument to systemd
    quoted = '"' + script.replace("%", "%%").replace("$", "$$") + '"'
    text = UNIT.read_text()
    assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1
    unit = tmp_path / "oxen-watcher.service"
    unit.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={quoted} "))
    return unit


def test_unit_matches_what_the_daemon_implements():
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecStart"][0].startswith(f"{SHIPPED_EXEC} run -c ")
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert _seconds(d["WatchdogSec"][0]) >= 10  # the main loop ticks once a second, pets every WatchdogSec/2
    # SIGTERM: up to 5 s to stop the dispatcher, then the default 10 s shutdown grace; room before SIGKILL
    assert _seconds(d["TimeoutStopSec"][0]) > 5 + 10
    assert d["DynamicUser"] == ["yes"]
    assert d["StateDirectory"] == ["oxen-watcher"] and d["ConfigurationDirectory"] == ["oxen-watcher"]
    assert d["LoadCredential"] == ["oxen-token:/etc/oxen-watcher/oxen-token"]
    # the Hub and webhooks can be anywhere: no IP allow/deny lists, and Internet sockets stay allowed
    assert "IPAddressDeny" not in d and "IPAddressAllow" not in d
    assert set(" ".join(d["RestrictAddressFamilies"]).split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_systemd_analyze_verify_is_silent(systemd_analyze, local_unit):
    # Nothing is filtered: on a host with systemd installed, verify of this unit prints nothing at all. (The
    # shipped unit itself would print "Command /usr/local/bin/oxen-watcher is not executable" wherever it is
    # not installed yet, which is why ExecStart is pointed at this venv's console script.)
    result = subprocess.run(
        [systemd_analyze, "verify", str(local_unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=local_unit.parent,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_analyze_security_exposure(systemd_analyze, local_unit):
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(local_unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=local_unit.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match[1])
    assert exposure <= MAX_EXPOSURE, result.stdout


# --- the daemon's side: sd_notify under a systemd-like layout ------------------------------------------------


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET; collects every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.received_at: list[float] = []  # time.monotonic() when each message was read

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            self.received_at.append(time.monotonic())

    def find(self, key: str, value: str | None = None, *, prefix: str | None = None, after: int = 0) -> int | None:
        """The index of the first message from `after` on with key (equal to value / starting with prefix)."""
        self._drain()
        for index, message in enumerate(self.messages[after:], start=after):
            got = message.get(key)
            if got is None or (value is not None and got != value):
                continue
            if prefix is not None and not got.startswith(prefix):
                continue
            return index
        return None

    def wait(
        self, key: str, value: str | None = None, *, prefix: str | None = None, after: int = 0, timeout: float = 20
    ) -> int:
        described = f"{key}={value if value is not None else (prefix or '') + '...'}"
        found = wait_for(
            lambda: (i := self.find(key, value, prefix=prefix, after=after)) is not None and (i,),
            timeout=timeout,
            what=f"{described} on $NOTIFY_SOCKET; got {self.messages}",
        )
        return found[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    if len(str(path).encode()) >= 108:  # sun_path; pytest's tmp_path is normally far shorter
        pytest.skip(f"tmp_path too long for an AF_UNIX socket: {path}")
    sock = NotifySocket(path)
    yield sock
    sock.close()


def test_daemon_notifies_systemd_under_the_units_layout(hub, tmp_path, daemons, notify_socket):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 100, loss=2.0)
    state_dir = tmp_path / "state"  # StateDirectory=
    credentials = tmp_path / "credentials"  # LoadCredential=
    config_dir = tmp_path / "etc"  # ConfigurationDirectory=
    for folder in (state_dir, credentials, config_dir):
        folder.mkdir()
    (credentials / "oxen-token").write_text(TOKEN + "\n")
    # as in the README: token_file and the state path relative, resolved against the unit's directories
    data = base_config(hub, tmp_path, state={"path": "watcher.db"}, fine_tunes=[FT])
    del data["hub"]["token"]
    data["hub"]["token_file"] = "oxen-token"
    config = write_config(config_dir / "config.toml", data)
    env = {
        "NOTIFY_SOCKET": str(notify_socket.path),
        "WATCHDOG_USEC": "2000000",
        "STATE_DIRECTORY": str(state_dir),
        "CREDENTIALS_DIRECTORY": str(credentials),
    }
    daemon = daemons(config, env=env)

    ready = notify_socket.wait("READY", "1")
    assert notify_socket.messages[ready].get("STATUS", "").startswith("watching"), notify_socket.messages[ready]
    notify_socket.wait("STATUS", prefix="watching")
    # WATCHDOG_USEC=2 s: petted every second or so while healthy
    first = notify_socket.wait("WATCHDOG", "1", after=ready)
    notify_socket.wait("WATCHDOG", "1", after=first + 1, timeout=10)
    # the token came from $CREDENTIALS_DIRECTORY, the database went to $STATE_DIRECTORY
    wait_for(lambda: any(r.authorized and r.status == 200 for r in hub.requests(KEY)), what="an authorized poll")
    assert (state_dir / "watcher.db").exists() and not (config_dir / "watcher.db").exists()

    # ExecReload=kill -HUP: the daemon reports the reload and goes back to watching
    mark = len(notify_socket.messages)
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait("STATUS", "reloading the configuration", after=mark)
    notify_socket.wait("STATUS", prefix="watching", after=reloading + 1)
    assert daemon.proc.poll() is None, daemon.output()

    mark = len(notify_socket.messages)
    assert daemon.terminate() == 0, daemon.output()
    notify_socket.wait("STOPPING", "1", after=mark, timeout=5)


# --- a planned long store operation (a rewrite of the SQLite file) against the watchdog ------------------------

MIB = 1024 * 1024


def _aged_database(path: Path, *, old_mib: int, live_mib: int) -> None:
    """A database of old_mib of events past retention and live_mib of recent ones, in large rows and two
    statements (a few seconds for 500 MiB)."""
    SqliteStore(str(path)).close()
    row = 256 * 1024
    now = time.time()
    with sqlite3.connect(path) as db:
        for prefix, mib, at in (("old-", old_mib, now - 400 * 86400), ("live-", live_mib, now)):
            db.execute(
                "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?) "
                "INSERT INTO events (id, type, fine_tune_key, created_at, envelope) "
                "SELECT ? || i, 'checkpoint.created', ?, ?, '\"' || hex(zeroblob(?)) || '\"' FROM k",
                (mib * MIB // row, prefix, KEY, at, row // 2),
            )
    db.close()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_long_rewrite_of_the_database_keeps_healthz_and_the_watchdog(hub, tmp_path, daemons, notify_socket):
    """Retention at start rewrites 360 MiB of a 560 MiB file (VACUUM: 17 s on a busy 2-core machine), holding the
    store's thread: the daemon stays alive for /healthz and systemd (every answer 200, the watchdog petted every
    WATCHDOG_USEC / 2 throughout), and STATUS= and /healthz say what runs and until when."""
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 100, loss=2.0)
    database = tmp_path / "watcher.db"
    _aged_database(database, old_mib=200, live_mib=360)
    assert database.stat().st_size >= 500 * MIB
    config = write_config(tmp_path / "config.toml", base_config(hub, tmp_path, fine_tunes=[FT]))
    watchdog_s = 2.0
    daemon = daemons(
        config, env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
    )

    def logged(event: str) -> list[dict[str, object]]:
        return [entry for entry in daemon.logs() if entry.get("event") == event]

    started = wait_for(lambda: logged("watcher.started"), timeout=60, what="start")
    port = int(str(started[-1]["listen"]).rsplit(":", 1)[1])
    wait_for(lambda: logged("store.long_operation"), timeout=120, what="the rewrite starting")
    answers: list[tuple[int, dict[str, object]]] = []
    sampling_from = time.monotonic()
    with httpx.Client(timeout=5) as client:
        while not logged("store.long_operation_ended"):
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.output()
            response = client.get(f"http://127.0.0.1:{port}/healthz")
            answers.append((response.status_code, orjson.loads(response.content)))
            notify_socket.find("WATCHDOG")  # reads what arrived, with its time
            time.sleep(0.2)  # the sampling rate of /healthz, not a wait for something
    (ended,) = logged("store.long_operation_ended")
    assert float(str(ended["seconds"])) > 2 * watchdog_s, "the rewrite was too short to show anything"
    assert answers and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
    assert any("compacting the state database" in str(body.get("store", "")) for _, body in answers), answers[:3]
    # petted all along: no gap between two WATCHDOG=1 as long as the interval systemd allows
    received = zip(notify_socket.received_at, notify_socket.messages, strict=True)
    pets = [at for at, message in received if "WATCHDOG" in message and at >= sampling_from]
    gaps = [later - earlier for earlier, later in zip(pets, pets[1:], strict=False)]
    assert len(pets) >= 3 and max(gaps) < watchdog_s, gaps
    said = [i for i, message in enumerate(notify_socket.messages) if "planned long store" in message.get("STATUS", "")]
    assert said, notify_socket.messages
    assert "(compacting the state database, " in notify_socket.messages[said[0]]["STATUS"]
    # and once it ended, the line says so at once

    def cleared() -> bool:
        notify_socket.find("STATUS")
        lines = [message["STATUS"] for message in notify_socket.messages if "STATUS" in message]
        return "planned" not in lines[-1]

    wait_for(cleared, timeout=5, what="STATUS= without the operation")
    wait_for(lambda: logged("retention.pruned"), what="the pass ending")
    assert database.stat().st_size < 400 * MIB
    assert daemon.terminate() == 0, daemon.output()


def _operation(*, started_at: float, expected_s: float) -> LongOperation:
    return LongOperation("compacting the state database, 360 MiB", started_at, started_at + expected_s, 1_800_000_000.0)


def _live(now: float, **kwargs: Any) -> Verdict:
    return liveness(now=now, beat=kwargs.pop("beat", now), tasks={}, **kwargs)


def test_a_planned_long_operation_excuses_a_silent_dispatcher_and_store_until_its_expected_end():
    operation = _operation(started_at=1000.0, expected_s=150.0)
    during = _live(1140.0, dispatcher_beat=1001.0, store_call_since=1001.0, long_operation=operation)
    assert during.ok, during.reason
    assert during.detail == {"store": operation.describe()}
    assert operation.describe() == (
        "a planned long store operation in progress (compacting the state database, 360 MiB) since "
        "2027-01-15T08:00:00Z, expected to end by 2027-01-15T08:02:30Z"
    )
    line = status_line(health=[], pending=0, long_operation=operation)
    assert line == f"watching 0 fine-tunes, 0 failing, 0 deliveries pending; {operation.describe()}"
    assert status_line(health=[], pending=0) == "watching 0 fine-tunes, 0 failing, 0 deliveries pending"


def test_a_wedged_loop_or_store_is_still_reported_with_or_without_a_planned_operation():
    operation = _operation(started_at=1000.0, expected_s=150.0)
    # the main loop silent: never excused
    wedged = _live(1140.0, beat=1120.0, dispatcher_beat=1001.0, long_operation=operation)
    assert not wedged.ok and wedged.reason == "main loop silent for 20s"
    # past the expected end: the dispatcher and the store count again, and the reason says what overran
    overran = _live(1160.0, dispatcher_beat=1001.0, store_call_since=1001.0, long_operation=operation)
    assert not overran.ok
    assert overran.reason.startswith("dispatcher silent for 159s (a planned long store operation in progress")
    assert "; store unanswered for 159s (" in overran.reason and overran.reason.endswith(", overrun)")
    # no operation: a store call unanswered for over 30 s is a stuck store, and a silent dispatcher is reported
    stuck = _live(1040.0, dispatcher_beat=1039.0, store_call_since=1005.0)
    assert not stuck.ok and stuck.reason == "store unanswered for 35s"
    assert _live(1040.0, dispatcher_beat=1005.0).reason == "dispatcher silent for 35s"
    assert _live(1040.0, dispatcher_beat=1039.0, store_call_since=1015.0).ok
