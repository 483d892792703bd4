"""The broker's timers: lease reaper, retry promoter, scheduler and retention.

Each is a plain loop run in the broker's nursery; a store error is logged
and the loop carries on at its next tick (the store may recover, e.g. once
disk space is freed). With several brokers on one database the loops run
on every broker, but only the cluster's leader does the work
(``BrokerService.runs_upkeep``): a follower ticks idle, ready to take over as
soon as the store's election makes it the leader.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from tq.broker.service import BrokerService
from tq.core.errors import TQError
from tq.core.retention import RetentionPolicy

if TYPE_CHECKING:
    from tq.config import BrokerSettings

log = logging.getLogger("tq.broker")


async def reaper_loop(service: BrokerService, interval: float, worker_timeout: float) -> None:
    """Return expired leases and silent workers' tasks to pending."""
    while True:
        try:
            released = await service.reap(worker_timeout)
        except TQError as exc:
            log.error("lease reaper: %s", exc)
        else:
            if released:
                log.info("released %d task(s) whose lease expired", len(released))
        await trio.sleep(interval)


PROMOTER_MAX_SLEEP = 60.0  # seconds the promoter sleeps at most when nothing is due sooner
FOLLOWER_TICK = 1.0  # seconds between a follower's looks at whether it leads now


async def promoter_loop(service: BrokerService, max_sleep: float = PROMOTER_MAX_SLEEP) -> None:
    """Move failed (retry due) and scheduled tasks to pending when their time comes.

    Sleeps until the earliest due time (one indexed read of ``tasks_due``), at most
    ``max_sleep``, and is woken earlier when a due time may have come nearer: a
    delayed submit, a retry, or (several brokers) another broker's write
    (``BrokerService.notify_due``). A backlog of scheduled tasks costs nothing
    while none is due: no scan, no polling."""
    while True:
        if not service.runs_upkeep:
            await trio.sleep(min(max_sleep, FOLLOWER_TICK))
            continue
        changed = service.due_changed()  # taken before the reads: no lost wake-up
        try:
            await service.promote()
            due = await service.store.next_due()
        except TQError as exc:
            log.error("retry promoter: %s", exc)
            due = None
            await trio.sleep(min(max_sleep, FOLLOWER_TICK))  # a failing store: not in a loop
        delay = max_sleep if due is None else min(max_sleep, max(0.0, due - service.clock()))
        with trio.move_on_after(delay):
            await changed.wait()


RETENTION_INTERVAL = 60.0  # seconds between retention passes once nothing more is due
RETENTION_BATCH = 500  # finished tasks deleted per transaction at most
RETENTION_PAUSE = 0.02  # seconds between two full batches: other writes go in between


def retention_policy(settings: BrokerSettings) -> RetentionPolicy:
    """The broker settings' TTLs (``retention_*``) as a policy."""
    return RetentionPolicy.of(
        {
            "succeeded": settings.retention_succeeded,
            "dead": settings.retention_dead,
            "cancelled": settings.retention_cancelled,
        },
        {(queue, state): ttl for queue, state, ttl in settings.retention_queues},
    )


async def retention_loop(
    service: BrokerService,
    policy: RetentionPolicy,
    *,
    interval: float = RETENTION_INTERVAL,
    batch: int = RETENTION_BATCH,
) -> None:
    """Delete finished tasks whose TTL passed (tq.core.retention), a bounded batch per
    transaction, pausing between batches, until a batch comes back short; then sleep
    ``interval``. Each batch reads only what it deletes (the ``tasks_finished``
    index), so the cost follows the rate tasks finish at, not the store's size."""
    if not policy.active:
        return
    while True:
        full = False
        if service.runs_upkeep:
            try:
                deleted = await service.expire(policy, batch)
            except TQError as exc:
                log.error("retention: %s", exc)
            else:
                full = deleted >= batch
                if deleted:
                    log.debug("retention: deleted %d finished task(s)", deleted)
        await trio.sleep(RETENTION_PAUSE if full else interval)


async def scheduler_loop(service: BrokerService) -> None:
    """Fire recurring schedules when their ticks come (tq/broker/schedules.py): sleep until
    the earliest next tick, at most SCHEDULER_MAX_SLEEP, or until a schedule changes."""
    from tq.broker.schedules import SCHEDULER_MAX_SLEEP

    while True:
        if not service.runs_upkeep:  # the leader fires (any broker could: it is transactional)
            await trio.sleep(SCHEDULER_MAX_SLEEP)
            continue
        try:
            await service.fire_due()
            due = await service.store.next_schedule_at()
        except TQError as exc:
            log.error("scheduler: %s", exc)
            due = None
        delay = SCHEDULER_MAX_SLEEP
        if due is not None:
            delay = min(delay, max(0.0, due - service.clock()))
        with trio.move_on_after(delay):
            await service.wait_schedules_changed()
