"""The status page: pages and JSON API rendered from a store with known data, served by the real listener.

Every test that reads a database runs on SQLite and on PostgreSQL (a throwaway cluster, tests/pgcluster.py).
"""

from __future__ import annotations

import base64
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from pg_roles import least_privilege_database
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from watcher.config.load import parse_config
from watcher.core.diff import DiffOptions
from watcher.core.events import rfc3339
from watcher.core.health import PollHealth, Verdict
from watcher.core.lifecycle import LifecycleOptions
from watcher.core.models import FineTuneRef, HubFineTune, PollFailed, PollSuccess
from watcher.daemon.app import App, resolve_all
from watcher.observe.server import HttpServer
from watcher.store import SqliteReports, SqliteStore, Store
from watcher.store.pages import Reports, RunSummary
from watcher.store.postgres.base import open_pool
from watcher.store.postgres.leases import PostgresLeases
from watcher.store.postgres.pages import PostgresReports
from watcher.store.postgres.store import PostgresStore
from watcher.web.charts import ema, fmt, loss_chart, robust_range
from watcher.web.security import CSP
from watcher.web.site import StatusPages
from watcher.web.views import LiveSnapshot, Row, build_rows, parse_page, parse_sort

XSS = "<script>alert(1)</script>"
HUB_ERROR = 'HTTP 502: <img src=x onerror="alert(2)">'
NOW = 1_780_000_000.0
GOOD = FineTuneRef("acme", "models", "ft-good", "good run")
EVIL = FineTuneRef("acme", "models", "ft-xss", XSS)
BROKEN = FineTuneRef("acme", "models", "ft-broken", "broken run")
LOSSES = [2.5, 1.9, 1.4, 1.1, 0.9, 0.8, 9.5, 0.72, 0.68, 0.7]  # a spike at step 700, the best at step 900
STEPS = [100 * (i + 1) for i in range(len(LOSSES))]


def checkpoint(step: int, loss: float, **extra: Any) -> dict[str, Any]:
    """A checkpoint as the Hub sends it."""
    return {
        "step": step,
        "created_at": "2026-05-28T20:00:00Z",
        "deployment_status": extra.pop("deployment_status", None),
        "size_bytes": 1_500_000_000,
        "inference_samples": [{"prompt": "2+2?", "completion": f"</pre>{XSS} step {step}", "tokens": 7}],
        "metrics": {
            "loss": loss,
            "mean_token_accuracy": round(1 - loss / 10, 4),
            "learning_rate": 2e-5,
            "grad_norm": 1.5,
            **extra,
        },
    }


class Backend:
    """A state database of one kind: stores that write it, reports that read it, the config's [state] for it."""

    def __init__(self, kind: str, *, path: Path | None = None, url: str | None = None) -> None:
        self.kind = kind
        self.path = path
        self.url = url
        self.filled = False

    def store(self) -> Store:
        """A store writing the database, as the daemon's."""
        if self.url is not None:
            return PostgresStore(self.url)
        assert self.path is not None
        return SqliteStore(self.path)

    def reports(self) -> Reports:
        """The status page's reads of the database."""
        if self.url is not None:
            return PostgresReports(open_pool(self.url, max_size=2), owns_pool=True)
        assert self.path is not None
        return SqliteReports(self.path)

    def state(self) -> dict[str, Any]:
        """The config's [state] section."""
        return {"url": self.url} if self.url is not None else {"path": str(self.path)}

    @contextmanager
    def writing(self, key: str) -> Iterator[None]:
        """A poll's transaction on a fine-tune's row, in the middle of its commit (held, then rolled back)."""
        if self.url is not None:
            with psycopg.connect(self.url) as conn:  # not autocommit: the UPDATE opens a transaction
                conn.execute("UPDATE fine_tunes SET last_error = 'uncommitted' WHERE fine_tune_key = %s", (key,))
                yield
                conn.rollback()
            return
        assert self.path is not None
        writer = SqliteStore(self.path, busy_timeout_s=0.1)
        try:
            writer._db.execute("BEGIN IMMEDIATE")
            writer._db.execute("UPDATE fine_tunes SET last_error = 'uncommitted' WHERE fine_tune_key = ?", (key,))
            yield
            writer._db.execute("ROLLBACK")
        finally:
            writer.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """An empty state database, SQLite or PostgreSQL."""
    if request.param == "postgresql":
        return Backend("postgresql", url=request.getfixturevalue("pg_url"))
    return Backend("sqlite", path=tmp_path / "watcher.db")


