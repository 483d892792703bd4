"""A Starlette application that submits a task per request and awaits its result.

    hypercorn app:app --bind 127.0.0.1:8000     (from this directory)
    curl -s -X POST localhost:8000/slugs -d '{"title": "Hello, World!"}'

tq's ``Client`` runs on trio, not asyncio, so this application uses the
blocking client from worker threads (``anyio.to_thread``): each thread keeps
one connection, opened on first use and reopened if the broker closed it.
The event loop never blocks; the thread pool (40 threads by default) bounds
how many requests wait at once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tasks import slugify

import tq
import tq.tasks
from tq.core.errors import Timeout, TQError


async def create_slug(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
    try:
        # checked against slugify's signature before it is sent: a TypeError names the field
        submit = functools.partial(slugify.submit_sync, **body)
        handle = await anyio.to_thread.run_sync(submit)
    except TypeError as exc:
        return JSONResponse({"error": str(exc)}, status_code=422)
    try:
        slug = await anyio.to_thread.run_sync(handle.result, 10.0)
    except Timeout:
        return JSONResponse({"id": handle.id, "state": "unfinished"}, status_code=202)
    except tq.TaskFailed as exc:
        return JSONResponse({"id": handle.id, "error": str(exc)}, status_code=502)
    except TQError as exc:  # the broker is unreachable, refused the key, ...
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse({"id": handle.id, "slug": slug})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    tq.tasks.close()  # the worker threads' connections


app = Starlette(routes=[Route("/slugs", create_slug, methods=["POST"])], lifespan=lifespan)
