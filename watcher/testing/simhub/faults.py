"""Fault injection of the simulated Hub: what a fault is, which request it answers, and how it answers."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web

Endpoint = Literal["checkpoints", "fine_tune", "list"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One injected answer: a status with an optional Retry-After, a raw body, a delay, or a cut connection."""

    status: int = 503
    retry_after: str | None = None
    body: bytes | None = None
    content_type: str = "application/json"
    delay_s: float = 0.0
    truncate: bool = False  # announce a longer body than is sent, then close the connection
    trickle_s: float = 0.0  # send the body a byte at a time, spread over this many seconds
    times: int | None = 1  # how many requests it answers; None: until cleared
    endpoint: Endpoint | None = None  # only requests to this endpoint (checkpoints, fine_tune, list); None: any


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the simulated Hub received."""

    at: float
    key: str  # "namespace/repo/id", or "namespace/repo" for a list
    status: int
    authorized: bool
    endpoint: Endpoint = "checkpoints"


def error_body(kind: str, title: str) -> bytes:
    """The Hub's error envelope."""
    return orjson.dumps({"error": {"type": kind, "title": title}, "status": "error", "status_message": kind})


def _fault_fields(fault: Fault) -> dict[str, Any]:
    return {name: getattr(fault, name) for name in Fault.__dataclass_fields__}


def next_fault(queues: tuple[deque[Fault] | None, ...], endpoint: Endpoint, *, explicit: bool = False) -> Fault | None:
    """Take the first fault for this endpoint from the first queue that has one (global faults first);
    `explicit`: only faults naming this endpoint."""
    for faults in queues:
        if not faults:
            continue
        for index, fault in enumerate(faults):
            if fault.endpoint != endpoint and (explicit or fault.endpoint is not None):
                continue
            if fault.times is not None:
                if fault.times <= 1:
                    del faults[index]
                else:
                    faults[index] = Fault(**{**_fault_fields(fault), "times": fault.times - 1})
            return fault
    return None


async def answer_fault(request: web.Request, fault: Fault) -> web.StreamResponse:
    """Answer a request the way an injected fault says (delay, status, Retry-After, trickle, cut)."""
    if fault.delay_s:
        await asyncio.sleep(fault.delay_s)
    body = fault.body if fault.body is not None else error_body("unknown_error", f"Injected {fault.status}")
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    if fault.trickle_s:
        response = web.StreamResponse(status=fault.status, headers=headers)
        response.content_type = fault.content_type
        response.content_length = len(body)
        await response.prepare(request)
        for index in range(len(body)):
            await response.write(body[index : index + 1])
            await asyncio.sleep(fault.trickle_s / max(1, len(body)))
        return response
    if fault.truncate:
        response = web.StreamResponse(status=fault.status, headers=headers)
        response.content_type = fault.content_type
        response.content_length = len(body) * 2 + 10
        await response.prepare(request)
        await response.write(body[: max(1, len(body) // 2)])
        if request.transport is not None:
            request.transport.close()
        return response
    return web.Response(status=fault.status, body=body, headers=headers, content_type=fault.content_type)
