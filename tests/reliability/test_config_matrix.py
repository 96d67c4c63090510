"""The bad-configuration matrix through the real CLI: `oxen-watcher check-config -c FILE` for every key of every
section, with a value of the wrong type and (where the key has a range, a length, a pattern or an enum) a value
out of it. Each must exit 78 with exactly one line on stderr, `oxen-watcher: FILE: KEY: problem`, naming the key
path exactly (list items by index), and no traceback.

The key list is derived from watcher/config.py's models (ConfigModel.model_fields, recursively), so a new key
without a matrix entry fails test_the_matrix_covers_every_key. tests/test_config.py covers many of these
in-process; this is about completeness through the command line. Every case is a real `python -m watcher`
process; they run a few at a time.
"""

from __future__ import annotations

import base64
import os
import subprocess
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from conftest import cli, toml_value
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from watcher.config.load import ConfigModel

VALID_SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


# --- the keys, from the models -----------------------------------------------------------------------------------


def _model_in(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The config model an annotation holds (directly, or as list items), and whether it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        inner = _model_in(typing.get_args(annotation)[0])
        return (inner[0], True) if inner else None
    return None


def config_keys(model: type[BaseModel] = ConfigModel, prefix: str = "") -> list[str]:
    """Every key path: sections, `fine_tunes[]` for tables in arrays, and each key in them."""
    keys = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        nested = _model_in(info.annotation)
        if nested:
            sub, many = nested
            keys += config_keys(sub, f"{path}[]." if many else f"{path}.")
    return keys


def _field_of(key: str) -> FieldInfo:
    model: type[BaseModel] = ConfigModel
    parts = key.replace("[]", "").split(".")
    for part in parts[:-1]:
        nested = _model_in(model.model_fields[part].annotation)
        assert nested
        model = nested[0]
    return model.model_fields[parts[-1]]


def _constrained_annotation(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Literal:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in annotation.__metadata__:
            if not isinstance(meta, FieldInfo) or meta.metadata:
                return True
    return any(_constrained_annotation(arg) for arg in typing.get_args(annotation))


def has_range(key: str) -> bool:
    """Whether a key takes only some values of its type: bounds, lengths, a pattern, an enum or a validator."""
    if key.endswith("[]") or ("." not in key and _model_in(ConfigModel.model_fields[key].annotation)):
        return False  # a section: only a type
    info = _field_of(key)
    model_name = key.replace("[]", "").rsplit(".", 1)[0]
    owner = _model_in(ConfigModel.model_fields[model_name.split(".")[0]].annotation)
    validated = owner is not None and any(
        key.rsplit(".", 1)[-1] in decorator.info.fields
        for decorator in owner[0].__pydantic_decorators__.field_validators.values()
    )
    return bool(info.metadata) or _constrained_annotation(info.annotation) or validated


# --- the matrix ------------------------------------------------------------------------------------------------------

Kind = Literal["type", "range"]


@dataclass(frozen=True)
class Bad:
    kind: Kind
    value: Any
    where: str = ""  # the reported key path beyond the key itself, e.g. "[1]" for a list item
    xfail: str | None = None


def wrong(value: Any, where: str = "", xfail: str | None = None) -> Bad:
    return Bad("type", value, where, xfail)


def out(value: Any, where: str = "", xfail: str | None = None) -> Bad:
    return Bad("range", value, where, xfail)


TOO_LONG = "x" * 201
MATRIX: dict[str, list[Bad]] = {
    "hub": [wrong(5)],
    "hub.url": [wrong(5), out("ftp://hub.example"), out("https://hub.example/?q=1"), out("")],
    "hub.token": [wrong(5), out("")],
    "hub.token_env": [wrong(["A"]), out("")],
    "hub.token_file": [wrong(True), out("")],
    "hub.timeout_s": [wrong("15"), out(0), out(86401)],
    "hub.max_concurrency": [wrong(1.5), wrong("8"), out(0), out(1025)],
    "watch": [wrong("fast")],
    "watch.interval_s": [wrong("60"), out(0.1), out(86401)],
    "watch.jitter_s": [wrong(True), out(-1), out(3601)],
    "watch.baseline": [wrong("yes"), wrong(1)],
    "watch.failure_threshold": [wrong(2.5), out(0), out(1001)],
    "watch.shutdown_grace_s": [wrong("10"), out(-1), out(3601)],
    "state": [wrong([1])],
    "state.path": [wrong(5), out("")],
    "state.url": [wrong(5), out("")],
    "state.url_env": [wrong(["A"]), out("")],
    "state.url_file": [wrong(True), out("")],
    "state.lease_s": [wrong("15"), out(0), out(3601)],
    "state.renew_s": [wrong("5"), out(0), out(3601)],
    "state.replica": [wrong(5), out("a b"), out(TOO_LONG)],
    "state.retain_days": [wrong("30"), wrong(1.5), out(0), out(-1)],
    "http": [wrong(True)],
    "http.listen": [wrong(9464), out("9464"), out("127.0.0.1:70000"), out("")],
    "http.token": [wrong(5), out("")],
    "http.token_env": [wrong(5), out("")],
    "http.token_file": [wrong(5), out("")],
    "log": [wrong(5)],
    "log.level": [wrong(1), out("verbose"), out("INFO")],
    "log.format": [wrong(True), out("xml")],
    "fine_tunes": [wrong("acme/bot/ft_1"), wrong([5], where="[0]")],
    "fine_tunes[].namespace": [wrong(5), out("a/b"), out(""), out(" acme")],
    "fine_tunes[].repo": [wrong(5), out(""), out("..")],
    "fine_tunes[].id": [wrong(["ft_1"]), out("ft/1"), out(".")],
    "fine_tunes[].name": [wrong(5), out("")],
    "fine_tunes[].interval_s": [wrong("60"), out(0.1), out(86401)],
    "notifiers": [wrong(5), wrong(["x"], where="[0]")],
    "notifiers[].name": [wrong(5), out("bad name!"), out(""), out("x" * 65)],
    "notifiers[].type": [wrong(5), out("email")],
    "notifiers[].url": [wrong(5), out(""), out("ftp://example.com/hook")],
    "notifiers[].url_env": [wrong(5), out("")],
    "notifiers[].url_file": [wrong(5), out("")],
    "notifiers[].secret": [
        wrong(5),
        wrong([VALID_SECRET, 5], where="[1]"),
        out([]),
        out([VALID_SECRET] * 9),
        out("not-a-whsec-secret"),
    ],
    "notifiers[].secret_env": [wrong(True), out("")],
    "notifiers[].secret_file": [wrong(1.5), out(["f", ""], where="[1]")],
    "notifiers[].events": [
        wrong("checkpoint.*"),
        wrong([5], where="[0]"),
        out([]),
        out([""], where="[0]"),
        out([TOO_LONG], where="[0]"),
    ],
    "notifiers[].fine_tunes": [wrong("acme/*"), out([]), out(["acme/*", ""], where="[1]")],
    "notifiers[].timeout_s": [wrong("15"), out(0), out(301)],
    "notifiers[].max_age_s": [wrong("1d"), out(0), out(30 * 86400 + 1)],
    "notifiers[].retry_schedule_s": [
        wrong("5"),
        wrong([0, "5"], where="[1]"),
        out([]),
        out([0, -5], where="[1]"),
        out([0, 5, 86401], where="[2]"),
        out([1] * 51),
    ],
    "notifiers[].max_concurrency": [wrong("4"), out(0), out(65)],
    "notifiers[].digest_over": [wrong("10"), out(0), out(1001)],
    "notifiers[].format": [wrong(1), out("yaml")],
    "discover": [wrong("acme/bot"), wrong([5], where="[0]")],
    "discover[].name": [wrong(5), out(""), out("config")],
    "discover[].namespace": [wrong(5), out("a/b")],
    "discover[].repo": [wrong(5), out("..")],
    "discover[].include": [wrong("*"), out([])],
    "discover[].exclude": [wrong("x"), out([""], where="[0]")],
    "discover[].created_by": [wrong(5), out(" bob")],
    "discover[].interval_s": [wrong("60"), out(0.1)],
    "discover[].max_age_days": [wrong("7"), out(0)],
    "lifecycle": [wrong(5)],
    "lifecycle.status_interval_s": [wrong("60"), out(0)],
    "lifecycle.idle_interval_s": [wrong("600"), out(0.1)],
    "lifecycle.stall_after_s": [wrong(True), out(-1)],
}

# where the bad section, table or key goes: item 1 of an array of tables, after a valid item 0
INDEX = 1


def base_document(folder: Path, key: str) -> dict[str, Any]:
    """A valid config whose item 1 of [[fine_tunes]] / [[notifiers]] suits the key under test."""
    notifier: dict[str, Any] = {
        "name": "hook",
        "type": "webhook",
        "url": "https://example.com/hook",
        "secret": VALID_SECRET,
    }
    name = key.rsplit(".", 1)[-1]
    if key.startswith("notifiers[].") and name == "digest_over":
        notifier = {"name": "chat", "type": "slack", "url": "https://hooks.example.com/services/T0/B0/x"}
    elif key.startswith("notifiers[].") and name == "format":
        notifier = {"name": "print", "type": "log"}
    # other sources of the same secret may stay: a key's own type or range error comes before the
    # "give only one of" check, which runs only on a section whose keys are each valid
    hub: dict[str, Any] = {"url": "https://hub.example", "token": "hub-token-value"}
    return {
        "hub": hub,
        "watch": {"interval_s": 30},
        "state": {"path": str(folder / "w.db")},
        "http": {"listen": "127.0.0.1:9464"},
        "log": {"level": "info"},
        "fine_tunes": [{"namespace": "acme", "repo": "bot", "id": f"ft_{i}"} for i in range(2)],
        "notifiers": [{"name": "log", "type": "log"}, notifier],
        "discover": [{"namespace": "acme", "repo": f"bot{i}"} for i in range(2)],
        "lifecycle": {"stall_after_s": 3600},
    }


def apply(document: dict[str, Any], key: str, value: Any) -> str:
    """Put value at key in document; returns the concrete key path (`notifiers[1].url`)."""
    if "." not in key:
        document[key] = value
        return key
    section, name = key.split(".", 1)
    if section.endswith("[]"):
        section = section.removesuffix("[]")
        document[section][INDEX][name] = value
        return f"{section}[{INDEX}].{name}"
    document[section][name] = value
    return key


def to_toml(document: dict[str, Any]) -> str:
    """TOML for a document whose sections may be of the wrong type (those become top-level keys)."""
    top, tables = [], []
    for section, body in document.items():
        if isinstance(body, dict):
            tables.append(f"[{section}]")
            tables += [f"{k} = {toml_value(v)}" for k, v in body.items()]
            tables.append("")
        elif isinstance(body, list) and body and all(isinstance(item, dict) for item in body):
            for item in body:
                tables.append(f"[[{section}]]")
                tables += [f"{k} = {toml_value(v)}" for k, v in item.items()]
                tables.append("")
        else:
            top.append(f"{section} = {toml_value(body)}")
    return "\n".join([*top, "", *tables])


@dataclass(frozen=True)
class Case:
    id: str
    key: str
    bad: Bad | None  # None: the valid base document
    expected_key: str = ""
    toml: str = ""
    file: Path = field(default=Path())


def cases(folder: Path) -> list[Case]:
    found: list[Case] = []
    bases: set[str] = set()
    for key in sorted(MATRIX):
        base = to_toml(base_document(folder, key))
        if base not in bases:  # each distinct valid base once: it passes, so the failures are the bad values'
            bases.add(base)
            found.append(Case(f"valid-base-for-{key}", key, None, toml=base))
        for number, bad in enumerate(MATRIX[key]):
            document = base_document(folder, key)
            concrete = apply(document, key, bad.value)
            found.append(Case(f"{key}-{bad.kind}-{number}", key, bad, concrete + bad.where, to_toml(document)))
    return [Case(c.id, c.key, c.bad, c.expected_key, c.toml, folder / f"case{i:03d}.toml") for i, c in enumerate(found)]


ALL_CASES = cases(Path("/nonexistent-state-folder"))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, subprocess.CompletedProcess[str]]]:
    """Every case through `python -m watcher check-config -c FILE`, a few processes at a time."""
    folder = tmp_path_factory.mktemp("config-matrix")
    home = folder / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "CREDENTIALS_DIRECTORY": "",
        "STATE_DIRECTORY": "",
        "OXEN_CONFIG_DIR": str(home),
        "OXEN_WATCHER_CONFIG": "",
    }
    prepared = []
    for case in cases(folder):
        case.file.write_text(case.toml)
        prepared.append(case)

    def run(case: Case) -> tuple[Case, subprocess.CompletedProcess[str]]:
        return case, cli("check-config", "-c", str(case.file), env=env)

    with ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) * 2))) as pool:
        return {case.id: (case, result) for case, result in pool.map(run, prepared)}