def fill(backend: Backend) -> None:
    """Known state: a good run with a loss spike, an XSS-named run, and a run whose polls fail."""
    backend.filled = True
    store = backend.store()
    options = DiffOptions(baseline=False, failure_threshold=2)
    route = lambda event: ["hook"]
    good = tuple(
        checkpoint(step, loss, deployment_status="ACTIVE" if step == STEPS[-1] else None)
        for step, loss in zip(STEPS, LOSSES)
    )
    store.apply_poll(GOOD, PollSuccess(good, "h-good"), options=options, now=NOW - 60, route=route)
    store.apply_poll(EVIL, PollSuccess((checkpoint(50, 3.25),), "h-xss"), options=options, now=NOW - 50, route=route)
    for at in (NOW - 40, NOW - 30):
        store.apply_poll(BROKEN, PollFailed(HUB_ERROR, 502), options=options, now=at, route=route)
    store.close()


def snapshot_of(**overrides: Any) -> Callable[[], LiveSnapshot]:
    """A live snapshot of the three watched fine-tunes."""

    def snapshot() -> LiveSnapshot:
        values: dict[str, Any] = {
            "refs": (GOOD, EVIL, BROKEN),
            "health": {
                BROKEN.key: PollHealth(polls=2, last_outcome="error", last_error=HUB_ERROR, last_poll_at=NOW - 30)
            },
            "notifiers": ("hook",),
            "disabled": frozenset(),
            "alive": Verdict(True),
            "ready": Verdict(True),
            "now": NOW,
        }
        values.update(overrides)
        return LiveSnapshot(**values)

    return snapshot


class Site:
    """The listener serving the status page, and a client for it."""

    def __init__(self, server: HttpServer, client: httpx.AsyncClient) -> None:
        self.server = server
        self.client = client

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """GET a path."""
        return await self.client.get(path, **kwargs)

    async def html(self, path: str) -> str:
        """GET a page: 200 and its text."""
        response = await self.get(path)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        return response.text


async def serve(
    backend: Backend, *, token: str | None = None, snapshot: Callable[[], LiveSnapshot] | None = None
) -> tuple[HttpServer, Reports]:
    """The real listener with the status page over a database with known data."""
    if not backend.filled:
        fill(backend)
    reports = backend.reports()
    server = HttpServer(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        liveness=lambda: Verdict(True),
        readiness=lambda: Verdict(True),
        token=token,
        pages=StatusPages(reports=reports, snapshot=snapshot or snapshot_of()),
    )
    await server.start()
    return server, reports


@pytest.fixture
async def site(backend: Backend) -> AsyncIterator[Site]:
    server, _ = await serve(backend)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        yield Site(server, client)
    await server.stop()


