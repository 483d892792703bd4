"""A Starlette application that submits a task per request and awaits its result.

    hypercorn app:app --bind 127.0.0.1:8000     (from this directory)
    curl -s -X POST localhost:8000/slugs -d '{"title": "Hello, World!"}'

One ``AsyncioClient`` (tq's client for asyncio) serves every request
concurrently on one connection: no threads, and the event loop never blocks.
It is opened on first use and opened again once the broker has closed it (a
restart, its idle timeout), so the application starts, and answers 503, while
the broker is away; the lifespan closes it. The same code runs under FastAPI
(``FastAPI(lifespan=lifespan)``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tasks import slugify

import tq
import tq.tasks
from tq.client import AsyncioClient
from tq.core.errors import Timeout, TQError


class Broker:
    """The application's connection to the broker, (re)opened when needed."""

    def __init__(self) -> None:
        self.client: AsyncioClient | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> AsyncioClient:
        async with self._lock:
            if self.client is None or self.client.error is not None:
                await self.close()
                # the settings `tq` itself uses: TQ_BROKER, TQ_CA, TQ_KEY, the config
                # file, or tq.configure(...); else the local `tq up`
                settings = tq.tasks.default_settings()
                self.client = await AsyncioClient.open_from_settings(settings)
            return self.client

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()


broker = Broker()


async def create_slug(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
    try:
        # checked against slugify's signature before it is sent: a TypeError names the field
        handle = await slugify.with_options(client=await broker.get()).submit(**body)
    except TypeError as exc:
        return JSONResponse({"error": str(exc)}, status_code=422)
    except TQError as exc:  # the broker is unreachable, refused the key, ...
        return JSONResponse({"error": str(exc)}, status_code=503)
    try:
        slug = await handle.result(timeout=10.0)
    except Timeout:
        return JSONResponse({"id": handle.id, "state": "unfinished"}, status_code=202)
    except tq.TaskFailed as exc:
        return JSONResponse({"id": handle.id, "error": str(exc)}, status_code=502)
    except TQError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse({"id": handle.id, "slug": slug})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await broker.close()


app = Starlette(routes=[Route("/slugs", create_slug, methods=["POST"])], lifespan=lifespan)
