"""Operations, against the real daemon: /metrics (promtool-clean, right values, persisted across restarts),
health endpoints, SIGHUP reload, SIGTERM, and secrets never appearing in any output."""

from __future__ import annotations

import asyncio
import base64
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
import structlog
from conftest import ROOT, Daemon, base_config, cli, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families

from watcher.testing.receiver import Answer, Receiver
from watcher.testing.simhub import Fault

FT = {"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot-sft"}
MISSING = {"namespace": "acme", "repo": "ghost", "id": "ft_gone"}
KEY = "acme/bot/ft_1"
SCRIPT = Path(sys.executable).parent / "oxen-watcher"  # the console script, beside the interpreter


def listen_port(daemon: Daemon) -> int:
    """The metrics port the daemon bound ([http] listen = 127.0.0.1:0), from its watcher.started log line."""
    started = wait_for(lambda: [e for e in daemon.logs() if e.get("event") == "watcher.started"], what="start")
    return int(started[-1]["listen"].rsplit(":", 1)[1])


def scrape(port: int, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    return response.text


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, metric: str, **labels: str) -> float | None:
    wanted = set(labels.items())
    matches = [v for (n, ls), v in samples(text).items() if n == metric and wanted <= set(ls)]
    return matches[0] if len(matches) == 1 else (None if not matches else sum(matches))


