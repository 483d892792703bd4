"""The broker's network edge: TLS listeners, sessions, dispatch, shutdown.

A session is one connection. Its reader decodes frames with the sans-IO
``Connection`` and starts one task per request, so a connection carries many
requests at once (pipelining); a point read (``get``) and ``depth`` (unless
another expensive read holds the connection's turn) are answered by the
reader itself. An answer is written to the socket by whoever
has it, at once and without awaiting (``WireStream.write_nowait``,
tq/broker/wire.py); what the socket does not take waits in the stream, and
the session's writer task sends it once the peer reads again. Answers queued
for a peer that does not read are bounded (``OUTBOX_BYTES``; events
``EVENT_OUTBOX_BYTES``): past that, the next answer waits. The first message
must be HELLO. A stream-level protocol error (oversize or malformed frame)
gets a NACK with id 0 and the connection is closed; a message-level error
(unknown type, bad field) gets a NACK with the request's id and the session
goes on.

What one frame may cost is bounded before and while it is decoded: frames
before an accepted hello, and all frames of keys whose role sends no tasks
or results (reader), are at most 64 KiB; others at most ``--max-frame``.
A frame over 64 KiB is decoded in a worker thread (one at a time per
broker) with its maps and arrays counted against its size
(tq.protocol.frames), so it neither stalls the event loop nor costs more
memory than a small multiple of its size.

Every session runs under a catch-all, so one bad peer never takes down the
listener (an uncaught exception in a trio connection handler would end the
whole ``serve_listeners``).

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
from typing import Any, get_args

import trio

from tq import __version__
from tq.broker.auth import broker_join_token, open_auth
from tq.broker.events import SessionEvents
from tq.broker.gate import ConnectionGate, check_open_files, handshake, refuse_over_limit
from tq.broker.loops import (
    promoter_loop,
    reaper_loop,
    retention_loop,
    retention_policy,
    scheduler_loop,
)
from tq.broker.operations import HISTORY_LIMIT
from tq.broker.registry import WorkerInfo
from tq.broker.service import MAX_WAIT, BrokerService, worker_info
from tq.broker.wire import WireStream
from tq.config import BrokerSettings, parse_address
from tq.core.errors import (
    ConfigError,
    Forbidden,
    FrameTooLarge,
    InvalidRequest,
    ProtocolError,
    Timeout,
    TQError,
    Unauthorized,
    Unavailable,
)
from tq.core.heap import settle_heap
from tq.core.task import MAX_PAYLOAD_BYTES
from tq.protocol import Connection
from tq.protocol.answers import (
    Answer,
    ClaimAnswer,
    DepthAnswer,
    Event,
    ExplainAnswer,
    HealthAnswer,
    HeartbeatAnswer,
    HistoryAnswer,
    ListAnswer,
    Nack,
    ResultAnswer,
    StatsAnswer,
    SubmitAnswer,
    SubscribeAnswer,
    TaskAnswer,
    UnsubscribeAnswer,
    WaitAnswer,
    WorkersAnswer,
    WorkflowAnswer,
    task_map,
)
from tq.protocol.connection import MessageError
from tq.protocol.frames import INLINE_DECODE
from tq.protocol.schema import (
    Audit,
    Cancel,
    CapOp,
    Claim,
    Heartbeat,
    Hello,
    Keys,
    Purge,
    Query,
    QueryKind,
    QueueOp,
    Request,
    Result,
    Retry,
    RetryMany,
    Schedule,
    SetPriority,
    Submit,
    Subscribe,
    Unsubscribe,
    Wait,
)
from tq.protocol.session import Role, broker_only
from tq.protocol.session import Session as SessionRules
from tq.security.roles import Principal, action_of
from tq.security.tls import ensure_broker_tls, fingerprint, server_ssl_context
from tq.store import BrokerSelf, open_store
from tq.store.dirlock import data_dir_lock

log = logging.getLogger("tq.broker")

RECEIVE_SIZE = 256 * 1024
HELLO_MAX_FRAME = 64 * 1024  # frames before an accepted hello: unauthenticated memory stays small
SMALL_ROLE_MAX_FRAME = 64 * 1024  # frames from roles that send no tasks or results (reader)
LARGE_FRAME_ROLES = frozenset({"admin", "producer", "worker"})  # may send up to --max-frame
DRAIN_SECONDS = 5.0
FAREWELL_SECONDS = 0.5  # to send every open session "the broker is shutting down"
_HANDED, _CLOSE = object(), object()  # outcomes of Session._dispatch besides None and bytes
HTTP_DRAIN_SECONDS = 4.0  # hypercorn's graceful timeout (3 s) and a margin
OUTBOX_BYTES = 16 * 1024 * 1024  # answers queued for a peer that does not read them
EVENT_OUTBOX_BYTES = 256 * 1024  # events queued for a subscriber that does not read them
YIELD_EVERY = 32  # frames of one read handled before the reader lets other tasks run


@dataclass(frozen=True)
class BrokerInfo:
    """What ``serve_broker`` reports once it listens."""

    host: str
    port: int
    ca_file: Path | None
    ca_fingerprint: str | None
    tls_created: bool
    auth: bool = False  # API keys required (False: --no-auth)
    admin_key_file: Path | None = None  # the admin key of the local CLI (created on first start)
    admin_key_created: bool = False
    join_token: str | None = None  # for `tq worker --join` (a worker key; keep it secret)
    client_cert_required: bool = False
    http: str | None = None  # the REST API's URL (https://host:port); None with --http off

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _prepare_data_dir(path: Path) -> None:
    """Create the data directory 0700 (whatever the umask); warn if others can enter it."""
    try:
        if not path.is_dir():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)  # the umask may have taken bits from the mkdir mode
        elif path.stat().st_mode & 0o077:
            log.warning(
                "data directory %s is open to other users (mode %o); it holds every task, "
                "the CA key and admin.key: chmod 700 %s",
                path,
                path.stat().st_mode & 0o777,
                path,
            )
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"data directory {path} is not writable ({exc.strerror}); "
            "pass --data DIR with a writable directory or fix its permissions"
        ) from None


def _check_limits(settings: BrokerSettings) -> None:
    if settings.max_payload > MAX_PAYLOAD_BYTES:
        raise ConfigError(
            f"max_payload {settings.max_payload} is above the store's limit of "
            f"{MAX_PAYLOAD_BYTES} bytes; choose a smaller value"
        )
    if settings.require_client_cert and settings.insecure:
        raise ConfigError("--require-client-cert needs TLS: drop --insecure")


async def _say_goodbye(sessions: set[Session]) -> None:
    """Tell every open session the broker is stopping (a NACK with id 0, code
    ``unavailable``) and give the writers up to FAREWELL_SECONDS to send it, so clients
    say "the broker is shutting down" rather than "connection lost"."""
    frame = Connection().send(
        Connection.nack(
            0,
            Unavailable(
                "the broker is shutting down: reconnect once it is back (or to another broker)"
            ),
        )
    )
    told = [s for s in list(sessions) if s.farewell(frame)]
    with trio.move_on_after(FAREWELL_SECONDS):
        for session in told:
            await session.wait_flushed()


def _is_disconnect(exc: BaseException) -> bool:
    """True when every leaf of ``exc`` is an ordinary peer disconnect."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(
        exc, trio.BrokenResourceError | trio.ClosedResourceError | ssl.SSLError | OSError
    )


