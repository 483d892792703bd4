"""The broker's network edge: TLS listeners, sessions, dispatch, shutdown.

A session is one connection. Its reader decodes frames with the sans-IO
``Connection`` and starts one task per request, so a connection carries many
requests at once (pipelining); answers go through one writer task that
coalesces whatever is queued into a single ``send_all``. The first message
must be HELLO. A stream-level protocol error (oversize or malformed frame)
gets a NACK with id 0 and the connection is closed; a message-level error
(unknown type, bad field) gets a NACK with the request's id and the session
goes on. Every session runs under a catch-all, so one bad peer never takes
down the listener (see NOTES.md).

Shutdown (SIGINT/SIGTERM via ``shutdown``): stop accepting, refuse new work
with ``unavailable``, give in-flight requests ``drain`` seconds, cancel the
sessions, then close the store, which commits everything already queued.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tq.broker.loops import promoter_loop, reaper_loop
from tq.broker.registry import WorkerInfo
from tq.broker.service import MAX_WAIT, BrokerService, worker_info
from tq.config import Settings, parse_address
from tq.core.errors import ConfigError, InvalidRequest, ProtocolError, TQError
from tq.protocol import Connection
from tq.protocol.connection import MessageError
from tq.security.tls import ensure_broker_tls, fingerprint, server_ssl_context
from tq.store.sqlite import open_sqlite_store

log = logging.getLogger("tq.broker")

HANDSHAKE_TIMEOUT = 10.0
MAX_IN_FLIGHT = 1024
RECEIVE_SIZE = 256 * 1024
DRAIN_SECONDS = 5.0


@dataclass(frozen=True)
class BrokerInfo:
    """What ``serve_broker`` reports once it listens."""

    host: str
    port: int
    ca_file: Path | None
    ca_fingerprint: str | None
    tls_created: bool

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _prepare_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"data directory {path} is not writable ({exc.strerror}); "
            "pass --data DIR with a writable directory or fix its permissions"
        ) from None


def _is_disconnect(exc: BaseException) -> bool:
    """True when every leaf of ``exc`` is an ordinary peer disconnect."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(
        exc, trio.BrokenResourceError | trio.ClosedResourceError | ssl.SSLError | OSError
    )


