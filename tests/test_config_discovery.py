"""[[discover]] and [lifecycle]: defaults, validation naming the key, duplicate names, and check-config's exit 78."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import cli, write_config

from watcher.config.load import parse_config
from watcher.errors import ConfigError


def test_defaults() -> None:
    config = parse_config({"discover": [{"namespace": "acme", "repo": "support-bot"}]})
    (source,) = config.discover
    assert source.name == "acme/support-bot"
    assert (source.include, source.exclude, source.created_by) == (["*"], [], "")
    assert (source.interval_s, source.max_age_days) == (60.0, 7.0)
    lifecycle = config.lifecycle
    assert (lifecycle.status_interval_s, lifecycle.idle_interval_s, lifecycle.stall_after_s) == (60.0, 600.0, 0.0)
    assert parse_config({}).discover == []


def test_every_key() -> None:
    config = parse_config(
        {
            "discover": [
                {
                    "name": "support",
                    "namespace": "acme",
                    "repo": "support-bot",
                    "include": ["sft-*", "ft_9"],
                    "exclude": ["*-old"],
                    "created_by": "alice",
                    "interval_s": 30,
                    "max_age_days": 2.5,
                }
            ],
            "lifecycle": {"status_interval_s": 15, "idle_interval_s": 900, "stall_after_s": 7200},
        }
    )
    (source,) = config.discover
    assert (source.name, source.include, source.exclude, source.created_by) == (
        "support",
        ["sft-*", "ft_9"],
        ["*-old"],
        "alice",
    )
    assert (source.interval_s, source.max_age_days) == (30.0, 2.5)
    assert config.lifecycle.stall_after_s == 7200.0


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"discover": [{"namespace": "a", "repo": "b", "interval_s": 0}]}, "discover[0].interval_s"),
        ({"discover": [{"namespace": "a", "repo": "b", "interval_s": "60"}]}, "discover[0].interval_s"),
        ({"discover": [{"namespace": "a", "repo": "b", "max_age_days": 0}]}, "discover[0].max_age_days"),
        ({"discover": [{"namespace": "a", "repo": "b", "include": []}]}, "discover[0].include"),
        ({"discover": [{"namespace": "a", "repo": "b", "include": "*"}]}, "discover[0].include"),
        ({"discover": [{"namespace": "a", "repo": "b", "exclude": [""]}]}, "discover[0].exclude[0]"),
        ({"discover": [{"namespace": "a", "repo": "b", "created_by": " bob"}]}, "discover[0].created_by"),
        ({"discover": [{"namespace": "a", "repo": "b", "name": ""}]}, "discover[0].name"),
        ({"discover": [{"namespace": "a", "repo": "b", "name": "config"}]}, "discover[0].name"),
        ({"discover": [{"namespace": "a", "repo": "b", "name": "bad\nname"}]}, "discover[0].name"),
        ({"discover": [{"namespace": "a/b", "repo": "b"}]}, "discover[0].namespace"),
        ({"discover": [{"namespace": "a"}]}, "discover[0].repo"),
        ({"discover": [{"namespace": "a", "repo": "b", "intervals": 1}]}, "discover[0].intervals"),
        ({"discover": {"namespace": "a", "repo": "b"}}, "discover"),
        ({"lifecycle": {"status_interval_s": 0}}, "lifecycle.status_interval_s"),
        ({"lifecycle": {"idle_interval_s": -1}}, "lifecycle.idle_interval_s"),
        ({"lifecycle": {"stall_after_s": -1}}, "lifecycle.stall_after_s"),
        ({"lifecycle": {"stall": 5}}, "lifecycle.stall"),
    ],
)
def test_bad_values_name_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(section, source="w.toml")
    assert str(info.value).startswith(f"w.toml: {key}: ")


def test_duplicate_discover_names_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "discover": [
                    {"namespace": "acme", "repo": "bot"},
                    {"name": "other", "namespace": "acme", "repo": "x"},
                    {"name": "acme/bot", "namespace": "acme", "repo": "y"},
                ]
            },
            source="w.toml",
        )
    assert str(info.value) == "w.toml: discover[2].name: duplicate discover name 'acme/bot' (also discover[0])"


def test_two_sources_on_one_repository_with_different_names_are_fine() -> None:
    config = parse_config(
        {
            "discover": [
                {"name": "mine", "namespace": "acme", "repo": "bot", "created_by": "alice"},
                {"name": "all", "namespace": "acme", "repo": "bot"},
            ]
        }
    )
    assert [s.name for s in config.discover] == ["mine", "all"]


def test_notifier_filters_accept_the_new_event_types() -> None:
    config = parse_config(
        {"notifiers": [{"name": "log", "type": "log", "events": ["fine_tune.*", "fine_tune.stalled"]}]}
    )
    assert config.notifiers[0].wants("fine_tune.discovered", "acme/bot/ft_1")


def test_check_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "w.toml",
        {"hub": {"token": "t"}, "discover": [{"namespace": "acme", "repo": "bot", "interval_s": 0}]},
    )
    result = cli("check-config", "-c", str(path))
    assert result.returncode == 78
    assert f"{path}: discover[0].interval_s: " in result.stderr
    good = write_config(
        tmp_path / "ok.toml",
        {
            "hub": {"token": "t"},
            "discover": [{"namespace": "acme", "repo": "bot"}],
            "lifecycle": {"stall_after_s": 3600},
        },
    )
    assert cli("check-config", "-c", str(good)).returncode == 0


def test_the_example_config_documents_both_sections() -> None:
    from watcher.config.load import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "config.example.toml")
    (source,) = config.discover
    assert (source.name, source.namespace, source.repo) == ("support", "acme", "support-bot")
    assert config.lifecycle.idle_interval_s == 600.0
