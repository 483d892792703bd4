"""The worker: claim in batches, run handlers concurrently, report in batches.

    serve_worker(settings, registry, shutdown=event)

One session per broker connection runs three loops: the claimer asks for as
many tasks as there are free slots (long-polling, never prefetching beyond
capacity), the reporter sends finished outcomes in batches, the heartbeater
extends leases and sends host stats. Running tasks live in the worker's own
nursery, not the session's, so a lost connection does not kill them: the
worker reconnects and reports what finished meanwhile (the broker's fencing
refuses reports whose lease expired in between).

Running work is keyed by lease (task id, token), never by task id alone, and
one worker never runs the same task twice at once. A claim can hand back a
task this worker still holds: its lease expired while the broker was away
(or the worker was paused) and the broker gave the task out again. Then:

- the task is still running here: the run *adopts* the new lease. It is
  heartbeated and reported under the new token, and nothing starts again.
  (Releasing the new lease instead would leave the running work unreportable
  and let the task be claimed, and given back, round after round.)
- its run is being stopped (the broker said the old lease was lost, or the
  worker is shutting down): the new lease is released at once, unrun.
- its outcome is still waiting to be sent: the outcome is sent under the new
  token; nothing runs again.
- otherwise (the outcome was already sent, or nothing of it is left) it runs.

A heartbeat answer that names a lease lost stops the run only if the run
still holds that lease (not one it adopted since).

Reconnecting: after a failed connection attempt or a lost session the worker
waits ``RECONNECT.delay(n)`` (tq.core.retry: exponential with equal jitter,
never above the cap; tq.client.failover.Backoff without a deadline) for the
n-th failure in a row; a successful hello
resets n, so every outage starts again from the shortest delay. With several
brokers (``--broker b1,b2``, a join token) each attempt tries them in turn,
starting after the one whose session was lost (tq.client.failover.Rotation).
The leases survive the move: they are the worker's (by worker id) in the
store, and the first thing a new session sends is a heartbeat for every lease
still running, so they are extended at once on the new broker; outcomes
finished meanwhile go out from the outbox as usual.

Shutdown (``shutdown`` set): stop claiming at once. A claim already sent is
not abandoned: its answer (at most ``CLAIM_WAIT`` seconds away) is awaited
and every task it brings is released (status "release": back to pending,
attempt not counted) at once, unrun. Running tasks get ``shutdown_grace``
seconds to finish; those still running then are cancelled and released.
The worker returns as soon as nothing runs and every outcome is reported,
so a stop takes as long as the running tasks need, at most the grace
(plus ``FLUSH_LIMIT`` to reach the broker if it is away).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import trio

from tq.client import failover as fo
from tq.client.aio import Client
from tq.client.options import settings_options, split_addresses
from tq.config import WorkerSettings
from tq.core.errors import (
    Forbidden,
    TQError,
    Unauthorized,
)
from tq.core.heap import settle_heap
from tq.core.progress import Progress
from tq.core.retry import RetryPolicy
from tq.core.task import Lease
from tq.protocol import answers
from tq.tracing import exec_environment, task_span
from tq.worker.context import TaskContext, bind
from tq.worker.executable import ExecHandler, run_executable
from tq.worker.handlers import Handler, HandlerRegistry, Reject, Retry

log = logging.getLogger("tq.worker")

CLAIM_WAIT = 1.0  # long-poll; short so a draining worker stops claiming promptly
REPORT_BATCH = 250  # results per request (one transaction; see MAX_BATCH_WEIGHT)
RECONNECT = RetryPolicy(base=0.2, cap=10.0)  # delay before the n-th reconnect attempt in a row
FLUSH_LIMIT = 10.0  # after the grace: time left to report to a broker that is away
PROGRESS_GAP = 1.0  # seconds: progress brings a heartbeat forward, at most once per gap

LeaseKey = tuple[str, int]  # (task id, lease token)


@dataclass
class Running:
    lease: Lease  # the lease the run reports under (replaced when it adopts a newer one)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    lost: bool = False  # the broker said the lease is gone: stop, report nothing
    progress: Progress | None = None  # the latest its handler reported
    progress_sent: Progress | None = None  # the latest a heartbeat carried

    @property
    def key(self) -> LeaseKey:
        return (self.lease.id, self.lease.token)

    @property
    def stopping(self) -> bool:
        return self.lost or self.scope.cancel_called


def _error(kind: str, message: str, tb: str = "") -> dict[str, str]:
    return {"type": kind, "message": message, "traceback": tb}


def _lease(m: answers.LeaseMap) -> Lease:
    """A lease of a claim's answer (read through its declaration, tq/protocol/answers.py)."""
    return Lease(
        m.id,
        m.type,
        m.queue,
        m.payload,
        m.priority,
        m.attempt,
        m.max_retries,
        m.timeout,
        m.token,
        m.expires_at,
        m.trace,
    )


