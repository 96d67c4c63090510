"""The SimHub: its state, its programmatic API, and the background server that serves it (see serving.py)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from watcher.testing.background import BackgroundServer
from watcher.testing.simhub import runs
from watcher.testing.simhub.faults import Fault, RequestRecord
from watcher.testing.simhub.runs import FineTuneRecord, RunInfo, StatusStep, key_of
from watcher.testing.simhub.serving import Serving

DEFAULT_TOKEN = "simhub-token"


class SimHub(Serving):
    """The simulated Hub; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        *,
        token: str | None = DEFAULT_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self._clock = clock  # drives created_at, scripted transitions and appearances
        self._seq = 0
        self._repo_faults: dict[str, deque[Fault]] = {}
        self.list_form: Literal["full", "simple"] = "full"  # list entries: every documented field, or the few
        # called with (repo key "namespace/repo", page) before a list page is answered, outside the lock:
        # a test adds or removes fine-tunes there to shift the list while it is being read
        self.on_list: Callable[[str, int], None] | None = None
        self._host = host
        self._lock = threading.Lock()
        self._fine_tunes: dict[str, FineTuneRecord] = {}
        self._global_faults: deque[Fault] = deque()
        self._requests: list[RequestRecord] = []
        self.gzip = False  # answer with Content-Encoding: gzip when the client accepts it
        self._server = BackgroundServer(self.make_app, host=host, port=port, name="simhub")

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to configure as [hub] url."""
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (after start())."""
        return self._server.port

    def start(self) -> SimHub:
        """Start serving in a background thread; returns once the socket is bound."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        self._server.stop()

    def __enter__(self) -> SimHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- programmatic API --------------------------------------------------------------------------

    def add_fine_tune(
        self,
        namespace: str,
        repo: str,
        fine_tune_id: str,
        *,
        name: str | None = None,
        status: str = "running",
        error: str | None = None,
        base_model: str = "Qwen/Qwen3-0.6B",
        created_by: str | None = "simuser",
        created_at: float | None = None,
        finished_at: float | None = None,
        appear_after_s: float = 0.0,
    ) -> str:
        """Make a fine-tune exist (with no checkpoints yet) in a status; returns its key.

        `created_at` / `finished_at` (Unix seconds) backdate it; `appear_after_s` makes it appear that much
        later (until then it answers 404 and is not listed), and its created_at is then the appearance time.
        """
        key = key_of(namespace, repo, fine_tune_id)
        now = self._clock()
        with self._lock:
            if key in self._fine_tunes:
                return key
            self._seq += 1
            visible_at = now + appear_after_s
            run = RunInfo(
                created_at=created_at if created_at is not None else visible_at,
                seq=self._seq,
                base_model=base_model,
                created_by=created_by,
                visible_at=visible_at,
            )
            run.status = status
            run.updated_at = run.created_at
            if status not in ("created", "tokenizing", "enqueued"):
                run.started_at = run.created_at
            runs.set_status(run, status, now=finished_at if finished_at is not None else run.created_at, error=error)
            run.updated_at = max(run.created_at, run.finished_at or 0.0)
            self._fine_tunes[key] = FineTuneRecord(namespace, repo, fine_tune_id, name or fine_tune_id, run=run)
        return key

    def set_status(self, key: str, status: str, *, error: str | None = None) -> None:
        """Move a fine-tune to a status now (started_at on running, finished_at and error when it ends)."""
        with self._lock:
            run = self._fine_tunes[key].run
            run.script.clear()
            runs.set_status(run, status, now=self._clock(), error=error)

    def script(self, key: str, *steps: StatusStep) -> None:
        """Schedule status transitions (each `at_s` seconds from now); they apply as time passes."""
        with self._lock:
            runs.script(self._fine_tunes[key].run, steps, now=self._clock())

    def script_run(
        self, key: str, *, step_s: float = 1.0, run_s: float = 5.0, outcome: str = "completed", error: str | None = None
    ) -> None:
        """Script a whole run from now: created, tokenizing, enqueued, running (run_s), then the outcome."""
        self.script(key, *runs.run_steps(step_s=step_s, run_s=run_s, outcome=outcome, error=error))

    def fine_tune(self, key: str) -> dict[str, Any]:
        """The fine-tune's current FineTune object (as GET .../fine_tunes/{id} answers it)."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            runs.apply_due(fine_tune.run, self._clock())
            return self._object_of(fine_tune, "full")

    def remove_fine_tune(self, key: str) -> None:
        """Make a fine-tune disappear: it answers 404 from now on."""
        with self._lock:
            self._fine_tunes.pop(key, None)

    def add_checkpoint(
        self,
        key: str,
        step: int | None = None,
        *,
        loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        inference_samples: list[dict[str, Any]] | None = None,
        deployment_status: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Add a checkpoint (the next step by default) with realistic fields; returns it."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            if step is None:
                step = max(fine_tune.checkpoints, default=0) + 100
            checkpoint: dict[str, Any] = {
                "created_at": runs.iso(self._clock()),
                "deployment_status": deployment_status,
                "inference_samples": inference_samples if inference_samples is not None else [],
                "metrics": {
                    "epoch": round(step / 1000, 4),
                    "grad_norm": 1.0,
                    "learning_rate": 2e-5,
                    "loss": loss,
                    "mean_token_accuracy": None if loss is None else round(max(0.0, 1 - loss / 4), 4),
                    **(metrics or {}),
                },
                "model_id": None,
                "model_name": f"{fine_tune.name}-step-{step}",
                "path": f"checkpoints/step-{step}",
                "size_bytes": 1_234_567_890,
                "step": step,
                **fields,
            }
            fine_tune.checkpoints[step] = checkpoint
            fine_tune.body = None
            return dict(checkpoint)

    def update_checkpoint(self, key: str, step: int, **fields: Any) -> dict[str, Any]:
        """Change fields of a checkpoint (`metrics` merges into the existing metrics); returns it."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            checkpoint = fine_tune.checkpoints[step]
            for name, value in fields.items():
                if name == "metrics" and isinstance(value, Mapping):
                    checkpoint["metrics"] = {**(checkpoint.get("metrics") or {}), **value}
                else:
                    checkpoint[name] = value
            fine_tune.body = None
            return dict(checkpoint)

    def set_deployment_status(self, key: str, step: int, status: str | None) -> None:
        """Set a checkpoint's deployment status (and a model id once it is deployed)."""
        fields: dict[str, Any] = {"deployment_status": status}
        if status is not None:
            fields["model_id"] = f"model_{key.rsplit('/', 1)[-1]}_{step}"
        self.update_checkpoint(key, step, **fields)

    def remove_checkpoint(self, key: str, step: int) -> None:
        """Delete a checkpoint from the list."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            fine_tune.checkpoints.pop(step, None)
            fine_tune.body = None

    def checkpoints(self, key: str) -> list[dict[str, Any]]:
        """The current checkpoints of a fine-tune, by step."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            return [dict(fine_tune.checkpoints[s]) for s in sorted(fine_tune.checkpoints)]

    def inject(self, key: str | None, *faults: Fault) -> None:
        """Queue faults for one fine-tune ("namespace/repo/id": its checkpoints endpoint, or the fine_tune one when
        the fault says so), one repository's list ("namespace/repo"), or every request (None); answered in order
        per endpoint."""
        with self._lock:
            self._queue_of(key).extend(faults)

    def _queue_of(self, key: str | None) -> deque[Fault]:
        if key is None:
            return self._global_faults
        if key.count("/") == 1:
            return self._repo_faults.setdefault(key, deque())
        return self._fine_tunes[key].faults

    def clear_faults(self, key: str | None = None) -> None:
        """Drop queued faults of one fine-tune, or all faults when key is None."""
        with self._lock:
            if key is None:
                self._global_faults.clear()
                self._repo_faults.clear()
                for fine_tune in self._fine_tunes.values():
                    fine_tune.faults.clear()
            else:
                self._queue_of(key).clear()

    def requests(self, key: str | None = None, *, endpoint: str | None = "") -> list[RequestRecord]:
        """The requests received so far; for one fine-tune ("namespace/repo/id": its checkpoint polls unless
        `endpoint` says otherwise, None: every endpoint) or one repository ("namespace/repo": its list reads)."""
        with self._lock:
            if key is None:
                return list(self._requests)
            if endpoint == "":
                endpoint = "checkpoints" if key.count("/") == 2 else None
            return [r for r in self._requests if r.key == key and (endpoint is None or r.endpoint == endpoint)]


def keys_of(fine_tunes: Iterable[tuple[str, str, str]]) -> list[str]:
    """Keys "namespace/repo/id" of (namespace, repo, id) triples."""
    return [key_of(*triple) for triple in fine_tunes]
