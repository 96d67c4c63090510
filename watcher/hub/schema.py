"""Validation of the Hub's answers (checkpoint lists, fine-tunes): tolerant where the spec is, strict where needed."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from watcher.core.models import JSON, HubFineTune
from watcher.core.models import parse_time as parse_time  # moved to core; kept importable here
from watcher.errors import InvalidResponse

Number = StrictInt | StrictFloat


class _Metrics(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    epoch: Number | None = None
    grad_norm: Number | None = None
    learning_rate: Number | None = None
    loss: Number | None = None
    mean_token_accuracy: Number | None = None


class _Checkpoint(BaseModel):
    # Extra keys are tolerated (the spec may grow); the spec's nullable fields, and a few it does not
    # mark nullable but a tolerant reader accepts as null, may be null.
    model_config = ConfigDict(extra="allow", strict=True)
    step: StrictInt
    created_at: StrictStr | None = None
    deployment_status: StrictStr | None = None
    inference_samples: list[dict[str, Any]] | None = None
    metrics: _Metrics | None = None
    model_id: StrictStr | None = None
    model_name: StrictStr | None = None
    path: StrictStr | None = None
    size_bytes: StrictInt | None = None


class _CheckpointList(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    checkpoints: list[_Checkpoint]
    branch: StrictStr | None = None
    fine_tune_id: StrictStr | None = None
    status: StrictStr | None = None
    status_message: StrictStr | None = None
    total_checkpoints: StrictInt | None = None


_validator = TypeAdapter(_CheckpointList)
_STEP_LIMIT = 2**63


def body_hash(body: bytes) -> str:
    """A short, fast digest of a response body: equal digests mean nothing to diff."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def parse_checkpoint_list(body: bytes) -> tuple[JSON, ...]:
    """The checkpoints of a 200 body, as the Hub sent them, sorted by step; InvalidResponse otherwise."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidResponse(f"body is not JSON ({err.msg} at byte {err.pos})", http_status=200) from err
    if not isinstance(document, dict):
        raise InvalidResponse("body is not a JSON object", http_status=200)
    try:
        _validator.validate_python(document)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidResponse(
            f"body breaks the CheckpointListResponse schema at {where}: {first['msg']}", http_status=200
        ) from err
    except RecursionError as err:
        raise InvalidResponse("body is nested too deeply", http_status=200) from err
    try:
        # what the parser accepts (about 1,000 levels) the serializer may refuse (about 250): fingerprints,
        # stored state and event envelopes (a checkpoint sits 3 levels down in one) serialize every checkpoint,
        # so refuse such a body here, as this poll's error; the wrapping leaves room for the envelope
        orjson.dumps([[[[document["checkpoints"]]]]])
    except TypeError as err:
        raise InvalidResponse(f"body cannot be stored: {err}", http_status=200) from err
    checkpoints: list[JSON] = document["checkpoints"]
    steps = [checkpoint["step"] for checkpoint in checkpoints]
    if any(not -_STEP_LIMIT <= step < _STEP_LIMIT for step in steps):
        raise InvalidResponse("body has a step outside the 64-bit range", http_status=200)
    if len(set(steps)) != len(steps):
        raise InvalidResponse("body lists the same step twice", http_status=200)
    if any(steps[i] > steps[i + 1] for i in range(len(steps) - 1)):
        checkpoints = sorted(checkpoints, key=lambda checkpoint: checkpoint["step"])
    return tuple(checkpoints)


# --- fine-tunes ------------------------------------------------------------------------------------------


class _CreatedBy(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    username: StrictStr | None = None


class _FineTune(BaseModel):
    # Only `id` is required (it names the fine-tune in every URL and in state); every other field may be
    # missing or null (list entries carry fewer fields), extra keys are kept, and `status` is any string.
    model_config = ConfigDict(extra="allow", strict=True)
    id: Annotated[StrictStr, Field(min_length=1, max_length=512)]
    name: StrictStr | None = None
    status: StrictStr | None = None
    # `error` is documented without a shape: a string, or an object such as {"message": ...}
    error: StrictStr | dict[str, Any] | None = None
    base_model: StrictStr | None = None
    created_by: _CreatedBy | StrictStr | None = None
    created_at: StrictStr | None = None
    updated_at: StrictStr | None = None
    started_at: StrictStr | None = None
    finished_at: StrictStr | None = None


class _FineTuneList(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    fine_tunes: list[_FineTune]


class _FineTuneAnswer(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    fine_tune: _FineTune


_list_validator = TypeAdapter(_FineTuneList)
_one_validator = TypeAdapter(_FineTuneAnswer)


def _document(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidResponse(f"body is not JSON ({err.msg} at byte {err.pos})", http_status=200) from err
    if not isinstance(document, dict):
        raise InvalidResponse("body is not a JSON object", http_status=200)
    return document


def _validate(validator: TypeAdapter[Any], document: dict[str, Any], schema: str) -> None:
    try:
        validator.validate_python(document)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidResponse(f"body breaks the {schema} schema at {where}: {first['msg']}", http_status=200) from err
    except RecursionError as err:
        raise InvalidResponse("body is nested too deeply", http_status=200) from err


def _error_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        for key in ("message", "title", "detail", "error"):
            if isinstance(value.get(key), str) and value[key]:
                return str(value[key])
        return orjson.dumps(value).decode()[:2000] if value else None
    return None


def _username(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("username"), str):
        return value["username"] or None
    return None


def _hub_fine_tune(raw: dict[str, Any]) -> HubFineTune:
    def text(key: str) -> str | None:
        value = raw.get(key)
        return value if isinstance(value, str) else None

    return HubFineTune(
        id=raw["id"],
        name=text("name"),
        status=text("status"),
        error=_error_text(raw.get("error")),
        base_model=text("base_model"),
        created_by=_username(raw.get("created_by")),
        created_at=text("created_at"),
        updated_at=text("updated_at"),
        started_at=text("started_at"),
        finished_at=text("finished_at"),
        raw=raw,
    )


def parse_fine_tune_list(body: bytes) -> tuple[HubFineTune, ...]:
    """The fine-tunes of one list page, in the Hub's order; InvalidResponse when the body breaks the schema."""
    document = _document(body)
    _validate(_list_validator, document, "fine-tune list")
    return tuple(_hub_fine_tune(entry) for entry in document["fine_tunes"])


def parse_fine_tune(body: bytes) -> HubFineTune:
    """The fine-tune of a `GET .../fine_tunes/{id}` answer; InvalidResponse when the body breaks the schema."""
    document = _document(body)
    _validate(_one_validator, document, "fine-tune")
    return _hub_fine_tune(document["fine_tune"])
