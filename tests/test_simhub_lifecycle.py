"""The simulated Hub's fine-tune endpoints: list (paging, filters, sort), single fine-tune, scripted status
transitions, fine-tunes appearing later, and fault injection on every endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from watcher.core.lifecycle import advance, wants_final_poll
from watcher.core.models import EventDraft, FineTuneRef, HubFineTune, LifecycleState
from watcher.hub.client import HubClient
from watcher.testing.simhub import Fault, SimHub, StatusStep

TOKEN = "simhub-token"
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    """A settable clock for the simulated Hub."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sim(clock: Clock) -> Iterator[SimHub]:
    with SimHub(token=TOKEN, clock=clock) as hub:
        yield hub


@pytest.fixture
def http(sim: SimHub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def listing(http: httpx.Client, repo: str = "acme/bot", **params: Any) -> list[dict[str, Any]]:
    response = http.get(f"/api/repos/{repo}/fine_tunes", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["status_message"]) == ("success", "resource_found")
    assert set(body) == {"fine_tunes", "status", "status_message"}  # no total
    fine_tunes: list[dict[str, Any]] = body["fine_tunes"]
    return fine_tunes


def one(http: httpx.Client, fine_tune_id: str, repo: str = "acme/bot") -> httpx.Response:
    return http.get(f"/api/repos/{repo}/fine_tunes/{fine_tune_id}")


def add_many(sim: SimHub, count: int, **fields: Any) -> None:
    for n in range(count):
        sim.add_fine_tune("acme", "bot", f"ft_{n:02d}", created_at=T0 - 1000 + n, **fields)


# --- list ------------------------------------------------------------------------------------------------


def test_list_is_newest_first_and_paged(sim: SimHub, http: httpx.Client) -> None:
    add_many(sim, 45)
    sim.add_fine_tune("acme", "other", "elsewhere")
    first = listing(http, page=1, page_size=20)
    assert [f["id"] for f in first] == [f"ft_{n:02d}" for n in range(44, 24, -1)]
    assert [f["id"] for f in listing(http, page=3, page_size=20)] == [f"ft_{n:02d}" for n in range(4, -1, -1)]
    assert listing(http, page=4, page_size=20) == []
    assert len(listing(http)) == 20  # default page size
    assert len(listing(http, page_size=100)) == 45
    assert [f["id"] for f in listing(http, sort="oldest", page_size=3)] == ["ft_00", "ft_01", "ft_02"]


def test_equal_created_at_keeps_insertion_order(sim: SimHub, http: httpx.Client) -> None:
    for name in ("a", "b", "c"):
        sim.add_fine_tune("acme", "bot", name, created_at=T0)
    assert [f["id"] for f in listing(http)] == ["c", "b", "a"]


def test_list_filters(sim: SimHub, http: httpx.Client) -> None:
    sim.add_fine_tune("acme", "bot", "ft_1", name="support-sft", created_by="alice")
    sim.add_fine_tune("acme", "bot", "ft_2", name="summarizer", status="completed", created_by="bob")
    sim.add_fine_tune("acme", "bot", "ft_3", name="Support-DPO", status="errored", created_by="alice")
    assert [f["id"] for f in listing(http, status="completed")] == ["ft_2"]
    assert [f["id"] for f in listing(http, created_by="alice")] == ["ft_3", "ft_1"]
    assert [f["id"] for f in listing(http, search="support")] == ["ft_3", "ft_1"]  # case-insensitive
    assert [f["id"] for f in listing(http, search="ft_2")] == ["ft_2"]
    assert listing(http, created_by="nobody") == []


@pytest.mark.parametrize(
    "params", [{"page": "0"}, {"page": "x"}, {"page_size": "0"}, {"page_size": "101"}, {"sort": "random"}]
)
def test_bad_list_parameters_are_400_invalid_params(http: httpx.Client, params: dict[str, str]) -> None:
    response = http.get("/api/repos/acme/bot/fine_tunes", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_params"


def test_an_unknown_repository_lists_nothing(http: httpx.Client) -> None:
    assert listing(http, repo="nobody/nothing") == []


def test_list_entries_carry_the_documented_fields(sim: SimHub, http: httpx.Client) -> None:
    sim.add_fine_tune("acme", "bot", "ft_1", name="sft", created_by="alice", base_model="Qwen/Qwen3-4B")
    (entry,) = listing(http)
    documented = {
        "id", "name", "display_name", "description", "status", "error", "base_model", "created_by", "inserted_at",
        "created_at", "updated_at", "started_at", "finished_at", "queue_position", "gpu_model", "gpu_count",
        "credits_used", "rate_per_second", "total_token_count", "repository_id", "resource", "output_resource",
        "deployed_model", "source_model", "training_params", "fine_tune_script",
    }  # fmt: skip
    assert set(entry) == documented
    assert entry["created_by"]["username"] == "alice"
    assert (entry["base_model"], entry["status"], entry["error"]) == ("Qwen/Qwen3-4B", "running", None)
    assert entry["created_at"] == "2027-01-15T08:00:00Z"
    sim.list_form = "simple"
    (simple,) = listing(http)
    assert set(simple) == {"id", "name", "base_model", "status", "created_at", "updated_at"}


def test_the_list_needs_the_token(sim: SimHub) -> None:
    with httpx.Client(base_url=sim.url) as anonymous:
        assert anonymous.get("/api/repos/acme/bot/fine_tunes").status_code == 401


# --- single fine-tune ------------------------------------------------------------------------------------


def test_get_one_fine_tune(sim: SimHub, http: httpx.Client) -> None:
    sim.add_fine_tune("acme", "bot", "ft_1", name="sft")
    response = one(http, "ft_1")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"fine_tune", "status", "status_message"}
    assert body["fine_tune"]["id"] == "ft_1" and body["fine_tune"]["name"] == "sft"
    assert body["fine_tune"] == sim.fine_tune("acme/bot/ft_1")
    missing = one(http, "nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "resource_not_found"


def test_a_removed_fine_tune_is_404_on_every_endpoint(sim: SimHub, http: httpx.Client) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1")
    sim.remove_fine_tune(key)
    assert one(http, "ft_1").status_code == 404
    assert http.get("/api/repos/acme/bot/fine_tunes/ft_1/checkpoints").status_code == 404
    assert listing(http) == []


# --- statuses over time ----------------------------------------------------------------------------------


def test_a_scripted_run_completes(sim: SimHub, http: httpx.Client, clock: Clock) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1", status="created")
    sim.script_run(key, step_s=10, run_s=100)
    seen = []
    for at in (0, 10, 20, 30, 129, 130):
        clock.now = T0 + at
        seen.append(one(http, "ft_1").json()["fine_tune"])
    assert [f["status"] for f in seen] == ["created", "tokenizing", "enqueued", "running", "running", "completed"]
    assert seen[2]["started_at"] is None
    assert seen[3]["started_at"] == "2027-01-15T08:00:30Z"
    assert seen[4]["finished_at"] is None
    assert seen[5]["finished_at"] == "2027-01-15T08:02:10Z"
    assert seen[5]["updated_at"] == "2027-01-15T08:02:10Z"
    assert seen[5]["error"] is None


def test_a_scripted_run_errors_with_error_text(sim: SimHub, http: httpx.Client, clock: Clock) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1", status="created")
    sim.script_run(key, step_s=1, run_s=5, outcome="errored", error="NaN loss at step 300")
    clock.now = T0 + 100  # every step is due: applied in order
    fine_tune = listing(http)[0]
    assert (fine_tune["status"], fine_tune["error"]) == ("errored", "NaN loss at step 300")
    assert (fine_tune["started_at"], fine_tune["finished_at"]) == ("2027-01-15T08:00:03Z", "2027-01-15T08:00:08Z")


def test_script_steps_and_set_status(sim: SimHub, clock: Clock) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1")
    sim.script(key, StatusStep(5, "stopped"), StatusStep(50, "deployed"))
    clock.now = T0 + 6
    assert sim.fine_tune(key)["status"] == "stopped"
    assert sim.fine_tune(key)["finished_at"] == "2027-01-15T08:00:05Z"
    clock.now = T0 + 60
    assert sim.fine_tune(key)["status"] == "deployed"
    assert sim.fine_tune(key)["finished_at"] == "2027-01-15T08:00:05Z"  # kept
    sim.set_status(key, "errored")
    assert sim.fine_tune(key)["error"]  # a default error text


def test_backdated_finished_fine_tunes(sim: SimHub) -> None:
    key = sim.add_fine_tune(
        "acme", "bot", "ft_1", status="completed", created_at=T0 - 10 * 86400, finished_at=T0 - 9 * 86400
    )
    fine_tune = sim.fine_tune(key)
    assert fine_tune["finished_at"] == "2027-01-06T08:00:00Z"
    assert fine_tune["started_at"] == "2027-01-05T08:00:00Z"
    assert fine_tune["updated_at"] == fine_tune["finished_at"]


def test_a_fine_tune_appears_later(sim: SimHub, http: httpx.Client, clock: Clock) -> None:
    sim.add_fine_tune("acme", "bot", "ft_old", created_at=T0 - 100)
    key = sim.add_fine_tune("acme", "bot", "ft_new", appear_after_s=30)
    assert [f["id"] for f in listing(http)] == ["ft_old"]
    assert one(http, "ft_new").status_code == 404
    assert http.get("/api/repos/acme/bot/fine_tunes/ft_new/checkpoints").status_code == 404
    clock.now = T0 + 30
    assert [f["id"] for f in listing(http)] == ["ft_new", "ft_old"]
    assert one(http, "ft_new").json()["fine_tune"]["created_at"] == "2027-01-15T08:00:30Z"
    sim.add_checkpoint(key, 100, loss=1.0)
    assert http.get("/api/repos/acme/bot/fine_tunes/ft_new/checkpoints").json()["total_checkpoints"] == 1


# --- faults and request records --------------------------------------------------------------------------


def test_faults_reach_every_endpoint(sim: SimHub, http: httpx.Client) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1")
    sim.inject(key, Fault(status=503, retry_after="7", endpoint="fine_tune"))
    sim.inject("acme/bot", Fault(status=502, endpoint="list"))
    checkpoints = http.get("/api/repos/acme/bot/fine_tunes/ft_1/checkpoints")
    assert checkpoints.status_code == 200  # the fine_tune fault waits for its endpoint
    failed = one(http, "ft_1")
    assert (failed.status_code, failed.headers["Retry-After"]) == (503, "7")
    assert http.get("/api/repos/acme/bot/fine_tunes").status_code == 502
    assert one(http, "ft_1").status_code == 200
    assert http.get("/api/repos/acme/bot/fine_tunes").status_code == 200


def test_a_fine_tunes_fault_without_endpoint_answers_its_checkpoint_polls(sim: SimHub, http: httpx.Client) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1")
    sim.inject(key, Fault(status=500, times=2))
    assert one(http, "ft_1").status_code == 200  # the watcher's status reads leave a poll's fault alone
    assert http.get("/api/repos/acme/bot/fine_tunes/ft_1/checkpoints").status_code == 500
    assert http.get("/api/repos/acme/bot/fine_tunes/ft_1/checkpoints").status_code == 500
    assert http.get("/api/repos/acme/bot/fine_tunes/ft_1/checkpoints").status_code == 200


def test_global_faults_and_cut_connections_hit_lists(sim: SimHub, http: httpx.Client) -> None:
    sim.add_fine_tune("acme", "bot", "ft_1")
    sim.inject(None, Fault(status=429, retry_after="3", endpoint="list"), Fault(status=200, truncate=True))
    assert http.get("/api/repos/acme/bot/fine_tunes").status_code == 429
    with pytest.raises(httpx.HTTPError):
        http.get("/api/repos/acme/bot/fine_tunes")
    assert listing(http)[0]["id"] == "ft_1"
    sim.inject("acme/bot", Fault(status=500, times=None))
    assert http.get("/api/repos/acme/bot/fine_tunes").status_code == 500
    sim.clear_faults("acme/bot")
    assert listing(http)[0]["id"] == "ft_1"


def test_requests_are_recorded_per_endpoint(sim: SimHub, http: httpx.Client) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1")
    listing(http)
    one(http, "ft_1")
    http.get("/api/repos/acme/bot/fine_tunes/ft_1/checkpoints")
    assert [(r.key, r.endpoint, r.status) for r in sim.requests()] == [
        ("acme/bot", "list", 200),
        (key, "fine_tune", 200),
        (key, "checkpoints", 200),
    ]
    assert [r.endpoint for r in sim.requests(key, endpoint=None)] == ["fine_tune", "checkpoints"]
    assert [r.endpoint for r in sim.requests(key)] == ["checkpoints"]


def test_the_list_hook_can_shift_the_list_between_pages(sim: SimHub, http: httpx.Client) -> None:
    add_many(sim, 4)
    pages: list[tuple[str, int]] = []

    def hook(repo_key: str, page: int) -> None:
        pages.append((repo_key, page))
        if page == 2:
            sim.add_fine_tune("acme", "bot", "ft_late", created_at=T0 + 1)

    sim.on_list = hook
    first = listing(http, page=1, page_size=2)
    second = listing(http, page=2, page_size=2)
    assert [f["id"] for f in first] == ["ft_03", "ft_02"]
    assert [f["id"] for f in second] == ["ft_02", "ft_01"]  # shifted by the new one at the top
    assert pages == [("acme/bot", 1), ("acme/bot", 2)]


# --- the whole chain: simulated Hub -> HubClient -> lifecycle rules --------------------------------------


@pytest.mark.parametrize(
    ("outcome", "error"), [("completed", None), ("errored", "NaN loss at step 300"), ("stopped", None)]
)
async def test_a_scripted_run_read_through_the_client_yields_every_transition(
    sim: SimHub, clock: Clock, outcome: str, error: str | None
) -> None:
    key = sim.add_fine_tune("acme", "bot", "ft_1", status="created")
    sim.script_run(key, step_s=60, run_s=3600, outcome=outcome, error=error)
    ref = FineTuneRef("acme", "bot", "ft_1", "ft_1")
    state = LifecycleState()
    events: list[EventDraft] = []
    final_polls: list[bool] = []
    async with HubClient(base_url=sim.url, token=TOKEN) as client:
        for minute in range(0, 70):
            clock.now = T0 + minute * 60
            fine_tune = await client.get_fine_tune("acme", "bot", "ft_1")
            assert isinstance(fine_tune, HubFineTune)
            final_polls.append(wants_final_poll(state, fine_tune))
            result = advance(ref, state, fine_tune, checkpoints={}, now=clock.now)
            state = result.state
            events.extend(result.events)
    assert [(e.data["previous_status"], e.data["status"]) for e in events] == [
        ("created", "tokenizing"),
        ("tokenizing", "enqueued"),
        ("enqueued", "running"),
        ("running", outcome),
    ]
    assert final_polls.count(True) == 1
    last = events[-1].data
    assert last["duration_s"] == 3600.0
    assert last["started_at"] == "2027-01-15T08:03:00Z"
    assert last["error"] == error
    assert last["checkpoints"] == 0
