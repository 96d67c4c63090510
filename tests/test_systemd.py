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
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TOKEN, base_config, wait_for, write_config

from watcher.cli.main import EX_CONFIG

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

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

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