def _release(lease: Lease) -> dict[str, Any]:
    return {"id": lease.id, "token": lease.token, "status": "release"}


def _ignore(progress: Progress) -> None:
    """Progress of a run outside a worker (``execute`` called alone): dropped."""


async def execute(
    handler: Handler | ExecHandler,
    lease: Lease,
    report: Callable[[Progress], None] = _ignore,
) -> dict[str, Any]:
    """Run one lease's handler (inside its trace span, tq.tracing); its report.
    ``report`` receives the progress the handler reports (from any thread)."""
    with task_span(lease.type, lease.id, lease.attempt, lease.trace):
        return await _execute(handler, lease, report)


async def _execute(
    handler: Handler | ExecHandler, lease: Lease, report: Callable[[Progress], None]
) -> dict[str, Any]:
    """Run one task; always returns an outcome map (never raises but Cancelled)."""
    base: dict[str, Any] = {"id": lease.id, "token": lease.token}
    if isinstance(handler, ExecHandler):
        out = await run_executable(
            handler,
            task_id=lease.id,
            attempt=lease.attempt,
            token=lease.token,
            payload=lease.payload,
            timeout=lease.timeout,
            extra_env=exec_environment(lease.trace),  # TRACEPARENT / TRACESTATE
            progress=report,
        )
        error = out.error
        return {
            **base,
            "status": out.status,
            "result": out.result,
            "error": None if error is None else _error(error.type, error.message, error.traceback),
        }
    ctx = TaskContext(lease.id, lease.type, lease.queue, lease.attempt, report)
    bind(ctx)  # this run's trio task (and the thread a plain handler runs in)
    with trio.move_on_after(lease.timeout) as deadline:
        try:
            return {**base, "status": "ok", "result": await handler(lease.payload, ctx)}
        except Retry as exc:
            return {
                **base,
                "status": "retry",
                "delay": exc.delay,
                "error": _error("Retry", str(exc)),
            }
        except Reject as exc:
            return {**base, "status": "reject", "error": _error("Reject", str(exc))}
        except Exception as exc:
            tb = traceback.format_exc(limit=30)
            return {**base, "status": "retry", "error": _error(type(exc).__name__, str(exc), tb)}
    assert deadline.cancelled_caught
    return {
        **base,
        "status": "retry",
        "error": _error("Timeout", f"handler exceeded the task timeout of {lease.timeout:g}s"),
    }


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        registry: HandlerRegistry,
        exec_handlers: dict[str, ExecHandler] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.exec_handlers = exec_handlers or {}
        self.id = settings.name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.concurrency = settings.concurrency
        self.running: dict[LeaseKey, Running] = {}
        self._by_task: dict[str, Running] = {}  # the same runs by task id: one per task
        self.outbox: list[dict[str, Any]] = []
        self._sending = 0  # outcomes at the head of the outbox in a report not yet answered
        self._claiming = False  # a claim is sent and not yet answered
        self.draining = False
        self.completed = 0
        self._changed = trio.Event()  # a slot freed, an outcome queued or sent, a claim answered
        self._backoff = fo.Backoff(None, RECONNECT)  # reset by a successful hello
        self.connected = False  # a session with the broker is up
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self._lease_ttl = settings.lease_ttl
        self._rotation = fo.Rotation(split_addresses(settings_options(settings)["address"]))
        self._progressed = trio.Event()  # a running task reported progress
        self._kicked = False  # ... and the heartbeater was told (from any thread)
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def types(self) -> list[str]:
        return sorted({*self.registry.names(), *self.exec_handlers})

    def _handler(self, name: str) -> Handler | ExecHandler | None:
        return self.exec_handlers.get(name) or self.registry.get(name)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _queue(self, outcome: dict[str, Any]) -> None:
        self.outbox.append(outcome)
        self._notify()

    @property
    def finished(self) -> bool:
        """Stopping, and nothing left to run, report or receive."""
        return self.draining and not (self.running or self.outbox or self._claiming)

    # -- claimed leases ----------------------------------------------------
    def accept(self, lease: Lease, tasks: trio.Nursery) -> None:
        """Take one claimed lease: run it, or give it to the run or outcome it belongs to."""
        if self.draining:  # claimed while shutdown began: give it straight back
            self._queue(_release(lease))
            return
        entry = self._by_task.get(lease.id)
        if entry is not None:  # our lease on it expired, yet the run goes on
            if entry.stopping:
                self._queue(_release(lease))
                return
            log.info("task %s was leased again while running here: keeping the run", lease.id)
            del self.running[entry.key]
            entry.lease = lease
            self.running[entry.key] = entry
            return
        for outcome in self.outbox[self._sending :]:
            if outcome["id"] == lease.id and outcome["status"] != "release":
                log.info("task %s was leased again before its outcome was sent", lease.id)
                outcome["token"] = lease.token
                return
        log.debug("task %s (%s) leased, attempt %d", lease.id, lease.type, lease.attempt)
        entry = Running(lease)  # take the slot now, so the next round counts it
        self.running[entry.key] = entry
        self._by_task[lease.id] = entry
        tasks.start_soon(self._run, entry)

    def lost(self, sent: list[LeaseKey], task_ids: list[str]) -> None:
        """The broker says these leases (of those in ``sent``) are gone: stop their runs."""
        tokens = dict(sent)
        for task_id in task_ids:
            entry = self.running.get((task_id, tokens.get(task_id, -1)))
            if entry is not None:
                log.warning("lease on %s lost (cancelled or expired): stopping it", task_id)
                entry.lost = True
                entry.scope.cancel()

    # -- task execution (in the worker's nursery, survives reconnects) ----
    async def _run(self, entry: Running) -> None:
        """Run a claimed task; ``entry`` is already in ``running`` (its slot is taken)."""
        lease = entry.lease
        try:
            if self.draining:  # the stop came before it started: give it back unrun
                self.outbox.append(_release(lease))
                return
            handler = self._handler(lease.type)
            with entry.scope:
                if handler is None:  # cannot happen: we claim only our types
                    outcome = {
                        "id": lease.id,
                        "token": lease.token,
                        "status": "reject",
                        "error": _error("UnknownType", f"no handler for {lease.type!r}"),
                    }
                else:
                    outcome = await execute(handler, lease, self._reporter_of(entry))
                outcome["token"] = entry.lease.token  # a lease adopted while it ran
                self.outbox.append(outcome)
            if entry.scope.cancelled_caught and not entry.lost:
                # cancelled by shutdown: give the lease back untouched
                self.outbox.append(_release(entry.lease))
        finally:
            del self.running[entry.key]
            del self._by_task[lease.id]
            self.completed += 1
            self._notify()

    def _reporter_of(self, entry: Running) -> Callable[[Progress], None]:
        """What a run's handler reports progress through: keep the latest, wake the
        heartbeater once (it sends the latest of every run with its next heartbeat)."""

        def report(value: Progress) -> None:
            entry.progress = value
            if self._kicked:
                return
            self._kicked = True
            try:
                trio.lowlevel.current_task()
            except RuntimeError:  # a plain handler's thread
                if self._token is not None:
                    with contextlib.suppress(trio.RunFinishedError):
                        self._token.run_sync_soon(self._wake)
            else:
                self._wake()

        return report

    def _wake(self) -> None:
        self._progressed.set()

    def _progress_items(self, sent: list[LeaseKey], everything: bool) -> list[list[Any]]:
        """[id, token, fraction, message] for runs whose progress changed since the
        last heartbeat (``everything``: every run that has any, for a new session)."""
        items = []
        for key in sent:
            entry = self.running.get(key)
            if entry is None or entry.progress is None:
                continue
            if everything or entry.progress != entry.progress_sent:
                entry.progress_sent = entry.progress
                items.append([key[0], key[1], entry.progress[0], entry.progress[1]])
        return items

    async def _pause(self) -> None:
        """Until the next heartbeat is due: ``lease_ttl / 3``, or sooner when a run
        reported progress, though never sooner than PROGRESS_GAP after the last."""
        now = trio.current_time()
        due, earliest = now + self._lease_ttl / 3, now + PROGRESS_GAP
        with trio.move_on_at(due):
            await self._progressed.wait()
            self._progressed = trio.Event()
            self._kicked = False
            await trio.sleep_until(min(due, earliest))

    # -- session loops -----------------------------------------------------
    async def _claimer(self, client: Client, tasks: trio.Nursery) -> None:
        while not self.draining:
            free = self.concurrency - len(self.running)
            if free <= 0:
                await self._changed.wait()
                continue
            await _settle()  # tasks finishing in this same moment free their slots too
            free = self.concurrency - len(self.running)
            if free <= 0 or self.draining:
                continue
            # Never cancelled by a stop: a claim the broker committed must be
            # answered here, so that its tasks can be released.
            self._claiming = True
            try:
                claimed = await client.request_answer(
                    {
                        "t": "claim",
                        "n": free,
                        "queues": list(self.settings.queues),
                        "types": self.types,
                        "wait": CLAIM_WAIT,
                    },
                    answers.ClaimAnswer,
                )
                for item in claimed.tasks:
                    self.accept(_lease(item), tasks)
            finally:
                self._claiming = False
                self._notify()

    async def _reporter(self, client: Client) -> None:
        while True:
            if not self.outbox:
                await self._changed.wait()
                continue
            await _settle()  # gather the outcomes of tasks finishing together
            batch = self.outbox[:REPORT_BATCH]
            self._sending = len(batch)
            try:
                reply = await client.request_answer(
                    {"t": "result", "results": batch}, answers.ResultAnswer
                )
            finally:
                self._sending = 0
            del self.outbox[: len(batch)]
            self._notify()
            for item in reply.results:
                if not item.accepted:
                    log.warning("broker refused the result of %s: %s", item.id, item.reason)

    async def _heartbeater(self, client: Client) -> None:
        if self.running:  # a new session: extend the leases we hold at once, ...
            await _settle(6)  # the claimer sends its first claim meanwhile
            with trio.move_on_after(2 * CLAIM_WAIT):
                while self._claiming:  # ... once the first claim has been answered (it may
                    await self._changed.wait()  # re-lease a task running here: adopted)
        else:
            await self._pause()
        everything = True  # a new session: the broker may not have this run's progress
        while True:
            sent = list(self.running)
            msg = {"t": "heartbeat", "leases": [list(k) for k in sent], "stats": self.stats()}
            progress = self._progress_items(sent, everything)
            if progress:
                msg["progress"] = progress
            beat = await client.request_answer(msg, answers.HeartbeatAnswer)
            everything = False
            self.lost(sent, beat.lost)
            await self._pause()

    def stats(self) -> dict[str, Any]:
        with self._process.oneshot():
            return {
                "cpu": self._process.cpu_percent(None),
                "memory": self._process.memory_info().rss,
                "running": len(self.running),
                "concurrency": self.concurrency,
                "completed": self.completed,
            }

    def hello(self) -> dict[str, Any]:
        return {
            "worker_id": self.id,
            "queues": list(self.settings.queues),
            "types": self.types,
            "concurrency": self.concurrency,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    async def _session(self, tasks: trio.Nursery, connected: Callable[[], None]) -> None:
        async with Client.from_settings(
            self.settings,
            address=",".join(self._rotation.order()),
            kind="worker",
            name=self.id,
            hello=self.hello(),
            failover=0,  # the worker recovers itself: new session, outbox, heartbeats
        ) as client:
            self._rotation.connected(client.address)
            self._backoff.reset()  # the broker is back: the next outage starts from the start
            self._lease_ttl = float(client.server.get("lease_ttl", self._lease_ttl))
            connected()
            self.connected = True
            log.info(
                "worker %s connected to %s; handlers: %s",
                self.id,
                client.address,
                ", ".join(self.types),
            )
            try:
                async with trio.open_nursery() as loops:
                    loops.start_soon(self._reporter, client)
                    loops.start_soon(self._heartbeater, client)
                    await self._claimer(client, tasks)
                    # draining: wait for the running tasks' reports to go out
                    while not self.finished:
                        await self._changed.wait()
                    loops.cancel_scope.cancel()
            finally:
                self.connected = False
                self._rotation.failed(client.address)  # lost: try the next broker first

    async def run(
        self,
        shutdown: trio.Event,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False

        def connected() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started(self.id)

        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._watch_shutdown, shutdown, tasks)
            while not self.finished:
                try:
                    await self._session(tasks, connected)
                except BaseException as exc:
                    error = _session_error(exc)
                    if error is None:
                        raise
                    if not _retriable(error) and (not started or _refused(error)):
                        raise error from None
                    delay = self._backoff.next_delay(trio.current_time())
                    assert delay is not None  # no deadline: a worker tries until stopped
                    log.warning("%s; reconnecting in %.1fs", error, delay)
                    await trio.sleep(delay)
            tasks.cancel_scope.cancel()
        log.info("worker %s stopped", self.id)

    async def _watch_shutdown(self, shutdown: trio.Event, tasks: trio.Nursery) -> None:
        await shutdown.wait()
        log.info(
            "stopping: no new claims; %d running task(s) get %gs to finish",
            len(self.running),
            self.settings.shutdown_grace,
        )
        self.draining = True
        self._notify()
        with trio.move_on_after(self.settings.shutdown_grace):
            while self.running:
                await self._changed.wait()
        for entry in list(self.running.values()):
            entry.scope.cancel()  # released in _run
        # report what is left (at once when the broker is there), then stop
        with trio.move_on_after(FLUSH_LIMIT):
            while not self.finished:
                await self._changed.wait()
        if not self.finished:
            log.warning(
                "stopping with %d outcome(s) not reported: the broker was not reachable; "
                "their tasks return to the queue when their leases expire",
                len(self.outbox),
            )
        tasks.cancel_scope.cancel()


async def _settle(rounds: int = 3) -> None:
    """Let every task that is ready run a few scheduler rounds (batches fill up)."""
    for _ in range(rounds):
        await trio.sleep(0)


def _retriable(error: TQError) -> bool:
    """Worth reconnecting for: the broker is away, not misconfigured."""
    return fo.retriable(error)


def _refused(error: TQError) -> bool:
    """The broker refused our key (revoked, expired, wrong role): reconnecting cannot help."""
    return isinstance(error, Unauthorized | Forbidden)


def _session_error(exc: BaseException) -> TQError | None:
    """The TQError that ended a session, if that is all that went wrong."""
    if isinstance(exc, TQError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        errors = [_session_error(e) for e in exc.exceptions]
        if all(e is not None for e in errors):
            return errors[0]
    return None


async def serve_worker(
    settings: WorkerSettings,
    registry: HandlerRegistry,
    exec_handlers: dict[str, ExecHandler] | None = None,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a worker until ``shutdown`` is set; reports its id once connected."""
    worker = Worker(settings, registry, exec_handlers)
    settle_heap()  # the handlers are imported: what start-up made is here
    await worker.run(trio.Event() if shutdown is None else shutdown, task_status=task_status)
