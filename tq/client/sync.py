"""The blocking client: the same API as ``Client``, over a plain socket.

For scripts, threads (the Textual console's workers) and any code without a
trio loop. One request at a time per client (a lock makes it safe to share
between threads); batch with ``submit_many`` for throughput. Messages and
parsing come from ``_api.py``, exactly as in the trio client.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tq.client import _api as api
from tq.config import Settings, parse_address
from tq.core.errors import ConnectionFailed, TLSFailure, TQError
from tq.core.task import Task
from tq.protocol import Connection
from tq.protocol.connection import MessageError
from tq.security.tls import client_ssl_context, describe_tls_error

T = TypeVar("T")


class BlockingClient:
    def __init__(
        self,
        address: str,
        *,
        ca: Path | None = None,
        insecure: bool = False,
        kind: str = "client",
        name: str = "",
        hello: Mapping[str, Any] | None = None,
        max_frame: int = 16 * 1024 * 1024,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self._conn = Connection(max_frame)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sock = _open_socket(address, ca=ca, insecure=insecure, timeout=timeout)
        self._sock.settimeout(None)
        try:
            self.server = self._request(api.hello(kind, name, hello), timeout)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> BlockingClient:
        return cls(
            settings.broker,
            ca=settings.ca_file(),
            insecure=settings.insecure,
            max_frame=settings.max_frame,
            **kwargs,
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        with self._lock:
            rid = next(self._ids)
            self._sock.settimeout(timeout)
            try:
                self._sock.sendall(self._conn.send({**message, "id": rid}))
                while True:
                    msg = self._conn.next_message()
                    if msg is None:
                        data = self._sock.recv(256 * 1024)
                        if not data:
                            raise api.connection_lost(self.address)
                        self._conn.receive_data(data)
                        continue
                    if msg["id"] == rid or (msg["id"] == 0 and msg["t"] == "nack"):
                        return api.raise_for_nack(msg)
            except MessageError as exc:
                raise exc.cause from None
            except TimeoutError:
                raise ConnectionFailed(
                    f"the broker at {self.address} did not answer within {timeout:g}s"
                ) from None
            except ssl.SSLError as exc:
                raise TLSFailure(describe_tls_error(exc, self.address, None)) from None
            except OSError:
                raise api.connection_lost(self.address) from None
            finally:
                self._sock.settimeout(None)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._request(message)

    def _call(self, call: api.Call[T], timeout: float | None = None) -> T:
        return call.parse(self._request(call.message, timeout))

    # -- the client API (same names and arguments as Client) ------------
    def submit(self, type: str, payload: Any = None, **options: Any) -> str:
        return self.submit_many([api.task_spec(type, payload, **options)])[0]

    def submit_many(self, specs: Sequence[Mapping[str, Any]]) -> list[str]:
        return self._call(api.submit_many(specs))

    def get(self, task_id: str) -> Task:
        return self._call(api.get(task_id))

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            task, timed_out = self._call(api.wait_step(task_id, remaining))
            if not timed_out:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise api.wait_timed_out(task, timeout)

    def list(self, **filters: Any) -> api.TaskPage:
        return self._call(api.list_tasks(**filters))

    def cancel(self, task_id: str) -> Task:
        return self._call(api.cancel(task_id))

    def retry(self, task_id: str) -> Task:
        return self._call(api.retry(task_id))

    def stats(self) -> dict[str, Any]:
        return self._call(api.stats())

    def workers(self) -> builtins.list[dict[str, Any]]:
        return self._call(api.workers())


def _open_socket(address: str, *, ca: Path | None, insecure: bool, timeout: float) -> socket.socket:
    host, port = parse_address(address)
    context = None
    if not insecure:
        if ca is None:
            raise api.missing_ca(address)
        context = client_ssl_context(ca)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise ConnectionFailed(f"connecting to the broker at {address} timed out") from None
    except OSError as exc:
        raise api.connect_failed(address, exc) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise TLSFailure(describe_tls_error(exc, address, ca)) from None


__all__ = ["BlockingClient", "TQError"]
