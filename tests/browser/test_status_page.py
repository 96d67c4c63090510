"""The status page in a real browser: Debian's Chromium driven by Playwright, against the real daemon watching
the simulated Hub. Screenshots of each page go to test-artifacts/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, TOKEN, Daemon, base_config, wait_for, write_config
from pgcluster import PgCluster
from playwright.sync_api import Browser, ConsoleMessage, Page, Response, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from watcher.testing.simhub import Fault, SimHub

ARTIFACTS = ROOT / "test-artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TOKEN = "page-token-0123456789"
XSS = "<script>alert(1)</script>"
MAIN = {"namespace": "acme", "repo": "chat", "id": "ft_llama", "name": "llama-sft"}
LORA = {"namespace": "acme", "repo": "chat", "id": "ft_gemma", "name": "gemma-lora"}
EVIL = {"namespace": "acme", "repo": "chat", "id": "ft_xss", "name": XSS}
FAILING = {"namespace": "acme", "repo": "chat", "id": "ft_flaky", "name": "flaky-run"}
GHOST = {"namespace": "acme", "repo": "chat", "id": "ft_ghost", "name": "ghost-run"}
# a spike at step 700 (drawn at the edge), the best 0.41 at step 1,100
MAIN_LOSSES = [2.9, 2.2, 1.7, 1.3, 1.05, 0.86, 7.5, 0.62, 0.52, 0.46, 0.41, 0.43]
CSP_PROBE = """
window.__csp = [];
document.addEventListener(
  'securitypolicyviolation', (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


def chromium_path() -> str:
    """Debian's Chromium (`make test` installs it); the suite fails rather than skips without it."""
    for candidate in (os.environ.get("OXEN_WATCHER_CHROMIUM"), "chromium", "chromium-headless-shell"):
        if candidate and (found := shutil.which(candidate)):
            return found
    pytest.fail("no Chromium: run `make tools` (apt-get install chromium)")


def key_of(fine_tune: dict[str, str]) -> str:
    """namespace/repo/id."""
    return f"{fine_tune['namespace']}/{fine_tune['repo']}/{fine_tune['id']}"


@contextmanager
def serving(tmp_path: Path, state: dict[str, Any] | None = None) -> Iterator[str]:
    """The real daemon watching the simulated Hub, with known runs; yields the status page's base URL."""
    with SimHub(token=TOKEN) as hub:
        main = hub.add_fine_tune(MAIN["namespace"], MAIN["repo"], MAIN["id"])
        for i, loss in enumerate(MAIN_LOSSES):
            hub.add_checkpoint(main, 100 * (i + 1), loss=loss, metrics={"learning_rate": 2e-5 * (1 - i / 12)})
        lora = hub.add_fine_tune(LORA["namespace"], LORA["repo"], LORA["id"])
        for i, loss in enumerate([3.1, 2.4, 2.0, 1.8, 1.7]):
            hub.add_checkpoint(lora, 50 * (i + 1), loss=loss)
        evil = hub.add_fine_tune(EVIL["namespace"], EVIL["repo"], EVIL["id"])
        hub.add_checkpoint(evil, 10, loss=1.0)
        flaky = hub.add_fine_tune(FAILING["namespace"], FAILING["repo"], FAILING["id"])
        hub.inject(flaky, Fault(status=500, body=b'{"error": "<b>boom</b>"}', times=None))
        config = base_config(
            hub,
            tmp_path,
            http={"listen": "127.0.0.1:0", "token": PAGE_TOKEN},
            notifiers=[{"name": "console", "type": "log"}],
            fine_tunes=[MAIN, LORA, EVIL, FAILING, GHOST],
        )
        if state is not None:
            config["state"] = state
        daemon = Daemon(write_config(tmp_path / "config.toml", config)).start()
        try:
            started = wait_for(lambda: [e for e in daemon.logs() if e.get("event") == "watcher.started"], what="start")
            base = f"http://127.0.0.1:{started[-1]['listen'].rsplit(':', 1)[1]}"
            auth = {"Authorization": f"Bearer {PAGE_TOKEN}"}
            wait_for(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, what="every run polled")
            # after the silent baseline: a new checkpoint and a deployment make events and deliveries
            hub.add_checkpoint(lora, 300, loss=1.65)
            hub.set_deployment_status(main, 1100, "ACTIVE")

            def delivered() -> bool:
                events = httpx.get(f"{base}/api/v1/events", headers=auth, timeout=5).json()["events"]
                states = [d["state"] for e in events for d in e["deliveries"]]
                return len(events) >= 2 and states.count("delivered") >= 2

            wait_for(delivered, what="events delivered")
            yield base
        finally:
            assert daemon.terminate() == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The status page of a daemon on SQLite."""
    with serving(tmp_path_factory.mktemp("browser")) as base:
        yield base


@pytest.fixture(scope="module")
def served_on_postgresql(tmp_path_factory: pytest.TempPathFactory, pg_cluster: PgCluster) -> Iterator[str]:
    """The status page of a replica on PostgreSQL (the only one: it owns every fine-tune after its first round)."""
    name = f"browser_{os.getpid()}"
    url = pg_cluster.create_database(name)
    try:
        with serving(tmp_path_factory.mktemp("browser-pg"), {"url": url, "lease_s": 3, "renew_s": 1}) as base:
            yield base
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        yield launched
        launched.close()


class Watched:
    """A page that records console errors, CSP violations and dialogs (an executed script would open one)."""

    def __init__(self, browser: Browser) -> None:
        self.context = browser.new_context(
            http_credentials={"username": "oncall", "password": PAGE_TOKEN}, viewport={"width": 1280, "height": 900}
        )
        self.context.add_init_script(CSP_PROBE)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"{message.type}: {message.text}")

    def violations(self) -> list[str]:
        """CSP violations the page reported so far."""
        return list(self.page.evaluate("window.__csp"))

    def assert_clean(self) -> None:
        """No console error, no CSP violation, no dialog."""
        assert self.errors == [] and self.violations() == [] and self.dialogs == []


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    """A fresh browser context and page."""
    found = Watched(browser)
    yield found
    found.context.close()


def names(page: Page) -> list[str]:
    """The fine-tune names of the overview, in table order."""
    return page.locator("#runs tbody a.run-name").all_inner_texts()


def test_overview_loads_clean_sorts_and_escapes(served: str, watched: Watched) -> None:
    page = watched.page
    response = page.goto(f"{served}/")
    assert response is not None and response.status == 200
    assert page.title() == "Fine-tunes · oxen-watcher"
    assert names(page) == ["flaky-run", "ghost-run", XSS, "gemma-lora", "llama-sft"]  # failing, not found first
    # the XSS name is text: no script element, no dialog
    assert page.get_by_role("link", name=XSS).is_visible()
    assert page.locator("script").count() == 0
    row = page.locator("#runs tbody tr", has_text="llama-sft")
    assert row.locator("td.latest-loss").inner_text() == "0.43"
    assert row.locator("td.best-loss").inner_text() == "0.41 @ 1,100"
    assert page.locator("#runs tbody tr", has_text="flaky-run").get_by_text("failing").is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    watched.assert_clean()

    page.get_by_role("link", name="Loss", exact=True).click()
    page.wait_for_url("**/?sort=loss")
    # by latest loss (0.43, 1.0, 1.65), runs with no loss last either way
    assert names(page) == ["llama-sft", XSS, "gemma-lora", "flaky-run", "ghost-run"]
    page.get_by_role("link", name="Loss ▲").click()
    page.wait_for_url("**/?sort=-loss")
    assert names(page) == ["gemma-lora", XSS, "llama-sft", "flaky-run", "ghost-run"]
    watched.assert_clean()

    # the probe works: an inline style set by a script is refused and reported
    page.evaluate("document.body.setAttribute('style', 'color: red')")
    page.wait_for_function("window.__csp.length > 0")
    assert any("style-src" in v for v in watched.violations())


def test_run_page_chart_toggle_and_screenshot(served: str, watched: Watched) -> None:
    page = watched.page
    response = page.goto(f"{served}/fine-tunes/acme/chat/ft_llama")
    assert response is not None and response.status == 200
    chart = page.get_by_role("img", name="loss, best 0.41 at step 1,100")
    assert chart.is_visible()
    assert chart.get_attribute("aria-describedby") == "loss-chart-desc"
    assert "1 point outside the y-range" in (page.locator("#loss-chart-desc").text_content() or "")
    for name in ("mean token accuracy, latest", "learning rate, latest", "grad norm, latest"):
        assert page.get_by_role("img", name=name).count() == 1
    assert page.locator("#checkpoints tbody tr").count() == len(MAIN_LOSSES)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "run-page.png"), full_page=True)
    watched.assert_clean()

    page.get_by_role("link", name="log y-axis").click()
    page.wait_for_url("**/fine-tunes/acme/chat/ft_llama?scale=log")
    assert "on a log scale" in (page.locator("#loss-chart-desc").text_content() or "")
    page.get_by_role("link", name="linear y-axis").click()
    page.wait_for_url("**/fine-tunes/acme/chat/ft_llama?scale=linear")
    assert "on a log scale" not in (page.locator("#loss-chart-desc").text_content() or "")
    watched.assert_clean()


def test_xss_run_page_and_events_render_as_text(served: str, watched: Watched) -> None:
    page = watched.page
    page.goto(f"{served}/fine-tunes/acme/chat/ft_xss")
    assert page.locator("#run-name").inner_text() == XSS
    assert page.locator("script").count() == 0
    page.goto(f"{served}/events")
    assert page.get_by_text("console: delivered").count() >= 2
    page.get_by_role("link", name="checkpoint.deployment_changed").first.click()
    page.wait_for_url("**/events?type=checkpoint.deployment_changed")
    assert page.locator("table.events tbody tr").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "events.png"), full_page=True)
    watched.assert_clean()


def test_browser_without_the_token_gets_a_basic_challenge(served: str, browser: Browser) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        answers: list[Response] = []
        page.on("response", lambda answer: answers.append(answer))
        # what the server answers decides, not how the browser shows it: headless, with no credentials to give,
        # Debian's Chromium gives up with its own ERR_INVALID_AUTH_CREDENTIALS, other builds show the 401 page
        # (a page that never got an answer has none in `answers`, and fails below)
        try:
            shown = page.goto(f"{served}/")
        except PlaywrightError:
            shown = None
        assert shown is None or shown.status == 401
        assert [a.status for a in answers] == [401]
        assert answers[0].headers["www-authenticate"].startswith("Basic ")
        assert "llama-sft" not in answers[0].text()
    finally:
        context.close()


def test_on_postgresql_the_pages_show_the_same_runs_and_load_clean(served_on_postgresql: str, watched: Watched) -> None:
    page = watched.page
    response = page.goto(f"{served_on_postgresql}/")
    assert response is not None and response.status == 200
    assert names(page) == ["flaky-run", "ghost-run", XSS, "gemma-lora", "llama-sft"]
    row = page.locator("#runs tbody tr", has_text="llama-sft")
    assert row.locator("td.latest-loss").inner_text() == "0.43"
    assert row.locator("td.best-loss").inner_text() == "0.41 @ 1,100"
    watched.assert_clean()
    page.goto(f"{served_on_postgresql}/fine-tunes/acme/chat/ft_llama")
    assert page.get_by_role("img", name="loss, best 0.41 at step 1,100").is_visible()
    assert page.locator("#checkpoints tbody tr").count() == len(MAIN_LOSSES)
    assert page.locator("#replica").inner_text().startswith("replica ")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "run-page-postgresql.png"), full_page=True)
    watched.assert_clean()
