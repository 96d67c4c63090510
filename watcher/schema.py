"""Validation of the Hub's CheckpointListResponse: tolerant where the spec is, strict where it must be."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from .errors import InvalidResponse
from .models import JSON

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
