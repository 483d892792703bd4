"""Clients: ``Client`` (trio, pipelined) and ``BlockingClient`` (plain sockets).

Contract: both speak the sans-IO protocol of tq.protocol; the messages they
build and the answers they parse live once in ``_api.py``, so the two
differ only in how bytes move. The same test suite runs against both.
May import: tq.core, tq.protocol, tq.security, trio (aio.py only).
"""

from tq.client._api import TaskPage
from tq.client.aio import Client
from tq.client.sync import BlockingClient

__all__ = ["BlockingClient", "Client", "TaskPage"]
