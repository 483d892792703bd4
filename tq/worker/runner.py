"""The worker: claim in batches, run handlers concurrently, report in batches.

    serve_worker(settings, registry, shutdown=event)

One session per broker connection runs three loops: the claimer asks for as
many tasks as there are free slots (long-polling, never prefetching beyond
capacity), the reporter sends finished outcomes in batches, the heartbeater
extends leases and sends host stats. Running tasks live in the worker's own
nursery, not the session's, so a lost connection does not kill them: the
worker reconnects with backoff and reports what finished meanwhile (the
broker's fencing refuses reports whose lease expired in between).

Shutdown: stop claiming, let running tasks finish within the grace period,
cancel and release the rest (status "release": back to pending, attempt
not counted), flush reports, exit.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import trio

from tq.client.aio import Client
from tq.config import Settings
from tq.core.errors import (
    ConnectionFailed,
    Forbidden,
    TLSFailure,
    TQError,
    Unauthorized,
    Unavailable,
)
from tq.core.task import Lease
from tq.tracing import task_span
from tq.worker.executable import ExecHandler, run_executable
from tq.worker.handlers import Handler, HandlerRegistry, Reject, Retry

log = logging.getLogger("tq.worker")

CLAIM_WAIT = 1.0  # long-poll; short so a draining worker stops claiming promptly
REPORT_BATCH = 250  # results per request (one transaction; see MAX_BATCH_WEIGHT)
RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0


@dataclass
class Running:
    lease: Lease
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    lost: bool = False


def _error(kind: str, message: str, tb: str = "") -> dict[str, str]:
    return {"type": kind, "message": message, "traceback": tb}


LEASE_FIELDS = frozenset(Lease.__dataclass_fields__)  # a newer broker may send more


async def execute(handler: Handler | ExecHandler, lease: Lease) -> dict[str, Any]:
    """Run one lease's handler (inside its trace span, tq.tracing); its report."""
    with task_span(lease.type, lease.id, lease.attempt, lease.trace):
        return await _execute(handler, lease)


