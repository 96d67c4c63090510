"""contrib/prometheus: promtool accepts the example config and the alert rules, the rules' unit tests pass and
exercise every alert (firing and quiet), and the alert expressions use only metrics the watcher exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from watcher.observe.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "contrib" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
SCRAPE = PROMETHEUS_DIR / "scrape.yml"

# The metric names oxen-watcher exports: its public interface, which the alert rules may rely on.
EXPORTED_METRICS = frozenset(
    {
        "oxen_watcher_build_info",
        "oxen_watcher_polls_total",
        "oxen_watcher_polls_skipped_total",
        "oxen_watcher_poll_duration_seconds",
        "oxen_watcher_last_success_timestamp_seconds",
        "oxen_watcher_events_total",
        "oxen_watcher_deliveries_total",
        "oxen_watcher_outbox_pending",
        "oxen_watcher_outbox_oldest_pending_age_seconds",
        "oxen_fine_tune_checkpoints",
        "oxen_fine_tune_latest_step",
        "oxen_fine_tune_loss",
        "oxen_fine_tune_learning_rate",
        "oxen_fine_tune_grad_norm",
        "oxen_fine_tune_mean_token_accuracy",
        "oxen_fine_tune_epoch",
        "oxen_fine_tune_latest_checkpoint_timestamp_seconds",
        "oxen_checkpoint_deployment_status",
        "oxen_fine_tune_status",
        "oxen_watcher_watched_fine_tunes",
        "oxen_watcher_hub_requests_total",
        # replicas (PostgreSQL store only: Metrics.enable_replicas)
        "oxen_watcher_leases_owned",
        "oxen_watcher_lease_changes_total",
        "oxen_watcher_replicas_live",
        "oxen_watcher_fine_tunes_unowned",
        "oxen_watcher_db_pool_size",
        "oxen_watcher_db_pool_waiting",
    }
)
HISTOGRAMS = frozenset({"oxen_watcher_poll_duration_seconds"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

EXPECTED_ALERTS = frozenset(
    {
        "OxenWatcherDown",
        "OxenFineTunePollsFailing",
        "OxenFineTuneTrainingStalled",
        "OxenWatcherDeliveriesDead",
        "OxenWatcherDeliveriesPendingTooLong",
        "OxenCheckpointDeploymentFailed",
        "OxenFineTuneRunErrored",
        "OxenFineTuneRunStalled",
        "OxenWatcherFineTunesUnowned",
    }
)


def _promtool() -> str:
    """promtool's path; the test fails (not skips) without it: these rules ship, so they must be checked."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH, so the Prometheus rules in contrib/prometheus cannot be checked. "
            "`make test` installs it (Debian/Ubuntu package `prometheus`); or put Prometheus' promtool on PATH.",
            pytrace=False,
        )
    return path


def _run_promtool(*args: str) -> str:
    """Run promtool from the project root; fail unless it exits 0 without warnings. Returns its output."""
    result = subprocess.run([_promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"promtool {' '.join(args)} exited {result.returncode}:\n{output}"
    assert "warn" not in output.lower(), f"promtool {' '.join(args)} warned:\n{output}"
    return output


# ---------------------------------------------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    output = _run_promtool("check", "rules", "contrib/prometheus/alerts.yml")
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in output


def test_promtool_check_config() -> None:
    # rule_files in scrape.yml resolve against scrape.yml's folder, so this also checks alerts.yml is found there
    output = _run_promtool("check", "config", "contrib/prometheus/scrape.yml")
    assert "SUCCESS: 1 rule files found" in output


def test_promtool_test_rules() -> None:
    output = _run_promtool("test", "rules", "contrib/prometheus/alerts_test.yml")
    assert "SUCCESS" in output


# ------------------------------------------------------------------------------------ the files, read as text
# The venv has no YAML parser, and these files are ours: a strict reader of the few keys needed, which fails
# loudly (counts must match) rather than silently missing something.

_BLOCK_SCALAR = re.compile(r"^[|>][+-]?$")


def _rules(text: str) -> list[tuple[str, str, str]]:
    """(kind, name, expr) for every rule: kind is alert or record."""
    lines = text.splitlines()
    names = [
        (m.group(1), m.group(2))
        for line in lines
        if (m := re.match(r"^\s*-\s+(alert|record):\s*['\"]?([\w:]+)['\"]?\s*$", line))
    ]
    exprs: list[str] = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*?)\s*$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2)
        if _BLOCK_SCALAR.match(value):
            body = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following.strip())
            exprs.append("\n".join(body).strip())
        else:
            exprs.append(value.strip("'\""))
    assert len(exprs) == len(names), f"read {len(exprs)} expr for {len(names)} rules in {ALERTS.name}"
    assert all(exprs), f"an empty expr in {ALERTS.name}"
    return [(kind, name, expr) for (kind, name), expr in zip(names, exprs, strict=True)]