def promtool_lint(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs it (Debian package prometheus)"
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def test_metrics_health_and_restart(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1", name="bot-sft")
    hub.add_checkpoint(
        KEY,
        100,
        loss=2.0,
        metrics={"learning_rate": 3e-5, "grad_norm": 0.7, "epoch": 0.5},
        deployment_status="ACTIVE",
        created_at="2026-11-25T10:00:00Z",
    )
    hub.add_checkpoint(KEY, 200, loss=1.5, created_at="2026-11-25T11:00:00Z")
    receiver = Receiver().start()
    down_url = receiver.url
    receiver.stop()
    data = base_config(
        hub,
        tmp_path,
        fine_tunes=[FT, MISSING],
        watch={"interval_s": 0.5},
        notifiers=[{"name": "ci", "type": "webhook", "url": down_url, "retry_schedule_s": [0, 0.2, 30]}],
    )
    config = write_config(tmp_path / "c.toml", data)
    daemon = daemons(config)
    port = listen_port(daemon)
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, what="ready")

    hub.add_checkpoint(KEY, 300, loss=1.2, metrics={"mean_token_accuracy": 0.8}, created_at="2026-11-25T12:00:00Z")
    hub.set_deployment_status(KEY, 200, "DEPLOY_FAILED")
    text = wait_for(
        lambda: (
            (t := scrape(port))
            and value(t, "oxen_fine_tune_latest_step") == 300
            and value(t, "oxen_watcher_deliveries_total", outcome="retried")
            and t
        ),
        what="step 300",
    )
    lint = promtool_lint(text)
    assert lint.returncode == 0 and lint.stdout == "" and lint.stderr == "", lint.stdout + lint.stderr
    assert "_created" not in text

    labels = {"namespace": "acme", "repo": "bot", "fine_tune_id": "ft_1", "name": "bot-sft"}
    assert value(text, "oxen_watcher_build_info") == 1
    assert value(text, "oxen_watcher_polls_total", fine_tune_id="ft_1", outcome="ok") >= 2
    assert value(text, "oxen_watcher_polls_total", fine_tune_id="ft_gone", outcome="not_found") >= 1
    assert value(text, "oxen_watcher_poll_duration_seconds_count", outcome="ok") >= 2
    assert value(text, "oxen_watcher_events_total", type="checkpoint.created") == 1
    assert value(text, "oxen_watcher_events_total", type="checkpoint.deployment_changed") == 1
    assert value(text, "oxen_watcher_events_total", type="fine_tune.not_found") == 1
    assert value(text, "oxen_watcher_last_success_timestamp_seconds", fine_tune_id="ft_1") > 1.7e9
    assert value(text, "oxen_fine_tune_checkpoints", **labels) == 3
    assert value(text, "oxen_fine_tune_latest_step", **labels) == 300
    assert value(text, "oxen_fine_tune_loss", **labels) == 1.2
    assert value(text, "oxen_fine_tune_mean_token_accuracy", **labels) == 0.8
    assert value(text, "oxen_fine_tune_learning_rate", **labels) == 2e-5  # the latest that reports it
    assert value(text, "oxen_fine_tune_epoch", **labels) == 0.3
    noon = datetime(2026, 11, 25, 12, tzinfo=UTC).timestamp()
    assert value(text, "oxen_fine_tune_latest_checkpoint_timestamp_seconds", **labels) == noon
    deployments = {
        (dict(ls)["step"], dict(ls)["status"]): v
        for (n, ls), v in samples(text).items()
        if n == "oxen_checkpoint_deployment_status"
    }
    assert deployments == {("100", "ACTIVE"): 1.0, ("200", "DEPLOY_FAILED"): 1.0}
    wait_for(
        lambda: (
            value(t := scrape(port), "oxen_watcher_outbox_pending", notifier="ci") >= 1
            and value(t, "oxen_watcher_outbox_oldest_pending_age_seconds", notifier="ci") > 0
        ),
        what="pending",
    )
    assert value(text, "oxen_fine_tune_checkpoints", fine_tune_id="ft_gone") is None

    # the status of a deployment is a state set: only the current one is exported
    hub.set_deployment_status(KEY, 200, "ACTIVE")
    wait_for(
        lambda: (
            {
                (dict(ls)["step"], dict(ls)["status"])
                for (n, ls), v in samples(scrape(port)).items()
                if n == "oxen_checkpoint_deployment_status"
            }
            == {("100", "ACTIVE"), ("200", "ACTIVE")}
        ),
        what="ACTIVE replaces DEPLOY_FAILED",
    )

    assert daemon.terminate() == 0
    # after a restart, with the Hub failing, the gauges still come from the persisted state
    hub.inject(KEY, Fault(status=500, times=None))
    daemon = daemons(config)
    port = listen_port(daemon)
    text = scrape(port)
    assert value(text, "oxen_fine_tune_checkpoints", **labels) == 3
    assert value(text, "oxen_fine_tune_latest_step", **labels) == 300
    wait_for(
        lambda: value(scrape(port), "oxen_watcher_polls_total", fine_tune_id="ft_1", outcome="error"),
        what="failed polls counted",
    )
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    assert value(scrape(port), "oxen_fine_tune_latest_step", **labels) == 300
    assert daemon.terminate() == 0


def test_readyz_waits_for_the_first_poll_of_every_fine_tune(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    data = base_config(hub, tmp_path, fine_tunes=[FT], watch={"interval_s": 2})
    # the first poll comes within the first interval; the Hub takes 4 s to answer it
    hub.inject(KEY, Fault(status=200, body=b'{"checkpoints": []}', delay_s=4))
    config = write_config(tmp_path / "c.toml", data)
    daemon = daemons(config)
    port = listen_port(daemon)
    first = httpx.get(f"http://127.0.0.1:{port}/readyz")
    assert first.status_code == 503
    body = first.json()
    assert body["status"] == "unavailable" and "first poll" in body["reason"]
    assert body["waiting"] == [KEY]
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, what="ready")
    assert daemon.terminate() == 0


def test_metrics_bearer_token(hub, tmp_path, daemons):
    data = base_config(hub, tmp_path, fine_tunes=[FT], http={"listen": "127.0.0.1:0", "token": "scrape-secret"})
    config = write_config(tmp_path / "c.toml", data)
    daemon = daemons(config)
    port = listen_port(daemon)
    assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 401
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert "oxen_watcher_build_info" in scrape(port, token="scrape-secret")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    assert daemon.terminate() == 0


def test_sighup_adds_removes_and_rejects(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_fine_tune("acme", "bot", "ft_2")
    second = {"namespace": "acme", "repo": "bot", "id": "ft_2"}
    data = base_config(hub, tmp_path, fine_tunes=[FT])
    config = write_config(tmp_path / "c.toml", data)
    daemon = daemons(config)
    port = listen_port(daemon)
    wait_for(lambda: value(scrape(port), "oxen_fine_tune_checkpoints", fine_tune_id="ft_1") == 0, what="ft_1")

    write_config(config, {**data, "fine_tunes": [second]})
    daemon.proc.send_signal(1)  # SIGHUP
    wait_for(lambda: any(e.get("event") == "reload.applied" for e in daemon.logs()), what="reload")
    applied = [e for e in daemon.logs() if e.get("event") == "reload.applied"][-1]
    assert applied["added"] == ["acme/bot/ft_2"] and applied["removed"] == ["acme/bot/ft_1"]
    wait_for(lambda: value(scrape(port), "oxen_fine_tune_checkpoints", fine_tune_id="ft_2") == 0, what="ft_2")
    hub.add_checkpoint("acme/bot/ft_2", 1, loss=1.0)
    hub.add_checkpoint(KEY, 1, loss=1.0)
    wait_for(lambda: value(scrape(port), "oxen_fine_tune_latest_step", fine_tune_id="ft_2") == 1, what="ft_2 step")
    text = scrape(port)
    assert value(text, "oxen_fine_tune_checkpoints", fine_tune_id="ft_1") is None
    assert value(text, "oxen_watcher_polls_total", fine_tune_id="ft_1") is None
    requests_before = len(hub.requests(KEY))

    config.write_text(config.read_text() + "\n[watch]\nbogus = 1\n")
    daemon.proc.send_signal(1)
    rejected = wait_for(lambda: [e for e in daemon.logs() if e.get("event") == "reload.rejected"], what="reject")
    assert str(config) in rejected[-1]["error"]
    hub.add_checkpoint("acme/bot/ft_2", 2, loss=0.5)
    wait_for(
        lambda: value(scrape(port), "oxen_fine_tune_latest_step", fine_tune_id="ft_2") == 2,
        what="still polling after the rejected reload",
    )
    assert len(hub.requests(KEY)) == requests_before  # removed fine-tunes are no longer polled
    assert daemon.terminate() == 0
    assert daemon.proc.returncode == 0


def test_secrets_never_appear_in_any_output(hub, tmp_path, daemons):
    token = "hubtoken-6f1c2e0a9b"
    secret = "whsec_" + base64.b64encode(b"signing-secret-bytes-32-long!!!!").decode()
    hook_path = "/hook/T0SECRETPATH"
    hub_with_token = hub
    hub_with_token.token = token
    hub.add_fine_tune("acme", "bot", "ft_1")
    with Receiver(secret=secret) as receiver:
        url = receiver.url.replace("/hook", hook_path)
        receiver.script(Answer(status=503), Answer(status=410, body=f"gone {hook_path}"))
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[FT],
            watch={"failure_threshold": 1},
            log={"level": "debug", "format": "json"},
            notifiers=[
                {
                    "name": "ci",
                    "type": "webhook",
                    "url_env": "OW_TEST_HOOK_URL",
                    "secret_env": "OW_TEST_HOOK_SECRET",
                    "retry_schedule_s": [0, 0.2],
                }
            ],
        )
        data["hub"] = {**data["hub"], "token": None}
        data["hub"].pop("token")
        data["hub"]["token_env"] = "OW_TEST_HUB_TOKEN"
        config = write_config(tmp_path / "c.toml", data)
        env = {"OW_TEST_HUB_TOKEN": token, "OW_TEST_HOOK_URL": url, "OW_TEST_HOOK_SECRET": secret}
        daemon = daemons(config, env=env)
        hub.add_checkpoint(KEY, 1, loss=1.0)
        hub.inject(KEY, Fault(status=401), Fault(status=503, times=8), Fault(status=200, body=b"not json"))
        wait_for(lambda: any(e.get("event") == "notifier.disabled" for e in daemon.logs()), what="410")
        wait_for(lambda: any(e.get("event") == "hub.unauthorized" for e in daemon.logs()), what="401")
        wait_for(lambda: any(e.get("event") == "poll.failed" for e in daemon.logs()), what="failed poll")
        port = listen_port(daemon)
        metrics_text = scrape(port)
        assert daemon.terminate() == 0
        outputs = [daemon.output(), metrics_text]
        for args in (["status"], ["events"], ["events", "--json"], ["test-notify"], ["check-config"]):
            result = cli(*args, "-c", str(config), env=env)
            outputs += [result.stdout, result.stderr]
        everything = "\n".join(outputs)
        assert "hub.unauthorized" in everything and "HTTP 410" in everything
        for needle in (token, secret, secret.removeprefix("whsec_"), hook_path, url):
            assert needle not in everything, needle


async def test_healthz_turns_503_when_a_loop_dies(hub, tmp_path):
    from watcher.config.load import parse_config
    from watcher.daemon.app import App, resolve_all

    hub.add_fine_tune("acme", "bot", "ft_1")
    config = parse_config(base_config(hub, tmp_path, fine_tunes=[FT]), source="t.toml", directory=tmp_path)
    app = App(config, resolve_all(config))
    running = asyncio.create_task(app.run())
    try:
        async with httpx.AsyncClient() as client:

            async def status(path: str) -> int:
                return (await client.get(f"http://127.0.0.1:{app.server.port}{path}")).status_code

            deadline = asyncio.get_running_loop().time() + 20
            while app._dispatch_task is None or app.server.port == 0 or await status("/readyz") != 200:
                assert asyncio.get_running_loop().time() < deadline, "not ready in time"
                await asyncio.sleep(0.05)
            assert await status("/healthz") == 200
            app._dispatch_task.cancel()  # the dispatcher loop dies
            await asyncio.wait([app._dispatch_task])
            response = await client.get(f"http://127.0.0.1:{app.server.port}/healthz")
            assert response.status_code == 503
            assert response.json() == {"status": "unavailable", "reason": "dispatcher stopped"}
    finally:
        app.stop.set()
        await running


def test_sigterm_lets_an_in_flight_poll_finish_and_commit(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    data = base_config(hub, tmp_path, fine_tunes=[FT], watch={"interval_s": 1, "shutdown_grace_s": 10})
    config = write_config(tmp_path / "c.toml", data)
    daemon = daemons(config)
    wait_for(lambda: cli("status", "-c", str(config), "--json").stdout.count('"ok"'), what="baseline")
    hub.add_checkpoint(KEY, 1, loss=1.0)
    body = orjson.dumps({"checkpoints": hub.checkpoints(KEY)})
    served = len(hub.requests(KEY))
    hub.inject(KEY, Fault(status=200, body=body, delay_s=2))  # the next poll takes 2 s to answer
    wait_for(lambda: len(hub.requests(KEY)) > served, what="the slow poll to start")
    assert daemon.terminate() == 0
    (line,) = cli("events", "-c", str(config), "--json").stdout.splitlines()
    assert orjson.loads(line)["data"]["checkpoint"]["step"] == 1
    assert any(e.get("event") == "shutdown.draining" for e in daemon.logs())


class StartedApp:
    """The daemon (App) in-process against the simulated Hub, for tests that inject a fault at a boundary."""

    def __init__(self, app):
        self.app = app
        self.task = None
        self.client = httpx.AsyncClient()

    async def __aenter__(self):
        self.task = asyncio.create_task(self.app.run())
        deadline = asyncio.get_running_loop().time() + 20
        while not self.app.started or await self.status("/readyz") != 200:
            assert not self.task.done(), self.task
            assert asyncio.get_running_loop().time() < deadline, "not ready in time"
            await asyncio.sleep(0.05)
        return self

    async def status(self, path: str) -> int:
        if self.app.server.port == 0:
            return 0
        return (await self.client.get(f"http://127.0.0.1:{self.app.server.port}{path}")).status_code

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(f"http://127.0.0.1:{self.app.server.port}{path}")

    async def __aexit__(self, *exc):
        self.app.stop.set()
        await self.task
        await self.client.aclose()


def make_app(hub, tmp_path, **sections):
    from watcher.config.load import load_config
    from watcher.daemon.app import App, resolve_all

    path = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, **sections))
    config = load_config(str(path))
    return App(config, resolve_all(config), config_path=str(path)), path


