"""The broker's byte stream (tq/broker/wire.py) and the session's use of it: answers
written without awaiting keep their order, a peer that does not read holds a bounded
amount of them, a peer gone with answers pending ends its session cleanly, a cancelled
read drops nothing, and a TLS connection the broker closes ends with a close_notify."""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio

from tq.broker import server as server_module
from tq.broker import service as service_module
from tq.broker.wire import WireStream
from tq.client.aio import open_stream
from tq.protocol import Connection
from tq.security.tls import client_ssl_context, ensure_broker_tls, server_ssl_context
from tq.testing import running_broker

CHUNK = 64 * 1024


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


async def _tls_pair(tmp_path: Path) -> tuple[WireStream, trio.SSLStream[trio.SocketStream]]:
    files, _ = ensure_broker_tls(tmp_path / "tls")
    server_raw, client_raw = _pair()
    server = WireStream(server_raw, server_ssl_context(files))
    client = trio.SSLStream(
        client_raw, client_ssl_context(files.ca_cert), server_hostname="localhost"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return server, client


def _numbered(count: int) -> list[bytes]:
    return [i.to_bytes(4, "big") * (CHUNK // 4) for i in range(count)]


async def _read_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await stream.receive_some(1 << 20)
        assert data, f"EOF after {len(got)} of {size} bytes"
        got += data
    return bytes(got)


@pytest.mark.trio
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_what_the_socket_does_not_take_waits_in_order(tmp_path: Path, tls: bool) -> None:
    if tls:
        server, client = await _tls_pair(tmp_path)
        peer: trio.abc.Stream = client
    else:
        raw, peer = _pair()
        server = WireStream(raw)
    chunks = _numbered(256)  # 16 MiB: far more than the socket buffers hold
    for chunk in chunks:
        server.write_nowait(chunk)  # never waits
    assert server.pending, "the peer reads nothing yet: the rest waits in the stream"
    async with server, peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.flush)  # the session's writer
            received = await _read_exactly(peer, len(chunks) * CHUNK)
        assert received == b"".join(chunks)
        assert not server.pending


@pytest.mark.trio
async def test_a_peer_gone_with_bytes_pending_fails_the_flush_not_the_writer(
    tmp_path: Path,
) -> None:
    raw, peer = _pair()
    server = WireStream(raw)
    for chunk in _numbered(64):
        server.write_nowait(chunk)
    assert server.pending
    await peer.aclose()
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(5):
            await server.flush()
    assert not server.pending, "a dead peer's answers are dropped, not kept"
    server.write_nowait(b"more")  # no exception where an answer is written
    assert not server.pending
    await server.aclose()
    server.write_nowait(b"after close")  # the closed socket's number is never written to
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()


@pytest.mark.trio
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_cancelled_read_drops_nothing(tmp_path: Path, tls: bool) -> None:
    if tls:
        server, client = await _tls_pair(tmp_path)
        peer: trio.abc.Stream = client
    else:
        raw, peer = _pair()
        server = WireStream(raw)
    async with server, peer:
        await peer.send_all(b"first request")
        await trio.sleep(0.05)  # the bytes are in the broker's socket buffer
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.receive_some()
        assert scope.cancelled_caught
        with trio.fail_after(5):
            assert await server.receive_some() == b"first request"


def test_the_broker_refuses_tls_renegotiation(tmp_path: Path) -> None:
    """A TLS 1.2 peer renegotiating would make an answer's write wait for a read."""
    files, _ = ensure_broker_tls(tmp_path / "tls")
    assert server_ssl_context(files).options & ssl.OP_NO_RENEGOTIATION


@pytest.mark.trio
async def test_closing_a_tls_stream_sends_close_notify(tmp_path: Path) -> None:
    server, client = await _tls_pair(tmp_path)
    server.write_nowait(b"last answer")
    await server.aclose()
    async with client:
        with trio.fail_after(5):
            assert await _read_exactly(client, 11) == b"last answer"
            assert await client.receive_some() == b"", "a clean TLS end, not a bare disconnect"


@pytest.mark.trio
async def test_a_peers_close_notify_reads_as_the_end(tmp_path: Path) -> None:
    # a peer that ends with a close_notify (Node's socket.end(), trio's aclose) must read
    # as b"" at once: SSLObject.read answers b"" then, and the stream must not spin on it
    server, client = await _tls_pair(tmp_path)
    await client.send_all(b"last request")
    await client.aclose()  # a close_notify, then the socket closes
    async with server:
        with trio.fail_after(5):
            assert await _read_exactly(server, 12) == b"last request"
            assert await server.receive_some() == b""


async def _hello(broker: Any) -> tuple[trio.abc.Stream, Connection]:
    stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
    conn = Connection()
    await stream.send_all(
        conn.send({"t": "hello", "id": 1, "v": 1, "kind": "client", "key": broker.key})
    )
    answer = await _next(stream, conn)
    assert answer is not None and answer["t"] == "ack", answer
    return stream, conn


async def _next(stream: trio.abc.Stream, conn: Connection) -> dict[str, Any] | None:
    with trio.fail_after(30):
        while (msg := conn.next_message()) is None:
            data = await stream.receive_some(1 << 20)
            if not data:
                return None
            conn.receive_data(bytes(data))
    return msg


@pytest.mark.trio
async def test_a_peer_that_does_not_read_its_point_reads_stalls_its_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``get`` is answered by the session's reader: with the answers unread, the
    reader waits once OUTBOX_BYTES are queued, so the broker holds a bounded amount."""
    calls = 0
    original = service_module.BrokerService.get

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(service_module.BrokerService, "get", counted)
    monkeypatch.setattr(server_module, "OUTBOX_BYTES", 4 * 1024 * 1024)
    async with running_broker(tmp_path) as broker:
        async with broker.client() as client:
            (task,) = await client.submit_many([{"type": "t", "payload": "x" * (1 << 20)}])
        stream, conn = await _hello(broker)
        async with stream:
            count = 100  # 100 MiB of answers
            await stream.send_all(
                b"".join(
                    conn.send({"t": "query", "id": 10 + i, "q": "get", "task": task})
                    for i in range(count)
                )
            )
            await trio.sleep(1)  # the broker answers what it may while nobody reads
            # unbounded, all 100 would be built; bounded: 4 MiB queued, one answer more,
            # and what the kernel's socket buffers (both ends, autotuned) take
            assert calls <= 40, f"{calls} answers of 1 MiB built for a peer that reads none"
            for i in range(count):  # then every answer comes, in order
                answer = await _next(stream, conn)
                assert answer is not None and answer["t"] == "ack", answer
                assert answer["id"] == 10 + i and answer["task"]["id"] == task
        assert calls == count


@pytest.mark.trio
async def test_a_depth_behind_a_slow_expensive_read_does_not_stop_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``depth`` is answered by the reader unless another expensive read holds the
    connection's turn: then it waits in a task of its own, and requests behind it
    (here a ``get``) are read and answered meanwhile."""
    entered, release = trio.Event(), trio.Event()
    original = service_module.BrokerService.stats

    async def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered.set()  # the stats holds the connection's turn for expensive reads
        await release.wait()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(service_module.BrokerService, "stats", slow)
    async with running_broker(tmp_path) as broker:
        async with broker.client() as client:
            (task,) = await client.submit_many([{"type": "t"}])
        stream, conn = await _hello(broker)
        async with stream:
            await stream.send_all(conn.send({"t": "query", "id": 10, "q": "stats"}))
            with trio.fail_after(10):
                await entered.wait()
            await stream.send_all(
                conn.send({"t": "query", "id": 11, "q": "depth"})
                + conn.send({"t": "query", "id": 12, "q": "get", "task": task})
            )
            first = await _next(stream, conn)
            assert first is not None and first["id"] == 12, first
            release.set()
            rest = [await _next(stream, conn), await _next(stream, conn)]
            assert [a["id"] for a in rest if a is not None and a["t"] == "ack"] == [10, 11]


@pytest.mark.trio
async def test_a_peer_gone_with_answers_pending_ends_only_its_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tq")
    async with running_broker(tmp_path) as broker:
        async with broker.client() as client:
            (task,) = await client.submit_many([{"type": "t", "payload": "x" * (1 << 20)}])
        stream, conn = await _hello(broker)
        await stream.send_all(
            b"".join(
                conn.send({"t": "query", "id": 10 + i, "q": "get", "task": task}) for i in range(40)
            )
        )
        await trio.sleep(0.5)  # answers pile up unread
        await trio.aclose_forcefully(stream)
        async with broker.client() as client:  # the broker goes on
            with trio.fail_after(10):
                assert (await client.get(task)).id == task
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.trio
async def test_the_broker_ends_a_tls_connection_with_close_notify(tmp_path: Path) -> None:
    async with running_broker(tmp_path, hello_timeout=0.5) as broker:
        stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
        conn = Connection()
        answer = await _next(stream, conn)  # no hello: a NACK, then the broker closes
        assert answer is not None and answer["t"] == "nack" and answer["id"] == 0, answer
        with trio.fail_after(10):
            assert await stream.receive_some(1 << 16) == b"", "a TLS close_notify ends it"
        await stream.aclose()