def _params() -> list[Any]:
    params = []
    for case in ALL_CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.bad.xfail)] if case.bad and case.bad.xfail else []
        params.append(pytest.param(case.id, id=case.id, marks=marks))
    return params


@pytest.mark.parametrize("case_id", _params())
def test_check_config(case_id: str, results: dict[str, tuple[Case, subprocess.CompletedProcess[str]]]) -> None:
    case, result = results[case_id]
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    if case.bad is None:
        assert (result.returncode, result.stderr) == (0, ""), output
        assert "OK" in result.stdout
        return
    assert result.returncode == 78, output
    assert result.stdout == "", output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    prefix = f"oxen-watcher: {case.file}: "
    assert lines[0].startswith(prefix), lines[0]
    # one or more "key: problem" parts, each naming exactly the key under test
    for part in lines[0].removeprefix(prefix).split("; "):
        reported, _, problem = part.partition(": ")
        assert reported == case.expected_key, f"expected key {case.expected_key!r} in {lines[0]!r}"
        assert problem.strip(), lines[0]


def test_the_matrix_covers_every_key() -> None:
    keys = config_keys()
    # the brief's list of keys, as a floor: the models may grow, never shrink silently
    assert {
        "hub.token_file",
        "watch.shutdown_grace_s",
        "http.token_env",
        "fine_tunes[].interval_s",
        "notifiers[].retry_schedule_s",
        "notifiers[].digest_over",
        "notifiers[].format",
    } <= set(keys)
    assert sorted(MATRIX) == sorted(keys), {
        "keys without a matrix entry": sorted(set(keys) - set(MATRIX)),
        "matrix entries for no key": sorted(set(MATRIX) - set(keys)),
    }
    for key in keys:
        kinds = {bad.kind for bad in MATRIX[key]}
        assert "type" in kinds, f"{key}: no wrong-type case"
        if has_range(key):
            assert "range" in kinds, f"{key}: takes only some values of its type, but has no out-of-range case"
        else:
            assert "range" not in kinds, f"{key}: has no range, yet an out-of-range case"


def test_the_matrix_stays_fast_enough() -> None:
    # about a third of a second a process, a few at a time: keep the matrix well under a minute
    assert len(ALL_CASES) < 200