def _rule_test_cases(text: str) -> list[tuple[str, bool]]:
    """(alertname, expected to fire) for every alert_rule_test case."""
    cases: list[dict[str, object]] = []
    for line in text.splitlines():
        m = re.match(r"^\s*(-\s+)?(eval_time|alertname|exp_alerts):\s*(.*?)\s*$", line)
        if not m:
            continue
        dash, key, value = m.groups()
        if dash:
            cases.append({})
        assert cases, f"{key} outside a test case in {ALERTS_TEST.name}"
        if key == "alertname":
            cases[-1]["alertname"] = value.strip("'\"")
        elif key == "exp_alerts":
            # `exp_alerts: []` expects no alert; `exp_alerts:` followed by a list expects those
            cases[-1]["fires"] = value != "[]"
    assert cases, f"no alert_rule_test cases in {ALERTS_TEST.name}"
    assert all("alertname" in case for case in cases), f"a test case without alertname in {ALERTS_TEST.name}"
    return [(str(case["alertname"]), bool(case.get("fires", False))) for case in cases]


def test_the_expected_alerts_are_defined() -> None:
    alerts = [name for kind, name, _ in _rules(ALERTS.read_text()) if kind == "alert"]
    assert sorted(alerts) == sorted(EXPECTED_ALERTS)


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {name for kind, name, _ in _rules(ALERTS.read_text()) if kind == "alert"}
    cases = _rule_test_cases(ALERTS_TEST.read_text())
    unknown = {name for name, _ in cases} - alerts
    assert not unknown, f"{ALERTS_TEST.name} tests alerts that {ALERTS.name} does not define: {sorted(unknown)}"
    never_fires = sorted(alerts - {name for name, fires in cases if fires})
    never_quiet = sorted(alerts - {name for name, fires in cases if not fires})
    assert not never_fires, f"no case in {ALERTS_TEST.name} expects these alerts to fire: {never_fires}"
    assert not never_quiet, f"no case in {ALERTS_TEST.name} expects these alerts to stay quiet: {never_quiet}"


def _allowed(name: str, recorded: set[str]) -> bool:
    if name in EXPORTED_METRICS or name in recorded:
        return True
    return any(name == base + suffix for base in HISTOGRAMS for suffix in HISTOGRAM_SUFFIXES)


def test_alert_expressions_use_only_exported_metrics() -> None:
    rules = _rules(ALERTS.read_text())
    recorded = {name for kind, name, _ in rules if kind == "record"}
    used: dict[str, set[str]] = {}
    for _, rule, expr in rules:
        for name in re.findall(r"(?<![\w:])oxen_[\w:]+", expr):
            used.setdefault(name, set()).add(rule)
    assert used, "the alert expressions use no oxen_ metric at all?"
    unknown = {name: sorted(rules_) for name, rules_ in used.items() if not _allowed(name, recorded)}
    assert not unknown, f"alert expressions use metrics oxen-watcher does not export: {unknown}"


def test_the_metric_list_matches_what_the_watcher_registers() -> None:
    """EXPORTED_METRICS above is the real interface: exactly what watcher.metrics registers."""
    registry = CollectorRegistry()
    Metrics(registry, version="0.0.0-test").enable_replicas()
    registered = set()
    for family in registry.collect():
        registered.add(f"{family.name}_total" if family.type == "counter" else family.name)
    assert registered == EXPORTED_METRICS
