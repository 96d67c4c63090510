"""What the crash-loop and replica tests share: a Hub that keeps changing (each change recorded before it is
made), receivers with scripted failures, and the per-lane order of first successful deliveries."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from watcher.testing.receiver import Answer, Receiver
from watcher.testing.simhub import SimHub

from ._support import fine_tune_key

STATUSES = ("DEPLOYING", "ACTIVE", "INACTIVE")  # each checkpoint walks this once: no transition repeats
Change = tuple[Any, ...]  # (fine-tune key, step, event type, detail), as change_of() reads it off an event


class ScriptedReceiver(Receiver):
    """The verifying receiver, whose remaining scripted answers can be dropped (then it answers 200)."""

    def clear_script(self) -> None:
        with self._lock:
            self._script.clear()


def random_answers(rng: random.Random, count: int, *, statuses: tuple[int, ...]) -> list[Answer]:
    """Answers drawn from `statuses` (non-2xx say "try later"); a third of them slow, so a kill often lands
    mid-delivery."""
    answers = []
    for _ in range(count):
        status = rng.choice(statuses)
        delay = rng.uniform(0.05, 0.4) if rng.random() < 0.3 else 0.0
        answers.append(Answer(status=status, body="" if status == 200 else "try later", delay_s=delay))
    return answers


class HubChanges:
    """Changes the Hub's fine-tunes (new checkpoints, deployment transitions, metric updates, removals) and
    records each change in `made` and `pending` before the Hub shows it, so its event is never read first."""

    def _init_changes(self, hub: SimHub, keys: list[str], rng: random.Random) -> None:
        self.hub = hub
        self.rng = rng
        self.made: list[Change] = []
        self.pending: dict[Change, tuple[str, int]] = {}  # made, not yet seen committed
        self.created: dict[tuple[str, int], dict[str, Any]] = {}  # the checkpoint as the Hub first served it
        self.steps = {key: [100, 200] for key in keys}  # present on the Hub
        self.next_step = dict.fromkeys(keys, 300)
        self.stage: dict[tuple[str, int], int] = defaultdict(int)
        self.eval_loss: dict[tuple[str, int], float] = {}
        self.updates = 0

    def _make(self, change: Change) -> None:
        # recorded before the Hub changes, so its event can never be read before it is expected
        self.made.append(change)
        self.pending[change] = (change[0], change[1])

    def change(self, key: str) -> None:
        """One change to one fine-tune, never to a checkpoint whose previous change is still pending."""
        rng = self.rng
        busy = set(self.pending.values())
        idle = [step for step in self.steps[key] if (key, step) not in busy]
        roll = rng.random()
        if roll < 0.45 or not idle:
            step = self.next_step[key]
            self.next_step[key] += 100
            self._make((key, step, "checkpoint.created", None))
            self.created[(key, step)] = self.hub.add_checkpoint(key, step, loss=round(rng.uniform(0.2, 3.0), 4))
            self.steps[key].append(step)
        elif roll < 0.8:
            candidates = [step for step in idle if self.stage[(key, step)] < len(STATUSES)]
            if not candidates:
                return
            step = rng.choice(candidates)
            stage = self.stage[(key, step)]
            previous = STATUSES[stage - 1] if stage else None
            if not stage:  # the Hub also sets the model id on the first deployment: a checkpoint.updated too
                self._make((key, step, "checkpoint.updated", (("model_id",), self.eval_loss.get((key, step)))))
            self._make((key, step, "checkpoint.deployment_changed", (previous, STATUSES[stage])))
            self.hub.set_deployment_status(key, step, STATUSES[stage])
            self.stage[(key, step)] = stage + 1
        elif roll < 0.95:
            step = rng.choice(idle)
            self.updates += 1
            value = round(1 + self.updates / 1000, 4)
            self._make((key, step, "checkpoint.updated", (("metrics.eval_loss",), value)))
            self.hub.update_checkpoint(key, step, metrics={"eval_loss": value})
            self.eval_loss[(key, step)] = value
        else:
            step = rng.choice(idle)
            self._make((key, step, "checkpoint.removed", None))
            self.hub.remove_checkpoint(key, step)
            self.steps[key].remove(step)


def first_2xx_order(received: list[Any]) -> dict[str, list[str]]:
    """Per fine-tune, the webhook-ids in the order of their first 2xx answer."""
    lanes: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for got in received:
        if 200 <= got.status < 300 and got.webhook_id not in seen:
            seen.add(got.webhook_id)
            lanes[fine_tune_key(got.json)].append(got.webhook_id)
    return lanes