class Session:
    def __init__(
        self,
        service: BrokerService,
        stream: WireStream,
        settings: BrokerSettings,
        peer: str = "?",
    ) -> None:
        self.service = service
        self.stream = stream
        self.settings = settings
        self.peer = peer
        self.conn = Connection(min(HELLO_MAX_FRAME, settings.max_frame))
        self.worker_id: str | None = None
        self.worker: WorkerInfo | None = None
        self.principal: Principal | None = None  # who this session acts as (None: --no-auth)
        self.rules = SessionRules(Role.BROKER)  # hello first, one hello, one subscription
        self.on_hello: Callable[[], None] = lambda: None  # the gate: no longer evictable
        self._writer_done = False
        self._written = trio.Event()  # set (and replaced) whenever the writer sent some
        self._heavy = trio.Lock()  # expensive reads: one at a time per connection
        self._slots = trio.Semaphore(settings.max_in_flight)
        self._busy = 0  # requests being handled
        now = trio.current_time()
        self._hello_by = now + settings.hello_timeout  # see _deadline
        self._active_at = now  # when the last request arrived or finished
        self._refused: TQError | None = None  # the key went bad: NACK, then close
        self._handlers: dict[str, Callable[[Any], Awaitable[Answer]]] = {
            "submit": self._submit,
            "claim": self._claim,
            "result": self._result,
            "heartbeat": self._heartbeat,
            "query": self._query,
            "cancel": self._cancel,
            "retry": self._retry,
            "wait": self._wait,
            "set_priority": self._set_priority,
            "queue": self._queue,
            "schedule": self._schedule,
            "cap": self._cap,
            "keys": self._keys,
            "audit": self._audit,
            "purge": self._purge,
            "retry_many": self._retry_many,
        }
        # subscribe/unsubscribe: handled in reading order, like hello (tq/broker/events.py)
        self.events = SessionEvents(
            service.events, self._reply_subscription, Connection.nack, self._key_still_good
        )
        self._receiving: trio.CancelScope | None = None  # the reader's wait for bytes

    @property
    def hello_done(self) -> bool:
        return self.rules.hello_accepted

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._writer)
                async with trio.open_nursery() as requests:
                    last_word = await self._reader(requests)
                    requests.cancel_scope.cancel()  # the peer is gone or broke the stream
                if last_word is not None:
                    self.stream.write_nowait(last_word)
                outer.cancel_scope.deadline = trio.current_time() + 1.0
                await self.wait_flushed()  # what is queued goes out (1 s at most), then end
                outer.cancel_scope.cancel()
        finally:
            if self.worker_id is not None:
                self.service.worker_disconnected(self.worker_id)
            self.events.close()

    async def _writer(self) -> None:
        """Send what the socket did not take when it was written (a peer slow to read,
        or not reading); raises when the socket failed, which ends the session."""
        try:
            while True:
                await self.stream.wait_stuck()
                await self.stream.flush()
                self._written.set()
                self._written = trio.Event()
        finally:
            self._writer_done = True
            self._written.set()  # nobody waits for room or a flush that will not come

    def farewell(self, frame: bytes) -> bool:
        """Queue a last frame (the broker is stopping) if the session is open; True if
        queued. Never waits: a peer that reads nothing gets no farewell."""
        if not self.hello_done:
            return False
        self.rules.close()  # what arrives from now on is refused: the broker is stopping
        if self._writer_done or len(self.stream.pending) > OUTBOX_BYTES:
            return False
        self.stream.write_nowait(frame)
        return True

    async def wait_flushed(self) -> None:
        """Until every queued frame was written (or the writer ended)."""
        while self.stream.pending and not self._writer_done:
            await self._written.wait()

    async def _reply_subscription(
        self, message: SubscribeAnswer | UnsubscribeAnswer | Event | Nack
    ) -> None:
        """The answers to subscribe/unsubscribe (which change the session), and events:
        once EVENT_OUTBOX_BYTES are queued an event waits, so the bus's bounded queue
        for this subscriber fills and drops (with a ``lagged`` marker)."""
        if not isinstance(message, Event):
            self.rules.broker_sends(message)
        await self._reply(message, EVENT_OUTBOX_BYTES)

    async def _reply(self, message: Answer | Event | Nack, budget: int = OUTBOX_BYTES) -> None:
        """Send an answer, a NACK or an event: its declared Struct
        (tq/protocol/answers.py), which encodes itself."""
        try:
            frame = self.conn.send(message)
        except FrameTooLarge:  # an answer larger than the frame limit: say what to ask for
            why = FrameTooLarge(
                f"the answer is larger than this connection's frame limit of "
                f"{self.conn.max_frame} bytes: ask for less at once (a smaller limit, a "
                "narrower filter, fewer ids)"
                if isinstance(message, Answer)
                else f"an event is larger than the frame limit of {self.conn.max_frame} bytes"
            )
            frame = self.conn.send(Connection.nack(message.id, why))
        except TQError as exc:  # a value that is not msgpack data
            frame = self.conn.send(Connection.nack(message.id, exc))
        # a peer that does not read its answers holds at most OUTBOX_BYTES (plus one
        # answer) of them here: the next answer waits, and so does the request behind it
        pending = self.stream.pending
        while pending and len(pending) + len(frame) > budget and not self._writer_done:
            await self._written.wait()
        self.stream.write_nowait(frame)  # on the socket now, or left for the writer

    def _deadline(self) -> float:
        """When a quiet connection is dropped: no hello yet, or idle (nothing in flight)."""
        if not self.hello_done:
            return self._hello_by
        idle = self.settings.idle_timeout
        if self.worker is not None:  # heartbeats every lease_ttl / 3 keep workers active
            idle = max(idle, 2 * self.service.lease_ttl)
        return self._active_at + idle

    async def _receive(self) -> bytes | None:
        """The next bytes (b"" at EOF), or None once the hello or idle deadline passed
        or the key went bad while a subscription's events were all that flowed.

        Only complete requests count as activity, so a peer trickling a frame
        byte by byte (slow loris) is dropped as well.
        """
        while self._refused is None:
            with trio.move_on_at(self._deadline()) as self._receiving:
                return bytes(await self.stream.receive_some(RECEIVE_SIZE))
            if self._refused is not None:
                break  # the key died while the connection only received events
            if self.hello_done and (self._busy or self.events.subscriber is not None):
                self._active_at = trio.current_time()  # a long wait or a subscription: not idle
                continue
            return None
        return None

    def _timed_out(self) -> bytes:
        if self.hello_done:
            why = f"no request for {self.settings.idle_timeout:g}s: closing this idle connection"
            log.info("%s: %s", self.peer, why)
        else:
            why = f"no accepted hello within {self.settings.hello_timeout:g}s: closing"
            log.warning("%s: %s", self.peer, why)
        return self.conn.send(Connection.nack(0, Timeout(why)))

    async def _reader(self, nursery: trio.Nursery) -> bytes | None:
        """Read and dispatch until EOF; a final NACK frame if the stream broke."""
        while True:
            data = await self._receive()
            if data is None and self._refused is not None:
                return self.conn.send(Connection.nack(0, self._refused))
            if data is None:
                return self._timed_out()
            if not data:
                return None
            try:
                self.conn.receive_data(data)
                handled = 0
                while (body := self.conn.next_body()) is not None:
                    handled += 1
                    if handled % YIELD_EVERY == 0:  # answers need not await: let others run
                        await trio.lowlevel.checkpoint()
                    # a large frame holds broker-wide credit from before it is decoded
                    # until its request is answered (service.large_frames)
                    credit = await self._credit(body)
                    last = None
                    try:
                        last = await self._dispatch(body, credit, nursery)
                    finally:
                        credit = 0 if last is _HANDED else credit
                        self.service.large_frames.give(credit)
                    if last is not None and last is not _HANDED:
                        return None if last is _CLOSE else last
            except ProtocolError as exc:
                log.warning("%s: closing connection: %s", self.peer, exc)
                return self.conn.send(Connection.nack(0, exc))

    async def _credit(self, body: bytes) -> int:
        return 0 if len(body) <= INLINE_DECODE else await self.service.large_frames.take(len(body))

    async def _dispatch(self, body: bytes, credit: int, nursery: trio.Nursery) -> Any:
        """Handle one frame body. None: go on; _HANDED: a request now owns ``credit``;
        _CLOSE: close without a last word; bytes: a last frame to send, then close."""
        try:
            msg = await self._parse(body)
        except MessageError as exc:  # answerable: NACK it and go on
            await self._reply(Connection.nack(exc.request_id, exc.cause))
            return None
        if not self.hello_done:
            if not await self._hello(msg):
                return _CLOSE  # refused credentials: the NACK says why; close
            return None
        self._active_at = trio.current_time()
        if not await self._admit(msg):
            if self._refused is not None:  # a dead key: say so once more, close
                return self.conn.send(Connection.nack(0, self._refused))
            return None
        try:
            self.rules.receive_request(msg)  # a second hello or subscription, a broker-only type
        except TQError as exc:
            await self._reply(Connection.nack(msg.id, exc))
            return None
        if isinstance(msg, Subscribe | Unsubscribe):
            await self.events.handle(msg, nursery, self.service.closing)
            return None
        await self._slots.acquire()
        if isinstance(msg, Query) and self._inline(msg.q):
            await self._request(msg, credit)  # quick, or one at a time anyway: no task
        else:
            nursery.start_soon(self._request, msg, credit)
        return _HANDED

    def _inline(self, q: Any) -> bool:
        """Whether the reader answers this query itself: not an expensive read while
        another holds the connection's turn (the reader would wait for it)."""
        return q in INLINE_QUERIES and not (q in HEAVY_QUERIES and self._heavy.locked())

    async def _parse(self, body: bytes) -> Request:
        """Decode one frame body into its typed request (tq/protocol/schema.py). A large
        one is decoded in a thread, one at a time per broker (``service.decode_limiter``),
        its maps and arrays counted, so it neither stalls the event loop nor lets several
        connections multiply its memory; what walks it later (a submit's payload checks)
        runs off the loop too (``_request`` knows it by its credit)."""
        if len(body) <= INLINE_DECODE:
            return self.conn.parse_request(body)
        return await trio.to_thread.run_sync(
            self.conn.parse_request, body, limiter=self.service.decode_limiter
        )

    async def _hello(self, msg: Request) -> bool:
        """Answer the first message; False if its credentials were refused (then close)."""
        rid = msg.id
        try:
            self.rules.receive_request(msg)  # the first message must be hello
            assert isinstance(msg, Hello)
            with trio.move_on_at(self._hello_by) as login:  # the hello deadline covers the login
                principal = await self.service.login(msg)
            if login.cancelled_caught:
                raise Timeout(f"no accepted hello within {self.settings.hello_timeout:g}s")
            worker_id = None
            if msg.kind == "worker":
                worker_id = msg.worker_id or secrets.token_hex(8)
            answer = self.service.hello(msg, worker_id, principal)
        except (Unauthorized, Forbidden, Timeout) as exc:
            log.warning("%s: hello refused (%s): %s", self.peer, exc.code, exc)
            self.rules.close()
            await self._reply(Connection.nack(rid, exc))
            return False
        except TQError as exc:
            nack = Connection.nack(rid, exc)
            self.rules.broker_sends(nack)
            await self._reply(nack)
            return True
        self.principal = principal
        self.worker_id = worker_id
        if worker_id is not None:
            self.worker = worker_info(worker_id, msg, answer.key_id)
        self.on_hello()
        self.conn.set_max_frame(self.settings.max_frame)
        if principal is not None and principal.role not in LARGE_FRAME_ROLES:
            self.conn.limit_incoming(SMALL_ROLE_MAX_FRAME)  # a reader asks in small frames
        self.rules.broker_sends(answer)  # the session is ready
        await self._reply(answer)
        return True

    def _key_still_good(self) -> bool:
        """Before each event: a key revoked or expired since the subscribe ends the
        subscription and the connection (as its next request would), since events
        need no request."""
        if self.principal is None:
            return True
        try:
            self.service.auth.check(self.principal)
        except Unauthorized as exc:
            log.warning("%s: subscription ended (%s): %s", self.peer, exc.code, exc)
            self._refused = exc
            if self._receiving is not None:
                self._receiving.cancel()  # the reader says so and closes
            return False
        return True

    async def _admit(self, msg: Request) -> bool:
        """Is the session's key still good, and may its role make this request? Else NACK."""
        if self.principal is None or isinstance(msg, Hello):
            return True  # no auth; or not a request here (a second hello): _request refuses it
        try:
            self.service.auth.check(self.principal)
            self.principal.authorize(action_of(msg))
        except (Unauthorized, Forbidden) as exc:
            log.warning("%s: %s refused (%s): %s", self.peer, msg.t, exc.code, exc)
            if isinstance(exc, Unauthorized):  # a dead key: nothing more will pass
                self._refused = exc
            await self._reply(Connection.nack(msg.id, exc))
            return False
        return True

    async def _request(self, msg: Request, credit: int = 0) -> None:
        try:
            if credit and isinstance(msg, Submit):  # from a large frame: checked off the loop
                msg = LargeSubmit(id=msg.id, tasks=msg.tasks)
            await self._answer(msg)
        finally:
            self.service.large_frames.give(credit)

    async def _answer(self, msg: Request) -> None:
        rid = msg.id
        try:
            handler = self._handlers.get(msg.t)
            if handler is None:
                raise InvalidRequest(broker_only(msg.t))
            self.service.in_flight += 1
            self._busy += 1
            try:
                if _is_heavy(msg):  # one at a time, and its answer queued before the next
                    async with self._heavy:
                        await self._reply(await handler(msg))
                        return
                reply: Answer | Nack = await handler(msg)
                if isinstance(reply, WaitAnswer):  # the handler took the lock for its answer
                    try:
                        await self._reply(reply)
                    finally:
                        self._heavy.release()
                    return
            finally:
                self.service.in_flight -= 1
                self._busy -= 1
                self._active_at = trio.current_time()
        except TQError as exc:
            if isinstance(exc, Unauthorized | Forbidden):  # e.g. a task outside the key's queues
                log.warning("%s: %s refused (%s): %s", self.peer, msg.t, exc.code, exc)
            reply = Connection.nack(rid, exc)
        except Exception:
            log.exception("internal error handling %s", msg.t)
            reply = Connection.nack(rid, TQError("internal broker error; see the broker's log"))
        finally:
            self._slots.release()
        await self._reply(reply)

    def _need_worker(self, what: str) -> WorkerInfo:
        if self.worker is None:
            raise InvalidRequest(f"{what} is for workers: say hello with kind 'worker' first")
        return self.worker

    # -- handlers: take the typed request, call one service method, answer with its ---
    # -- declared Struct (tq/protocol/answers.py) ------------------------------------
    async def _submit(self, msg: Submit) -> Answer:
        tasks, warnings = await self.service.submit_typed(
            msg.tasks,
            self.principal,
            answer_limit=self.conn.max_frame,
            large=isinstance(msg, LargeSubmit),
        )
        return SubmitAnswer(id=msg.id, tasks=tasks, warnings=warnings)

    async def _claim(self, msg: Claim) -> Answer:
        worker_id = self._need_worker("claim").id
        return ClaimAnswer(
            id=msg.id, tasks=await self.service.claim(worker_id, msg, self.principal)
        )

    async def _result(self, msg: Result) -> Answer:
        worker = self._need_worker("result")
        return ResultAnswer(id=msg.id, results=await self.service.report(worker.id, msg.results))

    async def _heartbeat(self, msg: Heartbeat) -> Answer:
        lost = await self.service.heartbeat(self._need_worker("heartbeat"), msg)
        return HeartbeatAnswer(id=msg.id, lost=lost)

    async def _query(self, msg: Query) -> Answer:
        q, rid = msg.q, msg.id
        if q == "get":
            task = await self.service.get(_task_id(msg), self.principal)
            return TaskAnswer(id=rid, task=task_map(task))
        if q == "list":
            tasks, cursor = await self.service.list_tasks(msg, self.principal)
            return ListAnswer(id=rid, tasks=[task_map(t) for t in tasks], next=cursor)
        if q == "stats":
            return StatsAnswer(id=rid, stats=await self.service.stats(self.principal))
        if q == "workers":
            return WorkersAnswer(id=rid, workers=self.service.list_workers(self.principal))
        if q == "depth":
            return DepthAnswer(id=rid, depth=await self.service.queue_depth(self.principal))
        if q == "health":
            return HealthAnswer(id=rid, health=await self.service.cluster_status(self.principal))
        if q == "explain":
            explain = await self.service.explain(_task_id(msg), self.principal)
            return ExplainAnswer(id=rid, explain=explain)
        if q == "workflow":
            workflow = await self.service.workflow(_task_id(msg), self.principal)
            return WorkflowAnswer(id=rid, workflow=workflow)
        if q == "history":
            task_id = _task_id(msg)
            rows = await self.service.history(task_id, self.principal)
            return HistoryAnswer(id=rid, task=task_id, history=rows, limit=HISTORY_LIMIT)
        raise InvalidRequest(f"unknown query {q!r}; known: {', '.join(get_args(QueryKind))}")

    async def _cancel(self, msg: Cancel) -> Answer:
        task = await self.service.cancel(msg.task, self.principal)
        return TaskAnswer(id=msg.id, task=task_map(task))

    async def _retry(self, msg: Retry) -> Answer:
        task = await self.service.retry(msg.task, self.principal)
        return TaskAnswer(id=msg.id, task=task_map(task))

    async def _set_priority(self, msg: SetPriority) -> Answer:
        task = await self.service.set_priority(msg.task, msg.priority, self.principal)
        return TaskAnswer(id=msg.id, task=task_map(task))

    async def _wait(self, msg: Wait) -> Answer:
        timeout = MAX_WAIT if msg.timeout is None else min(msg.timeout, MAX_WAIT)
        timed_out = await self.service.wait(msg.task, timeout, self.principal)
        # the answer carries the task: read and queued one at a time per connection, like
        # other large answers, so pipelined waits on a large task hold one copy at a time
        # (a WaitAnswer holds the lock until it is queued: see _answer)
        await self._heavy.acquire()
        try:
            task = await self.service.get(msg.task, self.principal)
        except BaseException:
            self._heavy.release()
            raise
        return WaitAnswer(id=msg.id, task=task_map(task), timed_out=timed_out)

    # operations: the service answers the typed request with its declared answer
    async def _queue(self, msg: QueueOp) -> Answer:
        return await self.service.pause_queue(msg, self.principal)

    async def _schedule(self, msg: Schedule) -> Answer:
        return await self.service.schedule_request(msg, self.principal)

    async def _cap(self, msg: CapOp) -> Answer:
        return await self.service.cap_request(msg, self.principal)

    async def _keys(self, msg: Keys) -> Answer:
        return await self.service.auth.request(self.principal, msg)

    async def _audit(self, msg: Audit) -> Answer:
        return await self.service.auth.audit_page(msg)

    async def _purge(self, msg: Purge) -> Answer:
        return await self.service.purge(msg, self.principal)

    async def _retry_many(self, msg: RetryMany) -> Answer:
        return await self.service.retry_many(msg, self.principal)