async def test_counters_with_known_labels_start_at_0_and_removed_fine_tunes_series_go(hub, tmp_path):
    from watcher.core.models import EVENT_TYPES

    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_fine_tune("acme", "ghost", "ft_gone")
    app, path = make_app(
        hub, tmp_path, fine_tunes=[FT, MISSING], notifiers=[{"name": "audit", "type": "log", "format": "json"}]
    )
    async with StartedApp(app) as started:
        text = (await started.get("/metrics")).text
        for event_type in EVENT_TYPES:
            assert value(text, "oxen_watcher_events_total", type=event_type) == 0, event_type
        for outcome in ("delivered", "retried", "dead"):
            assert value(text, "oxen_watcher_deliveries_total", notifier="audit", outcome=outcome) == 0, outcome
        for fine_tune_id in ("ft_1", "ft_gone"):
            for outcome in ("ok", "not_found", "unauthorized", "error"):
                found = value(text, "oxen_watcher_polls_total", fine_tune_id=fine_tune_id, outcome=outcome)
                assert found is not None, (fine_tune_id, outcome)
        assert promtool_lint(text).returncode == 0
        # a reload removes a fine-tune and the notifier: their series go
        write_config(path, base_config(hub, tmp_path, fine_tunes=[FT], notifiers=[{"name": "next", "type": "log"}]))
        assert await app.reload()
        text = (await started.get("/metrics")).text
        assert [line for line in text.splitlines() if "ft_gone" in line] == []
        assert 'oxen_watcher_deliveries_total{notifier="audit"' not in text
        assert value(text, "oxen_watcher_deliveries_total", notifier="next", outcome="dead") == 0