async def _execute(handler: Handler | ExecHandler, lease: Lease) -> dict[str, Any]:
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
        )
        error = out.error
        return {
            **base,
            "status": out.status,
            "result": out.result,
            "error": None if error is None else _error(error.type, error.message, error.traceback),
        }
    with trio.move_on_after(lease.timeout) as deadline:
        try:
            return {**base, "status": "ok", "result": await handler(lease.payload)}
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
        settings: Settings,
        registry: HandlerRegistry,
        exec_handlers: dict[str, ExecHandler] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.exec_handlers = exec_handlers or {}
        self.id = settings.name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.concurrency = settings.concurrency
        self.running: dict[str, Running] = {}
        self.outbox: list[dict[str, Any]] = []
        self.draining = False
        self.completed = 0
        self._changed = trio.Event()  # a slot freed or an outcome queued
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self._lease_ttl = settings.lease_ttl

    @property
    def types(self) -> list[str]:
        return sorted({*self.registry.names(), *self.exec_handlers})

    def _handler(self, name: str) -> Handler | ExecHandler | None:
        return self.exec_handlers.get(name) or self.registry.get(name)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- task execution (in the worker's nursery, survives reconnects) ----
    async def _run(self, entry: Running) -> None:
        """Run a claimed task; ``entry`` is already in ``running`` (its slot is taken)."""
        lease = entry.lease
        try:
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
                    outcome = await execute(handler, lease)
                self.outbox.append(outcome)
            if entry.scope.cancelled_caught and not entry.lost:
                # cancelled by shutdown: give the lease back untouched
                self.outbox.append({"id": lease.id, "token": lease.token, "status": "release"})
        finally:
            del self.running[lease.id]
            self.completed += 1
            self._notify()

    # -- session loops -----------------------------------------------------
    async def _claimer(self, client: Client, tasks: trio.Nursery) -> None:
        while not self.draining:
            free = self.concurrency - len(self.running)
            if free <= 0:
                await self._changed.wait()
                continue
            await _settle()  # tasks finishing in this same moment free their slots too
            free = self.concurrency - len(self.running)
            if free <= 0:
                continue
            reply = await client.request(
                {
                    "t": "claim",
                    "n": free,
                    "queues": list(self.settings.queues),
                    "types": self.types,
                    "wait": CLAIM_WAIT,
                }
            )
            for item in reply["tasks"]:
                lease = Lease(**{k: v for k, v in item.items() if k in LEASE_FIELDS})
                if self.draining:  # claimed while shutdown began: give it straight back
                    self.outbox.append({"id": lease.id, "token": lease.token, "status": "release"})
                    self._notify()
                else:  # take the slot now, so the next round counts it
                    entry = Running(lease)
                    self.running[lease.id] = entry
                    tasks.start_soon(self._run, entry)

    async def _reporter(self, client: Client) -> None:
        while True:
            if not self.outbox:
                await self._changed.wait()
                continue
            await _settle()  # gather the outcomes of tasks finishing together
            batch = self.outbox[:REPORT_BATCH]
            reply = await client.request({"t": "result", "results": batch})
            del self.outbox[: len(batch)]
            for item in reply["results"]:
                if not item["accepted"]:
                    log.warning("broker refused the result of %s: %s", item["id"], item["reason"])

    async def _heartbeater(self, client: Client) -> None:
        while True:
            await trio.sleep(self._lease_ttl / 3)
            leases = [[r.lease.id, r.lease.token] for r in self.running.values()]
            reply = await client.request(
                {"t": "heartbeat", "leases": leases, "stats": self.stats()}
            )
            for task_id in reply["lost"]:
                entry = self.running.get(task_id)
                if entry is not None:
                    log.warning("lease on %s lost (cancelled or expired): stopping it", task_id)
                    entry.lost = True
                    entry.scope.cancel()

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
            self.settings, kind="worker", name=self.id, hello=self.hello()
        ) as client:
            self._lease_ttl = float(client.server.get("lease_ttl", self._lease_ttl))
            connected()
            log.info(
                "worker %s connected to %s; handlers: %s",
                self.id,
                client.address,
                ", ".join(self.types),
            )
            async with trio.open_nursery() as loops:
                loops.start_soon(self._reporter, client)
                loops.start_soon(self._heartbeater, client)
                await self._claimer(client, tasks)
                # draining: wait for running tasks' reports to go out
                while self.running or self.outbox:
                    await self._changed.wait()
                loops.cancel_scope.cancel()

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

        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._watch_shutdown, shutdown, tasks)
            delay = RECONNECT_MIN
            while not (self.draining and not self.running and not self.outbox):
                try:
                    await self._session(tasks, connected)
                    delay = RECONNECT_MIN
                except BaseException as exc:
                    error = _session_error(exc)
                    if error is None:
                        raise
                    if not _retriable(error) and (not started or _refused(error)):
                        raise error from None
                    log.warning("%s; reconnecting in %.1fs", error, delay)
                    await trio.sleep(delay)
                    delay = min(RECONNECT_MAX, delay * 2) * random.uniform(0.8, 1.2)
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
        # give reports a moment to flush, then stop whatever is left
        with trio.move_on_after(10.0):
            while self.running or self.outbox:
                await self._changed.wait()
        tasks.cancel_scope.cancel()


async def _settle(rounds: int = 3) -> None:
    """Let every task that is ready run a few scheduler rounds (batches fill up)."""
    for _ in range(rounds):
        await trio.sleep(0)


def _retriable(error: TQError) -> bool:
    """Worth reconnecting for: the broker is away, not misconfigured."""
    return isinstance(error, ConnectionFailed | Unavailable) and not isinstance(error, TLSFailure)


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
    settings: Settings,
    registry: HandlerRegistry,
    exec_handlers: dict[str, ExecHandler] | None = None,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a worker until ``shutdown`` is set; reports its id once connected."""
    worker = Worker(settings, registry, exec_handlers)
    await worker.run(trio.Event() if shutdown is None else shutdown, task_status=task_status)
