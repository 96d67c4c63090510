"""End to end: the simulated Hub on 127.0.0.1 and the real `oxen-watcher` process."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
from conftest import ROOT, TOKEN, base_config, cli, wait_for, write_config

from watcher.testing.receiver import Answer, Receiver

FT = {"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot-sft"}
KEY = "acme/bot/ft_1"


def _events(config: Path) -> list[dict]:
    result = cli("events", "-c", str(config), "--json", "--limit", "10000")
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def _polled_ok(config: Path, times: int = 1) -> bool:
    result = cli("status", "-c", str(config), "--json")
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    return bool(rows) and all(row["last_outcome"] == "ok" for row in rows)


def test_daemon_announces_changes_after_a_silent_baseline(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 100, loss=2.0)
    hub.add_checkpoint(KEY, 200, loss=1.5)
    config = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT]))
    daemon = daemons(config)
    wait_for(lambda: _polled_ok(config), what="first poll")
    assert _events(config) == []  # the baseline is silent

    hub.add_checkpoint(KEY, 300, loss=1.2)
    hub.set_deployment_status(KEY, 200, "DEPLOYING")
    wanted = {"checkpoint.created", "checkpoint.deployment_changed"}
    events = wait_for(
        lambda: (found := _events(config)) and wanted <= {e["type"] for e in found} and found,
        what="created + deployment events",
    )
    by_type = {e["type"]: e for e in events}
    created = by_type["checkpoint.created"]
    assert created["data"]["checkpoint"]["step"] == 300
    assert created["data"]["is_best_loss"] is True
    assert created["data"]["fine_tune"] == {"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot-sft"}
    deployed = by_type["checkpoint.deployment_changed"]
    assert deployed["data"]["previous_deployment_status"] is None
    assert deployed["data"]["deployment_status"] == "DEPLOYING"
    for event in events:
        assert event["id"].startswith("evt_") and "." not in event["id"]
        assert event["timestamp"].endswith("Z")

    hub.set_deployment_status(KEY, 200, "ACTIVE")
    hub.remove_checkpoint(KEY, 100)
    wait_for(lambda: {"checkpoint.removed"} <= {e["type"] for e in _events(config)}, what="removed")
    wait_for(lambda: any(e["data"].get("deployment_status") == "ACTIVE" for e in _events(config)), what="ACTIVE")
    assert daemon.terminate() == 0

    status = cli("status", "-c", str(config), "--json")
    row = orjson.loads(status.stdout.splitlines()[0])
    assert row["checkpoints"] == 2 and row["latest_step"] == 300 and row["latest_loss"] == 1.2
    assert row["deployments"] == {"200": "ACTIVE"}
    types = [e["type"] for e in _events(config)]
    assert len(types) == len({e["id"] for e in _events(config)})
    newest_first = cli("events", "-c", str(config), "--json", "--limit", "1", "--type", "checkpoint.c*")
    assert [orjson.loads(line)["type"] for line in newest_first.stdout.splitlines()] == ["checkpoint.created"]


def test_kill_9_and_restart_loses_nothing_and_repeats_nothing(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_fine_tune("acme", "bot", "ft_2")
    hub.add_checkpoint(KEY, 1, loss=3.0)
    second = {"namespace": "acme", "repo": "bot", "id": "ft_2"}
    config = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT, second]))
    daemon = daemons(config)
    wait_for(lambda: _polled_ok(config), what="baseline")
    added: list[tuple[str, int]] = []
    step = 1
    for cycle in range(4):
        for _ in range(3):
            step += 1
            hub.add_checkpoint(KEY, step, loss=3.0 / step)
            hub.add_checkpoint("acme/bot/ft_2", step, loss=3.0 / step)
            added += [(KEY, step), ("acme/bot/ft_2", step)]
        # let at least one of them be seen, then crash mid-flight
        wait_for(lambda: len(_events(config)) > len(added) - 6, what="some events")
        daemon.kill9()
        daemon = daemons(config)
    wait_for(lambda: len(_events(config)) >= len(added), timeout=30, what="all events after restarts")
    assert daemon.terminate() == 0
    events = _events(config)
    seen = Counter(
        (
            f"{e['data']['fine_tune']['namespace']}/{e['data']['fine_tune']['repo']}/{e['data']['fine_tune']['id']}",
            e["data"]["checkpoint"]["step"],
        )
        for e in events
    )
    assert {e["type"] for e in events} == {"checkpoint.created"}  # no re-baseline, nothing else
    assert sorted(seen) == sorted(added)
    assert all(count == 1 for count in seen.values()), seen
    assert len({e["id"] for e in events}) == len(events)


def test_once_dry_run_prints_events_and_writes_nothing(hub, tmp_path):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 100, loss=2.0)
    db = tmp_path / "watcher.db"
    config = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT]))

    first = cli("once", "-c", str(config), "--dry-run")
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""  # a missing database is an empty state: the baseline is silent
    assert not db.exists()

    assert cli("once", "-c", str(config)).returncode == 0
    assert db.exists()
    hub.add_checkpoint(KEY, 200, loss=1.0)
    hub.set_deployment_status(KEY, 100, "ACTIVE")
    before = db.read_bytes()
    preview = cli("once", "-c", str(config), "--dry-run")
    assert preview.returncode == 0, preview.stderr
    lines = [orjson.loads(line) for line in preview.stdout.splitlines()]
    assert [(e["type"], e["data"]["checkpoint"]["step"]) for e in lines] == [
        ("checkpoint.updated", 100),
        ("checkpoint.deployment_changed", 100),
        ("checkpoint.created", 200),
    ]
    assert set(lines[0]) == {"id", "type", "timestamp", "data"}
    assert lines[0]["data"]["changed"] == ["model_id"]
    assert db.read_bytes() == before
    assert _events(config) == []

    committed = cli("once", "-c", str(config))
    assert committed.returncode == 0
    assert [e["type"] for e in _events(config)] == [
        "checkpoint.created",
        "checkpoint.deployment_changed",
        "checkpoint.updated",
    ]


def test_once_exit_status_and_404(hub, tmp_path):
    hub.add_fine_tune("acme", "bot", "ft_1")
    missing = {"namespace": "acme", "repo": "bot", "id": "ft_gone"}
    config = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT, missing]))
    result = cli("once", "-c", str(config))
    assert result.returncode == 1
    events = _events(config)
    assert [(e["type"], e["data"]["fine_tune"]["id"], e["data"]["http_status"]) for e in events] == [
        ("fine_tune.not_found", "ft_gone", 404)
    ]
    again = cli("once", "-c", str(config))
    assert again.returncode == 1
    assert len(_events(config)) == 1  # on the transition only


def test_once_beside_run_creates_no_event_twice(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    config = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT], watch={"interval_s": 0.5}))
    daemon = daemons(config)
    wait_for(lambda: _polled_ok(config), what="baseline")
    for step in range(1, 6):
        hub.add_checkpoint(KEY, step, loss=1 / step)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "watcher", "once", "-c", str(config)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        for proc in procs:
            assert proc.wait(60) == 0
    wait_for(lambda: len(_events(config)) >= 5, what="five events")
    daemon.terminate()
    steps = [e["data"]["checkpoint"]["step"] for e in _events(config)]
    assert sorted(steps) == [1, 2, 3, 4, 5]


def test_check_config_names_a_misspelled_key(tmp_path):
    config = write_config(
        tmp_path / "c.toml",
        {
            "hub": {"url": "http://127.0.0.1:1", "token": "t"},
            "fine_tunes": [
                {"namespace": "a", "repo": "b", "id": "c"},
                {"namespace": "a", "repo": "b", "id": "d", "intervall_s": 5},
            ],
        },
    )
    result = cli("check-config", "-c", str(config))
    assert result.returncode == 78
    assert result.stderr.strip().count("\n") == 0
    assert str(config) in result.stderr and "fine_tunes[1].intervall_s" in result.stderr
    assert "unknown key" in result.stderr


def test_status_and_events_need_no_secrets(hub, tmp_path):
    hub.add_fine_tune("acme", "bot", "ft_1")
    data = base_config(hub, tmp_path, fine_tunes=[FT])
    data["hub"] = {"url": hub.url, "token_env": "OXEN_WATCHER_TEST_UNSET_TOKEN"}
    config = write_config(tmp_path / "c.toml", data)
    env = {k: v for k, v in os.environ.items() if k != "OXEN_WATCHER_TEST_UNSET_TOKEN"}
    assert cli("once", "-c", str(config), env=env).returncode == 78
    assert cli("status", "-c", str(config)).returncode == 0
    assert cli("events", "-c", str(config)).returncode == 0


DEMO_WANTED = (
    "checkpoint.created",
    "checkpoint.deployment_changed",
    "fine_tune.discovered",
    "run finished",
    "run failed",
)


def test_demo_prints_created_deployment_and_lifecycle_events_within_40s(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "demo"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        import selectors
        import time

        selector = selectors.DefaultSelector()
        assert proc.stdout is not None
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
            text = "".join(seen)
            if all(wanted in text for wanted in DEMO_WANTED):
                break
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
    text = "".join(seen)
    assert all(wanted in text for wanted in DEMO_WANTED), text
    assert "fine_tune.not_found" in text
    assert "sweep-lr-3e-5: new fine-tune" in text and "loss diverged" in text
    assert "baseline-run" not in text  # found by the source's first read: recorded silently
    assert code == 0


def test_a_daemon_started_while_once_delivers_waits_for_the_lock_and_nothing_is_sent_twice(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    for step in range(1, 7):
        hub.add_checkpoint(KEY, step, loss=1 / step)
    with Receiver() as receiver:
        receiver.script(Answer(status=200, delay_s=1.2, times=1000))  # a slow receiver: one lane takes seconds
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[FT],
            watch={"interval_s": 0.5, "baseline": False},
            notifiers=[{"name": "ci", "type": "webhook", "url": receiver.url, "timeout_s": 10}],
        )
        config = write_config(tmp_path / "c.toml", data)
        once = subprocess.Popen(
            [sys.executable, "-m", "watcher", "once", "-c", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: receiver.deliveries(), what="once delivering")
            daemon = daemons(config)  # started while `once` holds the dispatch lock with 5 rows to go
            wait_for(lambda: any(e.get("event") == "dispatch.lock_busy" for e in daemon.logs()), what="lock busy")
            assert once.wait(60) == 0
        finally:
            if once.poll() is None:
                once.kill()
        wait_for(lambda: any(e.get("event") == "dispatch.lock_acquired" for e in daemon.logs()), what="lock taken")
        hub.add_checkpoint(KEY, 7, loss=0.1)  # announced and delivered by the daemon, now that it holds the lock
        # meanwhile `once` runs again beside the daemon: it polls, never delivers
        for _ in range(2):
            assert cli("once", "-c", str(config)).returncode == 0
        wait_for(lambda: len(receiver.deliveries()) >= 7, timeout=60, what="seven deliveries")
        assert daemon.terminate() == 0
        ids = [received.webhook_id for received in receiver.deliveries()]
        assert len(ids) == len(set(ids)) == 7, Counter(ids).most_common(3)


def _catches_sighup(pid: int) -> bool:
    """Whether the process installed a handler for SIGHUP (bit 1 of SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def _open_for_writing(fifo: Path) -> int | None:
    """The FIFO opened for writing once a reader has it open (None before)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def test_a_sighup_during_start_up_is_applied_once_started(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_fine_tune("acme", "bot", "ft_2")
    second = {"namespace": "acme", "repo": "bot", "id": "ft_2"}
    # the start-up reads its token from a FIFO: it waits there, its config read, until the test writes the token
    token_fifo = tmp_path / "token"
    os.mkfifo(token_fifo)
    first = base_config(hub, tmp_path, fine_tunes=[FT])
    first["hub"] = {**{k: v for k, v in first["hub"].items() if k != "token"}, "token_file": str(token_fifo)}
    config = write_config(tmp_path / "c.toml", first)
    daemon = daemons(config)
    assert daemon.proc is not None
    wait_for(lambda: _catches_sighup(daemon.proc.pid), interval=0.001, what="the SIGHUP handler")
    daemon.proc.send_signal(signal.SIGHUP)  # long before the daemon has started (its imports are still loading)
    writer = wait_for(lambda: _open_for_writing(token_fifo), what="the start-up reading its token")
    # the first config is read: the one the SIGHUP's reload reads (once started) adds a fine-tune
    write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT, second]))
    os.write(writer, TOKEN.encode())
    os.close(writer)
    applied = wait_for(
        lambda: [e for e in daemon.logs() if e.get("event") == "reload.applied"], what="the deferred reload"
    )
    assert daemon.proc.poll() is None, "the daemon died of the SIGHUP"
    events = [e.get("event") for e in daemon.logs()]
    assert events.index("watcher.started") < events.index("reload.applied")
    assert "reload.deferred" in events
    assert applied[0]["added"] == ["acme/bot/ft_2"]
    wait_for(lambda: hub.requests("acme/bot/ft_2"), what="the added fine-tune polled")
    assert daemon.terminate() == 0


def test_check_config_refuses_credentials_in_the_hub_url(tmp_path):
    data = {
        "hub": {"url": "https://alice:pa55word-s3cret@hub.example.com", "token": "t0ken-value"},
        "state": {"path": str(tmp_path / "w.db")},
        "fine_tunes": [FT],
    }
    config = write_config(tmp_path / "c.toml", data)
    result = cli("check-config", "-c", str(config))
    assert result.returncode == 78
    assert "hub.url" in result.stderr and "user:password@" in result.stderr
    assert "pa55word-s3cret" not in result.stdout + result.stderr