def text_of(fragment: str) -> str:
    """The visible text of an HTML fragment."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def cells(html: str, key: str) -> list[str]:
    """The text of the cells of the overview row of one fine-tune."""
    row = re.search(rf'<tr[^>]*data-key="{re.escape(key)}">(.*?)</tr>', html, re.S)
    assert row is not None, key
    return [text_of(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)]


# --- chart arithmetic --------------------------------------------------------------------------------


def test_ema_is_debiased_as_tensorboard_draws_it() -> None:
    # by hand, weight 0.6: 0.4/0.4 = 1; (0.24 + 0.8)/0.64 = 1.625; (0.624 + 1.2)/0.784
    assert ema([1.0, 2.0, 3.0]) == pytest.approx([1.0, 1.625, 1.824 / 0.784])
    assert ema([5.0]) == [pytest.approx(5.0)]  # no pull towards zero at the start


def test_the_y_range_resists_an_outlier_and_no_point_is_hidden() -> None:
    low, high = robust_range(LOSSES)
    assert high < 9.5 and low == min(LOSSES)
    chart = loss_chart(list(zip(STEPS, LOSSES)))
    assert chart.clipped == 1
    drawn = chart.svg.count('class="raw"') + chart.svg.count('class="clipped"')
    assert drawn == len(LOSSES)
    assert "step 700: loss 9.5, off the chart" in chart.svg
    assert chart.title == "loss, best 0.68 at step 900"


def test_a_log_scale_clips_non_positive_losses_to_the_edge() -> None:
    chart = loss_chart([(1, 2.0), (2, 0.0), (3, 0.5)], log=True)
    assert chart.clipped == 1 and "on a log scale" in chart.desc


# --- pages ---------------------------------------------------------------------------------------------


async def test_overview_shows_latest_best_and_failing_first(site: Site) -> None:
    html = await site.html("/")
    keys = re.findall(r'data-key="([^"]+)"', html)
    assert keys[0] == BROKEN.key  # failing first by default
    good = cells(html, GOOD.key)
    assert good[3] == "1,000"  # latest step
    assert good[4] == fmt(LOSSES[-1]) == "0.7"  # latest loss
    assert good[5] == "0.68 @ 900"  # best loss and its step
    assert good[7] == "ACTIVE"  # deployment of the latest checkpoint
    broken = cells(html, BROKEN.key)
    assert broken[0] == "failing" and HUB_ERROR in broken[8]
    assert "1 failing" in html


async def test_overview_escapes_names_and_hub_errors(site: Site) -> None:
    html = await site.html("/")
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=" in html


async def test_overview_sorts_through_links(site: Site) -> None:
    html = await site.html("/?sort=loss")
    assert re.findall(r'data-key="([^"]+)"', html) == [GOOD.key, EVIL.key, BROKEN.key]  # unknown loss last
    assert 'href="/?sort=-loss"' in html  # the current column's link reverses it
    html = await site.html("/?sort=-loss")
    assert re.findall(r'data-key="([^"]+)"', html) == [EVIL.key, GOOD.key, BROKEN.key]
    html = await site.html("/?sort=name")
    assert re.findall(r'data-key="([^"]+)"', html) == [EVIL.key, BROKEN.key, GOOD.key]


async def test_overview_pages_through_many_fine_tunes(backend: Backend) -> None:
    refs = tuple(FineTuneRef("acme", "many", f"ft-{i:04d}", f"run {i:04d}") for i in range(250))
    server, _ = await serve(backend, snapshot=snapshot_of(refs=refs, health={}))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            page2 = (await client.get("/?sort=name&page=2")).text
            keys = re.findall(r'data-key="([^"]+)"', page2)
            assert len(keys) == 100 and keys[0] == "acme/many/ft-0100" and "page 2 of 3" in page2
            last = (await client.get("/?sort=name&page=99")).text  # clamped to the last page
            assert len(re.findall(r'data-key="', last)) == 50
    finally:
        await server.stop()


async def test_run_page_charts_state_their_numbers(site: Site) -> None:
    html = await site.html("/fine-tunes/acme/models/ft-good")
    smoothed = ema(LOSSES)
    assert '<title id="loss-chart-title">loss, best 0.68 at step 900</title>' in html
    desc = unescape(re.search(r'<desc id="loss-chart-desc">(.*?)</desc>', html, re.S).group(1))  # type: ignore[union-attr]
    assert f"latest {fmt(LOSSES[-1])} at step 1,000" in desc
    assert f"smoothed (exponential moving average, weight 0.6) {fmt(smoothed[-1])}" in desc
    assert "1 point outside the y-range" in desc
    for name in ("mean token accuracy", "learning rate", "grad norm"):
        assert f"{name}, latest" in html
    # the data table beside the chart: step, loss, smoothed
    assert f'<td class="num">700</td><td class="num">9.5</td><td class="num">{fmt(smoothed[6])}</td>' in html
    # the checkpoint table: newest first, every metric, deployment, size
    table = html[html.index('id="checkpoints"') :]
    assert table.index(">1,000<") < table.index(">100<")
    assert "ACTIVE" in table and "1.5 GB" in table and "mean_token_accuracy" in table
    assert 'href="/fine-tunes/acme/models/ft-good?scale=log"' in html
    # the newest checkpoint's inference samples, as text
    samples = html[html.index('id="samples"') :]
    assert "step 1,000)" in samples and "<dt>completion</dt>" in samples and "<dd><pre>7</pre></dd>" in samples
    assert f"&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt; step {STEPS[-1]}" in samples
    assert XSS not in html


async def test_run_page_log_toggle(site: Site) -> None:
    html = await site.html("/fine-tunes/acme/models/ft-good?scale=log")
    assert "on a log scale" in html
    assert 'href="/fine-tunes/acme/models/ft-good?scale=linear"' in html


async def test_run_page_escapes_and_shows_poll_health(site: Site) -> None:
    html = await site.html("/fine-tunes/acme/models/ft-xss")
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    html = await site.html("/fine-tunes/acme/models/ft-broken")
    assert "&lt;img src=x" in html and "<img src=x" not in html
    assert re.search(r'<dd class="error" id="last-error">HTTP 502: &lt;img', html)
    assert "fine_tune.poll_failing" in html  # its recent events


async def test_unknown_fine_tune_is_404(site: Site) -> None:
    response = await site.get("/fine-tunes/acme/models/nope")
    assert response.status_code == 404 and response.headers["Content-Security-Policy"] == CSP
    assert (await site.get("/api/v1/fine-tunes/acme/models/nope/checkpoints")).status_code == 404


async def test_events_page_filters_and_shows_deliveries(site: Site) -> None:
    html = await site.html("/events")
    assert "checkpoint.created" in html and "fine_tune.poll_failing" in html
    assert "hook: pending" in html
    html = await site.html("/events?type=fine_tune.poll_failing")
    assert re.findall(r'<td><a href="/events\?type=([^"]+)">', html) == ["fine_tune.poll_failing"]
    html = await site.html(f"/events?fine_tune={GOOD.key}")
    rows = re.findall(r'<td><a href="/events\?type=([^"]+)">', html)
    assert rows and set(rows) == {"checkpoint.created"}


# --- the JSON API ---------------------------------------------------------------------------------------


async def test_api_fine_tunes(site: Site) -> None:
    document = (await site.get("/api/v1/fine-tunes")).json()
    assert document["total"] == 3 and document["sort"] == "failing"
    first = document["fine_tunes"][0]
    assert first["fine_tune"]["id"] == "ft-broken" and first["failing"] is True and first["last_error"] == HUB_ERROR
    good = next(entry for entry in document["fine_tunes"] if entry["fine_tune"]["id"] == "ft-good")
    assert (good["latest_step"], good["latest_loss"], good["best_loss"], good["best_step"]) == (1000, 0.7, 0.68, 900)
    assert good["latest_deployment_status"] == "ACTIVE"
    assert document["delivery"] == [
        {"notifier": "hook", "pending": 12, "oldest_pending_age_s": 60.0, "dead": 0, "disabled": False}
    ]
    assert document["watcher"]["alive"] is True
    paged = (await site.get("/api/v1/fine-tunes?sort=name&per_page=2")).json()
    names = [entry["fine_tune"]["name"] for entry in paged["fine_tunes"]]
    assert names == [XSS, "broken run"]


async def test_api_checkpoints(site: Site) -> None:
    document = (await site.get("/api/v1/fine-tunes/acme/models/ft-good/checkpoints")).json()
    assert [c["step"] for c in document["checkpoints"]] == STEPS
    assert [c["metrics"]["loss"] for c in document["checkpoints"]] == LOSSES
    assert [c["loss_smoothed"] for c in document["checkpoints"]] == pytest.approx(ema(LOSSES))
    assert all("inference_samples" not in c for c in document["checkpoints"])


async def test_receiver_errors_are_escaped(site: Site, backend: Backend) -> None:
    store = backend.store()
    (event,) = store.recent_events(limit=1, type_glob="fine_tune.poll_failing")
    store.record_delivery("hook", [event.id], state="dead", now=NOW, error=f"HTTP 500: {XSS}", http_status=500)
    store.close()
    html = await site.html("/events")
    assert "hook: dead" in html and "HTTP 500: &lt;script&gt;" in html and XSS not in html
    assert (await site.get("/api/v1/fine-tunes")).json()["delivery"][0]["dead"] == 1


async def test_api_events(site: Site) -> None:
    document = (await site.get("/api/v1/events?limit=5")).json()
    assert len(document["events"]) == 5
    newest = document["events"][0]
    assert newest["type"] == "fine_tune.poll_failing" and newest["data"]["error"] == HUB_ERROR
    assert newest["deliveries"][0]["notifier"] == "hook" and newest["deliveries"][0]["state"] == "pending"
    only = (await site.get(f"/api/v1/events?fine_tune={EVIL.key}")).json()["events"]
    assert [e["type"] for e in only] == ["checkpoint.created"]


# --- guards -------------------------------------------------------------------------------------------------


PATHS = [
    "/",
    "/events",
    "/fine-tunes/acme/models/ft-good",
    "/api/v1/fine-tunes",
    "/api/v1/fine-tunes/acme/models/ft-good/checkpoints",
    "/api/v1/events",
    "/static/status.css",
]


async def test_security_headers_on_every_page(site: Site) -> None:
    for path in [*PATHS, "/fine-tunes/x/y/z"]:
        response = await site.get(path)
        assert response.headers["Content-Security-Policy"] == CSP, path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"] == "no-referrer", path
    html = await site.html("/")
    assert "style=" not in html and "<style" not in html and "<script" not in html


async def test_only_get_and_head(site: Site) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = await site.client.request(method, "/api/v1/fine-tunes")
        assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"
        assert response.headers["Content-Security-Policy"] == CSP
    head = await site.client.head("/")
    assert head.status_code == 200 and head.content == b""


async def test_host_must_name_the_listener(site: Site) -> None:
    port = site.server.port
    for host in (f"127.0.0.1:{port}", "localhost", "localhost:8080", "[::1]:1", "LOCALHOST:5"):
        assert (await site.get("/", headers={"Host": host})).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.2:{port}", "127.0.0.1.evil.example"):
        response = await site.get("/", headers={"Host": host})
        assert response.status_code == 421, host
        assert response.headers["Content-Security-Policy"] == CSP
    assert (await site.get("/", headers={"Host": "a b"})).status_code == 400
    assert (await site.get("/metrics", headers={"Host": "evil.example"})).status_code == 200  # scrapes untouched


async def test_token_as_bearer_or_basic_password(tmp_path: Path) -> None:
    server, _ = await serve(Backend("sqlite", path=tmp_path / "watcher.db"), token="s3cret-token")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            for path in PATHS:
                refused = await client.get(path)
                assert refused.status_code == 401, path
                assert refused.headers["WWW-Authenticate"].startswith("Basic ")
                assert refused.headers["Content-Security-Policy"] == CSP
            bearer = {"Authorization": "Bearer s3cret-token"}
            assert (await client.get("/", headers=bearer)).status_code == 200
            assert (await client.get("/", auth=("anyone", "s3cret-token"))).status_code == 200
            assert (await client.get("/api/v1/events", auth=("", "s3cret-token"))).status_code == 200
            assert (await client.get("/", auth=("s3cret-token", "wrong"))).status_code == 401
            bad = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
            assert (await client.get("/", headers=bad)).status_code == 401
            assert (await client.get("/", headers={"Authorization": "Basic !!!"})).status_code == 401
            server.set_token("rotated")  # a reload changes it for the pages too
            assert (await client.get("/", auth=("u", "s3cret-token"))).status_code == 401
            assert (await client.get("/", auth=("u", "rotated"))).status_code == 200
            # /metrics checks the same token the same way, but as a bearer token only (what a scraper sends)
            assert (await client.get("/metrics", headers={"Authorization": "Bearer rotated"})).status_code == 200
            scrape = await client.get("/metrics", auth=("u", "rotated"))
            assert (scrape.status_code, scrape.headers["WWW-Authenticate"]) == (401, "Bearer")
    finally:
        await server.stop()


async def test_pages_read_while_a_poll_holds_the_write_lock(backend: Backend) -> None:
    server, _ = await serve(backend)
    try:
        with backend.writing(GOOD.key):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
                started = time.monotonic()
                response = await client.get("/")
                assert response.status_code == 200 and "uncommitted" not in response.text
                assert GOOD.name in response.text  # the committed state, not an empty page
                # a read that waited for the lock would take the readers' 5 s busy timeout (SQLite) or until the
                # client's 5 s timeout (PostgreSQL): the bound sits just below, far above a page's render time
                assert time.monotonic() - started < 4.5
    finally:
        await server.stop()


async def test_no_database_yet_renders_empty_pages(tmp_path: Path) -> None:
    reports = SqliteReports(tmp_path / "absent.db")
    assert reports.summaries([GOOD.key]) == {} and reports.events() == [] and reports.checkpoints(GOOD.key) == []
    assert [h.pending for h in reports.delivery_health(["hook"])] == [0]


def test_the_sparkline_has_at_most_40_points(backend: Backend) -> None:
    store = backend.store()
    many = tuple(checkpoint(step, 1 / step) for step in range(1, 501))
    store.apply_poll(GOOD, PollSuccess(many, "h"), options=DiffOptions(), now=NOW)
    store.close()
    reports = backend.reports()
    summary = reports.summaries([GOOD.key])[GOOD.key]
    reports.close()
    assert len(summary.spark) == 40 and summary.spark[0][0] == 1 and summary.spark[-1][0] == 500
    assert summary.best_loss == pytest.approx(1 / 500) and summary.best_step == 500
    assert not math.isnan(summary.latest_loss or math.nan)


async def test_the_daemon_serves_its_state_and_no_secret(backend: Backend) -> None:
    fill(backend)
    secrets = {"hub": "hub-token-123456", "http": "http-token-654321", "url": "/services/T000/B000/secretpath"}
    if backend.url is not None:
        secrets["state"] = backend.url
    config = parse_config(
        {
            "hub": {"url": "http://127.0.0.1:9", "token": secrets["hub"]},
            "state": backend.state(),
            "http": {"listen": "127.0.0.1:0", "token": secrets["http"]},
            "notifiers": [
                {"name": "team-slack", "type": "slack", "url": f"https://hooks.slack.com{secrets['url']}"},
            ],
            "fine_tunes": [r.as_data() for r in (GOOD, EVIL)],
        }
    )
    app = App(config, resolve_all(config))
    await app.server.start()
    try:
        auth = ("me", secrets["http"])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.server.port}", auth=auth) as client:
            bodies = [(await client.get(p)).text for p in PATHS]
            # persisted state, joined with the config; on PostgreSQL this replica owns nothing yet (no lease
            # round ran), and still shows every configured fine-tune from the shared database
            assert cells(bodies[0], GOOD.key)[5] == "0.68 @ 900"
            assert '<title id="loss-chart-title">loss, best 0.68 at step 900</title>' in bodies[2]
            losses = [c["metrics"]["loss"] for c in orjson.loads(bodies[4])["checkpoints"]]
            assert losses == LOSSES
            assert BROKEN.key not in bodies[0]  # not watched: not listed
            assert "team-slack" in bodies[0] and "not alive" in bodies[0]  # never started: the header says so
            for body in bodies:
                assert not any(secret in body for secret in secrets.values())
                assert "hooks.slack.com" not in body
    finally:
        await app.server.stop()
        await app.watcher.aclose()
        await app.dispatcher.aclose()


def test_stalled_and_failing_badges_from_state_and_live_health() -> None:
    def row_of(summary: RunSummary, poll: PollHealth | None = None) -> Row:
        live = snapshot_of(refs=(GOOD,), health={GOOD.key: poll} if poll else {})()
        (row,) = build_rows(live, {GOOD.key: summary})
        return row

    three_hours_ago = rfc3339(NOW - 3 * 3600)
    stalled = row_of(RunSummary(GOOD.key, last_outcome="ok", latest_created_at=three_hours_ago))
    assert stalled.stalled and not stalled.failing
    finished = row_of(RunSummary(GOOD.key, last_outcome="ok", latest_created_at=rfc3339(NOW - 2 * 86400)))
    assert not finished.stalled  # older than a day: taken as a finished run, as the alert does
    fresh = row_of(RunSummary(GOOD.key, last_outcome="ok", latest_created_at=rfc3339(NOW - 600)))
    assert not fresh.stalled
    # this process's last poll failed: failing, whatever the database said when it was last written
    live_failure = row_of(
        RunSummary(GOOD.key, last_outcome="ok", latest_created_at=three_hours_ago),
        PollHealth(polls=1, last_outcome="error", last_error="timeout", last_poll_at=NOW, failing_since=NOW),
    )
    assert live_failure.failing and not live_failure.stalled and live_failure.last_error == "timeout"
    assert row_of(RunSummary(GOOD.key, failing=True, last_outcome="error")).failing
    assert row_of(RunSummary(GOOD.key, not_found=True, last_outcome="not_found")).not_found


def test_the_stalled_badge_is_for_running_runs_only() -> None:
    def stalled(hub_status: str | None) -> bool:
        live = snapshot_of(refs=(GOOD,), health={})()
        summary = RunSummary(
            GOOD.key, last_outcome="ok", latest_created_at=rfc3339(NOW - 3 * 3600), hub_status=hub_status
        )
        (row,) = build_rows(live, {GOOD.key: summary})
        return row.stalled

    # the last known Hub status is running, or was never read (a configured fine-tune, a listed one not yet read)
    assert stalled("running") and stalled("RUNNING") and stalled(None)
    # finished runs with old checkpoints are not stalled, as OxenFineTuneTrainingStalled says
    assert not any(stalled(status) for status in ("completed", "stopped", "errored", "queued"))


def test_bad_sort_and_page_values_fall_back() -> None:
    assert parse_sort("'; DROP TABLE") == ("failing", False)
    assert parse_sort("-best") == ("best", True)
    assert parse_page("-3") == 1 and parse_page("x") == 1 and parse_page("7") == 7


def test_hub_status_comes_from_the_lifecycle_and_summaries_follow_new_commits(backend: Backend) -> None:
    fill(backend)
    store = backend.store()
    reports = backend.reports()
    try:
        options = LifecycleOptions(stall_after_s=3600)
        store.apply_lifecycle(GOOD, HubFineTune(GOOD.id, name=GOOD.name, status="running"), options=options, now=NOW)
        found = reports.summaries([GOOD.key, EVIL.key, BROKEN.key, "acme/models/never-polled"])
        assert sorted(found) == sorted([GOOD.key, EVIL.key, BROKEN.key])  # never polled: absent
        assert (found[GOOD.key].hub_status, found[EVIL.key].hub_status) == ("running", None)
        assert found[GOOD.key].replica is None  # no leases (SQLite), or none claimed yet
        if isinstance(store, PostgresStore):  # a replica's lease: the page says which replica polls it
            leases = PostgresLeases(store.pool, replica="host-a-1", lease_s=30)
            leases.heartbeat()
            assert [lease.key for lease in leases.claim([GOOD.key]).acquired] == [GOOD.key]
            assert reports.summaries([GOOD.key])[GOOD.key].replica == "host-a-1"
        assert found[GOOD.key].spark[-1] == (STEPS[-1], LOSSES[-1]) and found[EVIL.key].latest_loss == 3.25
        # the run page asks for one fine-tune; a commit then moves only that one's revision on
        assert list(reports.summaries([EVIL.key])) == [EVIL.key]
        newer = (*(checkpoint(s, v) for s, v in zip(STEPS, LOSSES)), checkpoint(1100, 0.5))
        store.apply_poll(GOOD, PollSuccess(newer, "h-good-2"), options=DiffOptions(baseline=False), now=NOW)
        again = reports.summaries([GOOD.key, EVIL.key])
        assert (again[GOOD.key].latest_step, again[GOOD.key].best_loss, again[GOOD.key].best_step) == (1100, 0.5, 1100)
        assert again[EVIL.key] == found[EVIL.key]
    finally:
        reports.close()
        store.close()


async def test_the_replicas_role_reads_every_page(pg_cluster: Any) -> None:
    # README's least-privilege role (its GRANTs read from the README) serves every page
    with least_privilege_database(pg_cluster) as (_, replica_url):
        backend = Backend("postgresql", url=replica_url)
        server, _ = await serve(backend)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                for path in PATHS:
                    response = await client.get(path)
                    assert response.status_code == 200, (path, response.text)
                overview = (await client.get("/")).text
                assert cells(overview, GOOD.key)[5] == "0.68 @ 900" and "1 failing" in overview
        finally:
            await server.stop()


async def test_a_lost_database_answers_503_and_names_no_part_of_its_url(pg_cluster: Any) -> None:
    name = "pages_lost_database"
    url = pg_cluster.create_database(name)
    backend = Backend("postgresql", url=url)
    fill(backend)
    reports = PostgresReports(open_pool(url, max_size=1, timeout_s=1), owns_pool=True)
    server = HttpServer(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        liveness=lambda: Verdict(True),
        readiness=lambda: Verdict(True),
        pages=StatusPages(reports=reports, snapshot=snapshot_of()),
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            assert (await client.get("/")).status_code == 200
            pg_cluster.drop_database(name)  # its connections are cut, and it cannot be reconnected to
            with capture_logs() as logs:
                page = await client.get("/")
                api = await client.get("/api/v1/fine-tunes")
        assert page.status_code == 503 and "cannot be read right now" in page.text
        assert api.status_code == 503 and api.json() == {"error": "the state database cannot be read right now"}
        (failed, *_) = [entry for entry in logs if entry["event"] == "pages.store_failed"]
        assert "unreachable" in failed["error"]
        for text in (page.text, api.text, str(logs)):
            assert url not in text and name not in text and pg_cluster.url() not in text
    finally:
        await server.stop()
        pg_cluster.drop_database(name)