class Session:
    def __init__(self, service: BrokerService, stream: trio.abc.Stream, max_frame: int) -> None:
        self.service = service
        self.stream = stream
        self.conn = Connection(max_frame)
        self.worker_id: str | None = None
        self.worker: WorkerInfo | None = None
        self.hello_done = False
        self._send, self._outbox = trio.open_memory_channel[bytes](MAX_IN_FLIGHT * 2)
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "submit": self._submit,
            "claim": self._claim,
            "result": self._result,
            "heartbeat": self._heartbeat,
            "query": self._query,
            "cancel": self._cancel,
            "retry": self._retry,
            "wait": self._wait,
        }

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._writer)
                async with trio.open_nursery() as requests:
                    last_word = await self._reader(requests)
                    requests.cancel_scope.cancel()  # the peer is gone or broke the stream
                if last_word is not None:
                    await self._send.send(last_word)
                await self._send.aclose()  # the writer flushes what is queued, then ends
                outer.cancel_scope.deadline = trio.current_time() + 1.0
        finally:
            if self.worker_id is not None:
                self.service.workers.disconnect(self.worker_id)

    async def _writer(self) -> None:
        async for first in self._outbox:
            chunks = [first]
            while True:
                try:
                    chunks.append(self._outbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self.stream.send_all(b"".join(chunks))

    async def _reply(self, message: dict[str, Any]) -> None:
        try:
            frame = self.conn.send(message)
        except TQError as exc:  # e.g. an answer larger than the frame limit
            frame = self.conn.send(Connection.nack(message.get("id", 0), exc))
        await self._send.send(frame)

    async def _reader(self, nursery: trio.Nursery) -> bytes | None:
        """Read and dispatch until EOF; a final NACK frame if the stream broke."""
        while True:
            data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
            if not data:
                return None
            try:
                self.conn.receive_data(data)
                while True:
                    try:
                        msg = self.conn.next_message()
                    except MessageError as exc:  # answerable: NACK it and go on
                        await self._reply(Connection.nack(exc.request_id, exc.cause))
                        continue
                    if msg is None:
                        break
                    if not self.hello_done:
                        await self._hello(msg)
                        continue
                    await self._slots.acquire()
                    nursery.start_soon(self._request, msg)
            except ProtocolError as exc:
                log.warning("closing connection: %s", exc)
                return self.conn.send(Connection.nack(0, exc))

    async def _hello(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        try:
            if msg["t"] != "hello":
                raise InvalidRequest(f"the first message must be hello, not {msg['t']}")
            worker_id = None
            if msg.get("kind") == "worker":
                wid = msg.get("worker_id")
                worker_id = wid if isinstance(wid, str) and wid else secrets.token_hex(8)
            body = self.service.hello(msg, worker_id)
        except TQError as exc:
            await self._reply(Connection.nack(rid, exc))
            return
        self.worker_id = worker_id
        if worker_id is not None:
            self.worker = worker_info(worker_id, msg)
        self.hello_done = True
        await self._reply({"t": "ack", "id": rid, **body, "worker_id": worker_id})

    async def _request(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        try:
            handler = self._handlers.get(msg["t"])
            if handler is None:
                raise InvalidRequest(f"{msg['t']} is not a request a client may send")
            self.service.in_flight += 1
            try:
                reply = {"t": "ack", "id": rid, **await handler(msg)}
            finally:
                self.service.in_flight -= 1
        except TQError as exc:
            reply = Connection.nack(rid, exc)
        except Exception:
            log.exception("internal error handling %s", msg.get("t"))
            reply = Connection.nack(rid, TQError("internal broker error; see the broker's log"))
        finally:
            self._slots.release()
        await self._reply(reply)

    def _need_worker(self, what: str) -> WorkerInfo:
        if self.worker is None:
            raise InvalidRequest(f"{what} is for workers: say hello with kind 'worker' first")
        return self.worker

    # -- handlers: decode, call one service method, encode --------------
    async def _submit(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"tasks": await self.service.submit(msg["tasks"])}

    async def _claim(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"tasks": await self.service.claim(self._need_worker("claim").id, msg)}

    async def _result(self, msg: dict[str, Any]) -> dict[str, Any]:
        worker = self._need_worker("result")
        return {"results": await self.service.report(worker.id, msg["results"])}

    async def _heartbeat(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"lost": await self.service.heartbeat(self._need_worker("heartbeat"), msg)}

    async def _query(self, msg: dict[str, Any]) -> dict[str, Any]:
        q = msg["q"]
        if q == "get":
            return {"task": (await self.service.get(_task_id(msg))).to_dict()}
        if q == "list":
            tasks, cursor = await self.service.list_tasks(msg)
            return {"tasks": [t.to_dict() for t in tasks], "next": cursor}
        if q == "stats":
            return {"stats": await self.service.stats()}
        if q == "workers":
            return {"workers": self.service.list_workers()}
        raise InvalidRequest(f"unknown query {q!r}; known: get, list, stats, workers")

    async def _cancel(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"task": (await self.service.cancel(msg["task"])).to_dict()}

    async def _retry(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"task": (await self.service.retry(msg["task"])).to_dict()}

    async def _wait(self, msg: dict[str, Any]) -> dict[str, Any]:
        timeout = msg.get("timeout", MAX_WAIT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise InvalidRequest("wait timeout must be a number >= 0")
        task, timed_out = await self.service.wait(msg["task"], min(float(timeout), MAX_WAIT))
        return {"task": task.to_dict(), "timed_out": timed_out}


def _task_id(msg: dict[str, Any]) -> str:
    task_id = msg.get("task")
    if not isinstance(task_id, str):
        raise InvalidRequest("query get needs 'task' (a task id string)")
    return task_id


async def _serve_connection(
    stream: trio.SocketStream,
    service: BrokerService,
    settings: Settings,
    ssl_context: ssl.SSLContext | None,
) -> None:
    peer = "?"
    try:
        peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        wrapped: trio.abc.Stream = stream
        if ssl_context is not None:
            tls = trio.SSLStream(stream, ssl_context, server_side=True)
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
            wrapped = tls
        await Session(service, wrapped, settings.max_frame).run()
        with trio.move_on_after(1.0):
            await wrapped.aclose()  # a TLS close_notify, so the peer sees a clean end
    except trio.TooSlowError:
        log.warning("%s: TLS handshake not completed within %ss; dropped", peer, HANDSHAKE_TIMEOUT)
    except Exception as exc:
        if _is_disconnect(exc):
            log.debug("%s: connection closed: %r", peer, exc)
        else:
            log.exception("%s: connection dropped after an internal error", peer)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_broker(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[BrokerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker until ``shutdown`` is set (or the caller cancels)."""
    _prepare_data_dir(settings.data)
    host, port = parse_address(settings.listen)
    ssl_context = None
    ca_file, ca_print, created = None, None, False
    if not settings.insecure:
        files, created = ensure_broker_tls(settings.tls_dir, settings.tls_san)
        ssl_context = server_ssl_context(files)
        ca_file, ca_print = files.ca_cert, fingerprint(files.ca_cert)
    shutdown = trio.Event() if shutdown is None else shutdown
    async with open_sqlite_store(settings.db_path, synchronous=settings.synchronous) as store:
        service = BrokerService(store, lease_ttl=settings.lease_ttl)
        async with trio.open_nursery() as timers:
            timers.start_soon(
                reaper_loop, service, min(1.0, settings.lease_ttl / 4), settings.lease_ttl
            )
            timers.start_soon(promoter_loop, service)
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {settings.listen}: {exc.strerror}; "
                    "is another broker running there? pass --listen HOST:PORT"
                ) from None
            bound = listeners[0].socket.getsockname()
            async with trio.open_nursery() as sessions:
                accept = trio.CancelScope()

                async def handler(stream: trio.SocketStream) -> None:
                    await _serve_connection(stream, service, settings, ssl_context)

                async def accept_loop() -> None:
                    with accept:
                        await trio.serve_listeners(handler, listeners, handler_nursery=sessions)

                sessions.start_soon(accept_loop)
                task_status.started(BrokerInfo(bound[0], bound[1], ca_file, ca_print, created))
                log.info(
                    "broker listening on %s:%s (%s)",
                    bound[0],
                    bound[1],
                    "plaintext" if ssl_context is None else "TLS",
                )
                await shutdown.wait()
                log.info("shutting down: no new connections, draining in-flight requests")
                accept.cancel()
                service.closing = True
                service.notify_work()  # long-polling claims return empty
                with trio.move_on_after(DRAIN_SECONDS):
                    while service.in_flight:
                        await trio.sleep(0.02)
                sessions.cancel_scope.cancel()
            timers.cancel_scope.cancel()
    log.info("broker stopped; store closed cleanly")
