"""RFC 9457 problem documents: the one place that maps tq error codes to HTTP.

A problem is ``application/problem+json``::

    {"type": "urn:tq:problem:not_found", "title": "Not Found", "status": 404,
     "detail": "no task with id ...", "code": "not_found", "instance": "/api/v1/tasks/..."}

``type`` names the tq error code (stable, the same codes as the wire's
NACKs, docs/PROTOCOL.md §8); ``detail`` is the human sentence. Errors that
HTTP itself raises (unknown route, wrong method, unreadable body) get the
codes ``not_found``, ``method_not_allowed``, ``invalid`` and
``unsupported_media_type``.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tq.core.errors import TQError

PROBLEM_TYPE = "urn:tq:problem:"
MEDIA_TYPE = "application/problem+json"

STATUS_BY_CODE: dict[str, int] = {
    "invalid": 400,
    "protocol": 400,
    "unknown_message": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "invalid_transition": 409,
    "payload_too_large": 413,
    "frame_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "error": 500,
    "store": 503,
    "unavailable": 503,
}


def status_for(code: str) -> int:
    return STATUS_BY_CODE.get(code, 500)


def problem(
    code: str,
    detail: str,
    *,
    status: int | None = None,
    instance: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    status = status or status_for(code)
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance is not None:
        body["instance"] = instance
    extra = dict(headers or {})
    if retry_after is not None:
        extra["Retry-After"] = str(max(1, round(retry_after)))
    if code == "unauthorized":
        extra["WWW-Authenticate"] = 'Bearer realm="tq"'
    return Response(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=extra,
    )


def from_error(exc: TQError, request: Request | None = None) -> Response:
    retry_after = exc.retry_after
    if retry_after is None and exc.code in ("store", "unavailable"):
        retry_after = 1.0
    return problem(
        exc.code,
        exc.message or str(exc),
        instance=None if request is None else request.url.path,
        retry_after=retry_after,
    )