async def test_a_reload_failing_half_way_leaves_the_old_config_fully_in_force(hub, tmp_path):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_fine_tune("acme", "bot", "ft_2")
    app, path = make_app(hub, tmp_path, fine_tunes=[FT], notifiers=[{"name": "audit", "type": "log"}])
    async with StartedApp(app):
        old = (app.config, app.watcher.client, dict(app.dispatcher.notifiers), set(app.watcher.fine_tunes))
        old_schedule = app.driver.schedule.keys()
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[FT, {"namespace": "acme", "repo": "bot", "id": "ft_2"}],
            notifiers=[{"name": "other", "type": "log"}],
            http={"listen": "127.0.0.1:0", "token": "new-metrics-token"},
        )
        data["hub"]["timeout_s"] = 7  # a new Hub client
        write_config(path, data)

        def broken_set_token(token):  # an injected fault at the HTTP server, after three steps were applied
            raise RuntimeError("set_token exploded")

        app.server.set_token = broken_set_token
        with structlog.testing.capture_logs() as logs:
            assert await app.reload() is False
        failed = [entry for entry in logs if entry["event"] == "reload.failed"]
        assert failed and failed[0]["log_level"] == "error" and failed[0].get("exc_info")
        assert "reload.applied" not in [entry["event"] for entry in logs]
        assert app.config is old[0] and app.watcher.client is old[1]
        assert app.dispatcher.notifiers == old[2] and list(app.dispatcher.configs) == ["audit"]
        assert set(app.watcher.fine_tunes) == old[3] == {KEY}
        assert app.driver.schedule.keys() == old_schedule
        assert app.watcher.config is old[0]