class LargeSubmit(Submit, tag="submit"):
    """A submit that came in a frame over 64 KiB: its tasks are checked in a thread."""


HEAVY_QUERIES = frozenset({"list", "stats", "depth", "health"})
# answered by the session's reader, without a task: a point read on the event loop's
# thread, and index-only counts that a connection runs one at a time anyway
INLINE_QUERIES = frozenset({"get", "depth"})


def _is_heavy(msg: Request) -> bool:
    """A read whose cost or answer can be large: at most one at a time per connection."""
    return isinstance(msg, Audit | Keys) or (isinstance(msg, Query) and msg.q in HEAVY_QUERIES)


def _task_id(msg: Query) -> str:
    if msg.task is None:
        raise InvalidRequest(f"query {msg.q} needs 'task' (a task id string)")
    return msg.task


async def _serve_connection(
    stream: trio.SocketStream,
    service: BrokerService,
    settings: BrokerSettings,
    ssl_context: ssl.SSLContext | None,
    gate: ConnectionGate,
) -> None:
    peer = "?"
    try:
        peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        scope = trio.CancelScope()
        with scope, gate.enter(scope) as admitted:
            timeout = settings.handshake_timeout
            if not admitted:
                await refuse_over_limit(stream, ssl_context, gate, timeout, peer)
                return
            wrapped: WireStream | None = WireStream(stream)
            if ssl_context is not None:
                wrapped = await handshake(stream, ssl_context, timeout, peer)
            if wrapped is None:
                return
            session = Session(service, wrapped, settings, peer)
            session.on_hello = lambda: gate.proven(scope)
            gate.sessions.add(session)
            try:
                await session.run()
            finally:
                gate.sessions.discard(session)
            with trio.move_on_after(1.0):
                await wrapped.aclose()  # a TLS close_notify, so the peer sees a clean end
        if scope.cancelled_caught:
            log.warning(
                "%s: closed without a hello to make room for a new connection (at the "
                "connection limit)",
                peer,
            )
    except Exception as exc:
        if _is_disconnect(exc):
            log.debug("%s: connection closed: %r", peer, exc)
        else:
            log.exception("%s: connection dropped after an internal error", peer)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_broker(
    settings: BrokerSettings,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[BrokerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker until ``shutdown`` is set (or the caller cancels); it holds its data
    directory's lock (tq/store/dirlock.py) all along: one broker per directory."""
    _prepare_data_dir(settings.data)
    with data_dir_lock(settings.data):
        await _serve_broker(settings, shutdown=shutdown, task_status=task_status)


async def _serve_broker(
    settings: BrokerSettings,
    *,
    shutdown: trio.Event | None,
    task_status: trio.TaskStatus[BrokerInfo],
) -> None:
    host, port = parse_address(settings.listen)
    _check_limits(settings)
    check_open_files(settings.max_connections)
    ssl_context = None
    ca_file, ca_print, created = None, None, False
    if not settings.insecure:
        files, created = ensure_broker_tls(settings.tls_dir, settings.tls_san)
        mtls = settings.require_client_cert
        ssl_context = server_ssl_context(
            files, client_ca=files.ca_cert if mtls else None, require_client_cert=mtls
        )
        ca_file, ca_print = files.ca_cert, fingerprint(files.ca_cert)
    shutdown = trio.Event() if shutdown is None else shutdown
    gate = ConnectionGate(settings.max_connections)
    me = BrokerSelf.new(__version__)
    async with open_store(settings.store_url, synchronous=settings.synchronous, broker=me) as store:
        auth, admin_created = await open_auth(store, settings)
        if not auth.enabled:
            log.warning("authentication is OFF (--no-auth): anyone who can connect may do anything")
        service = BrokerService(
            store,
            lease_ttl=settings.lease_ttl,
            auth=auth,
            max_payload=settings.max_payload,
            aging=settings.aging,
        )
        async with trio.open_nursery() as timers:
            if auth.enabled:
                timers.start_soon(auth.refresh_loop)
            timers.start_soon(
                reaper_loop, service, min(1.0, settings.lease_ttl / 4), settings.lease_ttl
            )
            timers.start_soon(promoter_loop, service)
            timers.start_soon(scheduler_loop, service)
            timers.start_soon(retention_loop, service, retention_policy(settings))
            timers.start_soon(service.events.run, store)
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {settings.listen}: {exc.strerror}; "
                    "is another broker running there? pass --listen HOST:PORT"
                ) from None
            bound = listeners[0].socket.getsockname()
            http_url = None
            http_stopped = trio.Event()  # hypercorn returned: its graceful drain is over
            if settings.http_enabled:  # REST, /metrics, /health: tq/http, imported only here
                from tq.http.server import serve_http
                from tq.security.tls import TLSFiles

                tls = None if ssl_context is None else TLSFiles.in_dir(settings.tls_dir)
                cert, key = (None, None) if tls is None else (tls.server_cert, tls.server_key)
                mtls = tls is not None and settings.require_client_cert
                client_ca = tls.ca_cert if tls is not None and mtls else None

                async def run_http(task_status: trio.TaskStatus[str]) -> None:
                    try:
                        await serve_http(
                            service,
                            settings.http,
                            cert,
                            key,
                            shutdown,
                            client_ca=client_ca,
                            task_status=task_status,
                        )
                    finally:
                        http_stopped.set()

                try:
                    http_url = await timers.start(run_http)
                except BaseException:
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
                    raise
            wire = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
            service.addresses = {"wire": wire, "http": http_url}
            if store.cluster is not None:
                store.cluster.announce(wire, http_url)
            async with trio.open_nursery() as sessions:
                accept = trio.CancelScope()

                async def handler(stream: trio.SocketStream) -> None:
                    await _serve_connection(stream, service, settings, ssl_context, gate)

                async def accept_loop() -> None:
                    with accept:
                        await trio.serve_listeners(handler, listeners, handler_nursery=sessions)

                sessions.start_soon(accept_loop)
                token = await broker_join_token(auth, settings, bound[1], ca_file)
                task_status.started(
                    BrokerInfo(
                        bound[0],
                        bound[1],
                        ca_file,
                        ca_print,
                        created,
                        auth=auth.enabled,
                        admin_key_file=settings.admin_key_file if auth.enabled else None,
                        admin_key_created=admin_created,
                        join_token=token,
                        client_cert_required=settings.require_client_cert,
                        http=http_url,
                    )
                )
                settle_heap()  # started: what start-up made stays out of the GC's walks
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
                await _say_goodbye(gate.sessions)
                sessions.cancel_scope.cancel()
            if http_url is not None:  # in-flight HTTP requests and event streams end cleanly
                with trio.move_on_after(HTTP_DRAIN_SECONDS):
                    await http_stopped.wait()
            timers.cancel_scope.cancel()
    log.info("broker stopped; store closed cleanly")
