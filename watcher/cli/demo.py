"""`oxen-watcher demo`: the simulated Hub with fine-tunes that keep training, and the daemon watching it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from watcher.testing.simhub import SimHub, StatusStep

DEMO_TOKEN = "demo-token"
DEMO_WEBHOOK_URL = "http://127.0.0.1:9000/hooks/oxen"
# A fixed, public secret for the demo receiver only: "whsec_" + base64 of 32 bytes.
DEMO_WEBHOOK_SECRET = "whsec_" + "b3hlbi13YXRjaGVyLWRlbW8tc2VjcmV0LTMyLWJ5dGVz"
TRAINING = "acme/support-bot/ft_support"
SLOW_TRAINING = "acme/summarizer/ft_summarize"
MISSING = "acme/ghost/ft_missing"
# runs started after the demo starts, found by the [[discover]] source of acme/experiments
SWEEP_DONE = "acme/experiments/ft_sweep_a"
SWEEP_FAILED = "acme/experiments/ft_sweep_b"


class DemoTrainer:
    """Drives the simulated Hub like a training run: checkpoints with falling loss, a deployment going live."""

    def __init__(self, hub: SimHub, *, tick_s: float = 1.0) -> None:
        self.hub = hub
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-trainer", daemon=True)
        self._ticks = 0
        self._deploy_step: int | None = None

    def seed(self) -> None:
        """Create the fine-tunes, each with a checkpoint or two already saved (the baseline)."""
        self.hub.add_fine_tune("acme", "support-bot", "ft_support", name="support-bot-sft")
        self.hub.add_fine_tune("acme", "summarizer", "ft_summarize", name="summarizer-lora")
        self.hub.add_checkpoint(TRAINING, 100, loss=2.31)
        self.hub.add_checkpoint(TRAINING, 200, loss=1.87)
        self.hub.add_checkpoint(SLOW_TRAINING, 500, loss=1.42)
        # an experiment that finished before the demo started: the source's first read records it silently
        self.hub.add_fine_tune("acme", "experiments", "ft_baseline", name="baseline-run", status="completed")

    def start(self) -> None:
        """Start training in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop training."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self._ticks += 1
            self.tick(self._ticks)

    def tick(self, n: int) -> None:
        """Advance the simulated world by one tick: a checkpoint every 4, a deployment at 6 (live at 12)."""
        if n % 4 == 0:
            steps = [c["step"] for c in self.hub.checkpoints(TRAINING)]
            step = max(steps) + 100
            loss = round(1.9 * 0.86 ** (step / 100 - 1), 4)
            self.hub.add_checkpoint(
                TRAINING,
                step,
                loss=loss,
                inference_samples=[
                    {"prompt": "How do I reset my password?", "completion": f"(step {step}) Go to Settings > Security."}
                ],
            )
        if n == 6:
            # deploy the newest checkpoint the watcher already knows
            self._deploy_step = max(c["step"] for c in self.hub.checkpoints(TRAINING))
            self.hub.set_deployment_status(TRAINING, self._deploy_step, "DEPLOYING")
        if n == 12 and self._deploy_step is not None:
            self.hub.set_deployment_status(TRAINING, self._deploy_step, "ACTIVE")
        self._experiments(n)
        if n % 9 == 0:
            steps = [c["step"] for c in self.hub.checkpoints(SLOW_TRAINING)]
            step = max(steps) + 500
            self.hub.add_checkpoint(SLOW_TRAINING, step, loss=round(1.42 * 0.93 ** (step / 500 - 1), 4))

    def _experiments(self, n: int) -> None:
        """Two short runs started after the demo: one completes (tick 2 + 6 s), one errors (tick 3 + 7 s)."""
        if n == 2:
            self.hub.add_fine_tune("acme", "experiments", "ft_sweep_a", name="sweep-lr-3e-5", created_by="alice")
            self.hub.script(SWEEP_DONE, StatusStep(6.0, "completed"))
        if n == 3:
            self.hub.add_fine_tune("acme", "experiments", "ft_sweep_b", name="sweep-lr-1e-3", created_by="alice")
            self.hub.script(SWEEP_FAILED, StatusStep(7.0, "errored", "Training failed: loss diverged (NaN) at step 60"))
        if n in (4, 6):
            self.hub.add_checkpoint(SWEEP_DONE, 50 * (n - 2), loss=round(1.6 - 0.2 * n, 4))
        if n == 5:
            self.hub.add_checkpoint(SWEEP_FAILED, 50, loss=3.2)


def demo_config(hub: SimHub, state_dir: Path) -> dict[str, Any]:
    """The configuration `demo` runs with: short intervals, everything in a temporary folder."""
    return {
        "hub": {"url": hub.url, "token": DEMO_TOKEN, "timeout_s": 5},
        "watch": {"interval_s": 2, "jitter_s": 0.5, "baseline": True, "failure_threshold": 3},
        "state": {"path": str(state_dir / "watcher.db")},
        "log": {"level": "warning", "format": "console"},
        "http": {"listen": "127.0.0.1:0"},
        "notifiers": [
            {"name": "console", "type": "log"},
            {
                "name": "demo-webhook",
                "type": "webhook",
                "url": DEMO_WEBHOOK_URL,
                "secret": DEMO_WEBHOOK_SECRET,
                "timeout_s": 5,
            },
        ],
        # every fine-tune of acme/experiments, as runs start; statuses fresh within a second
        "discover": [{"name": "experiments", "namespace": "acme", "repo": "experiments", "interval_s": 1}],
        "lifecycle": {"status_interval_s": 1, "idle_interval_s": 30},
        "fine_tunes": [
            {"namespace": "acme", "repo": "support-bot", "id": "ft_support", "name": "support-bot-sft"},
            {
                "namespace": "acme",
                "repo": "summarizer",
                "id": "ft_summarize",
                "name": "summarizer-lora",
                "interval_s": 3,
            },
            {"namespace": "acme", "repo": "ghost", "id": "ft_missing", "name": "ghost-run"},
        ],
    }
