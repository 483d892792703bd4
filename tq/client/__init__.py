"""Clients: ``Client`` (trio, pipelined), ``AsyncioClient`` (asyncio, pipelined) and
``BlockingClient`` (plain sockets).

Contract: every client is a thin shell over one core (``core.py``: the
session rules of tq.protocol.session, request ids, answers matched to
requests, id-0 farewells); the messages they build and the answers they
parse live once in ``_api.py``, and the methods once in ``_methods.py``
(``_methods_sync.py`` is generated from it). The shells differ only in how
bytes move. May import: tq.core, tq.protocol, tq.security, trio (aio.py and
events.py only), asyncio (asyncio_client.py only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tq.client._api import Event, TaskPage, schedule_task
    from tq.client.aio import Client
    from tq.client.asyncio_client import AsyncioClient
    from tq.client.sync import BlockingClient

__all__ = ["AsyncioClient", "BlockingClient", "Client", "Event", "TaskPage", "schedule_task"]

# Imported on first use (PEP 562), so a one-shot command that needs only the
# blocking client does not pay for trio (~50 ms of `tq submit`'s start-up).
_LAZY = {
    "AsyncioClient": "tq.client.asyncio_client",
    "BlockingClient": "tq.client.sync",
    "Client": "tq.client.aio",
    "TaskPage": "tq.client._api",
    "Event": "tq.client._api",
    "schedule_task": "tq.client._api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tq.client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
