"""The broker's byte stream: a socket, with TLS done through a memory BIO, that can
write without awaiting.

Contract: ``WireStream`` is a ``trio.abc.Stream`` (``receive_some``,
``send_all``, ``aclose``) over one accepted ``trio.SocketStream``, plaintext
or TLS (``ssl.SSLObject`` over two ``ssl.MemoryBIO``). What it adds is
``write_nowait``: encrypt an answer and put it on the socket at once, in the
caller's turn of the event loop, with no task switch and no await. What the
kernel does not take stays in ``pending`` (ciphertext, in order) until one
task, the session's writer, ``flush``-es it once the socket is writable again:
a session answers most requests without waking any other task.

Invariants: every byte OpenSSL produces (answers, the TLS 1.3 session
tickets held back from the handshake, a key update answering one of the
peer's, the close_notify) is appended to ``pending`` in the order it was
produced, and ``pending`` goes to the socket front first, so records are never
reordered. ``write_nowait`` never raises: a socket error is kept and raised by
the next ``flush`` (the writer's), where the session learns that its peer is
gone, as it would from ``send_all``. Only one task may ``flush`` at a time
(trio allows one waiter for writability per socket); the session's writer is
that task once the session runs.

Why (docs/BENCHMARKS.md, "What mattered"): with ``trio.SSLStream`` and a
writer task fed by a memory channel, each answer cost a channel send, a task
wake-up and ``send_all``'s two scheduler checkpoints; measured A/B, writing
directly takes a ``get``'s broker CPU down by about a fifth.

May import: trio, ssl, os.
"""

from __future__ import annotations

import contextlib
import os
import ssl

import trio

RECEIVE_SIZE = 256 * 1024


class WireStream(trio.abc.Stream):
    """A socket stream, plaintext or TLS, with a non-blocking write path."""

    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext | None = None) -> None:
        self.transport = transport
        self._socket = transport.socket  # its fileno() is -1 once closed: never a reused fd
        self.pending = bytearray()  # bytes written, not yet taken by the kernel
        self._stuck = trio.Event()  # set while ``pending`` waits for the writer
        self._error: BaseException | None = None  # the socket failed while writing
        self._closed = False
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None  # read by gate.send_alert
        self._ssl: ssl.SSLObject | None = None
        self._held = b""  # TLS 1.3 session tickets: sent with the first answer
        if context is not None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    # -- writing ------------------------------------------------------------------

    def write_nowait(self, data: bytes) -> None:
        """Queue ``data`` and send what the socket takes now; never waits or raises."""
        if self._error is not None or self._closed:
            return  # the writer's flush raises the error; the peer is gone
        if self._ssl is not None:
            assert self._outgoing is not None
            try:
                self._ssl.write(data)
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if self._held:
                self.pending += self._held
                self._held = b""
            self.pending += self._outgoing.read()
        else:
            self.pending += data
        self._push()

    def _push(self) -> None:
        pending = self.pending
        while pending:
            try:
                sent = os.write(self._socket.fileno(), pending)
            except BlockingIOError:
                break
            except OSError as exc:
                self._fail(exc)
                return
            del pending[:sent]
        if pending:
            self._stuck.set()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self.pending.clear()
        self._stuck.set()  # the writer wakes and raises it

    def _raise_error(self) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(f"sending failed: {self._error!r}") from self._error
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")

    async def wait_stuck(self) -> None:
        """Until some bytes wait for the socket to become writable (or writing failed)."""
        await self._stuck.wait()

    async def flush(self) -> None:
        """Until ``pending`` is on the socket; raises if the socket failed."""
        while self.pending and self._error is None:
            await trio.lowlevel.wait_writable(self._socket)
            self._push()
        self._stuck = trio.Event()
        if self._error is not None:
            self._raise_error()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_error()
        if data:
            self.write_nowait(bytes(data))
        await self.flush()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.flush()

    # -- reading ------------------------------------------------------------------

    async def _receive_raw(self, max_bytes: int) -> bytes:
        """Bytes from the socket (b"" at EOF); always a checkpoint.

        Cancelled, it has read nothing: bytes once read are returned, never dropped
        (the checkpoint after a read is shielded, as in trio's own streams).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = os.read(self._socket.fileno(), max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._socket)
                try:
                    return os.read(self._socket.fileno(), max_bytes)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receiving failed: {exc!r}") from exc
            except OSError as exc:
                raise trio.BrokenResourceError(f"receiving failed: {exc!r}") from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Some bytes (b"" once the peer closed the stream); always a checkpoint."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        size = RECEIVE_SIZE if max_bytes is None else max_bytes
        if self._ssl is None:
            return await self._receive_raw(size)
        assert self._incoming is not None
        await trio.lowlevel.checkpoint_if_cancelled()  # from here on, nothing read is dropped
        while True:
            chunks: list[bytes] = []
            got = 0
            closed = False  # the peer's close_notify came in
            try:
                while got < size:
                    chunk = self._ssl.read(size - got)
                    if not chunk:  # SSLObject.read answers b"" after a close_notify
                        closed = True
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # the peer's close_notify (as an error)
                closed = True
            except ssl.SSLError as exc:  # includes an EOF without close_notify
                self._take_outgoing()
                if not chunks:
                    raise trio.BrokenResourceError(f"TLS failed: {exc!r}") from exc
            if closed and not chunks:
                self._take_outgoing()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            self._take_outgoing()  # e.g. the answer to the peer's key update
            if chunks:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return b"".join(chunks)
            data = await self._receive_raw(RECEIVE_SIZE)
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    def _take_outgoing(self) -> None:
        if self._outgoing is not None and self._outgoing.pending and self._error is None:
            self.pending += self._outgoing.read()
            self._push()

    # -- TLS handshake and closing ----------------------------------------------

    async def do_handshake(self) -> None:
        """The server side of the TLS handshake (raises ssl.SSLError if it fails; the
        alert OpenSSL wrote for the failure is left in ``_outgoing``)."""
        if self._ssl is None:
            return
        assert self._incoming is not None and self._outgoing is not None
        while True:
            done = True
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                done = False
            out = self._outgoing.read()
            if done and self._ssl.version() == "TLSv1.3":
                # what OpenSSL writes once a TLS 1.3 handshake completes is session
                # tickets: held until the first answer, as trio.SSLStream does, so a
                # client that connects and leaves is not sent data it never reads
                self._held = out
                return
            if out:
                self.pending += out
                await self.flush()
            if done:
                return
            data = await self._receive_raw(RECEIVE_SIZE)
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    async def aclose(self) -> None:
        """Send a TLS close_notify (without waiting for the peer's), close the socket."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._ssl is not None and self._error is None:
                # SSLWantReadError: the peer's close_notify is not in (nor waited for)
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                self._take_outgoing()
                with contextlib.suppress(trio.BrokenResourceError):
                    await self.flush()
        finally:
            self._closed = True
            await self.transport.aclose()