class DyingSystemd:
    """A systemd notifier that breaks on the watchdog ping: the ticker task dies."""

    watchdog_s = 0.2
    enabled = True

    def send(self, **fields):
        if "watchdog" in fields:
            raise RuntimeError("watchdog socket exploded")
        return True


async def test_a_dying_ticker_is_logged_with_its_traceback_and_turns_healthz_503(hub, tmp_path):
    from watcher.config.load import parse_config
    from watcher.daemon.app import App, resolve_all

    hub.add_fine_tune("acme", "bot", "ft_1")
    config = parse_config(base_config(hub, tmp_path, fine_tunes=[FT]), source="t.toml", directory=tmp_path)
    app = App(config, resolve_all(config), sd=DyingSystemd())
    with structlog.testing.capture_logs() as logs:
        running = asyncio.create_task(app.run())
        try:
            async with httpx.AsyncClient() as client:
                deadline = asyncio.get_running_loop().time() + 20
                while not any(entry["event"] == "task.died" for entry in logs):
                    assert asyncio.get_running_loop().time() < deadline, "the ticker did not die"
                    await asyncio.sleep(0.05)
                response = await client.get(f"http://127.0.0.1:{app.server.port}/healthz")
                assert response.status_code == 503
                assert "ticker stopped" in response.json()["reason"]
        finally:
            app.stop.set()
            await running
    (died,) = [entry for entry in logs if entry["event"] == "task.died"]
    assert died["task"] == "ticker" and isinstance(died["exc_info"], RuntimeError)


def test_hub_url_credentials_never_reach_a_log_line():
    from watcher.daemon.app import Secrets, public_url
    from watcher.observe.logs import SecretRedactor

    url = "https://alice:pa55word-s3cret@hub.example.com:8443"
    secrets = Secrets(hub_token="tok-123456", notifiers={}, metrics_token=None, hub_url=url)
    redactor = SecretRedactor(secrets.values())
    line = redactor({}, "error", {"event": "poll.failed", "error": f"GET {url}/api/repos failed", "hub": url})
    assert "pa55word-s3cret" not in repr(line) and "alice:" not in repr(line)
    assert public_url(url + "/api") == "https://hub.example.com:8443/api"
    assert public_url("https://hub.oxen.ai") == "https://hub.oxen.ai"


# --- SIGTERM at any moment of a start: exit 0, never killed by the default action ----------------------------


def _takes_sigterm(pid: int) -> bool:
    """The process has a handler for SIGTERM (bit 15 of SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _mapped(pid: int, library: str) -> bool:
    """A shared library whose path contains `library` is loaded (an import is under way)."""
    return library in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("entry", ["python -m watcher", "oxen-watcher"])
def test_sigterm_right_after_a_start_exits_0(hub, tmp_path, entry):
    hub.add_fine_tune("acme", "bot", "ft_1")
    command = [sys.executable, "-m", "watcher"] if entry == "python -m watcher" else [str(SCRIPT)]
    # the moments of a start, earliest first: the first one a program can take a signal at (its handler is in),
    # the command line's imports under way (orjson is loaded half way through them), the first line of output,
    # the state database created
    moments = {
        "handler installed": lambda proc, out, db: _takes_sigterm(proc.pid),
        "importing": lambda proc, out, db: _mapped(proc.pid, "orjson"),
        "first output": lambda proc, out, db: out.stat().st_size > 0,
        "database created": lambda proc, out, db: db.exists(),
    }
    codes = {}
    for name, reached in moments.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        data = base_config(hub, folder, fine_tunes=[FT])
        db = Path(data["state"]["path"])
        config = write_config(folder / "c.toml", data)
        out = folder / "out.log"
        with out.open("wb") as sink:
            proc = subprocess.Popen([*command, "run", "-c", str(config)], stdout=sink, stderr=sink, cwd=ROOT)
        try:
            wait_for(lambda: proc.poll() is not None or reached(proc, out, db), interval=0.001, what=name)
            proc.send_signal(signal.SIGTERM)
            codes[name] = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert "Traceback" not in out.read_text(errors="replace"), (name, out.read_text(errors="replace"))
    assert codes == dict.fromkeys(moments, 0), codes
