"""Recurring schedules in the service layer: the ``schedule`` request and firing.

``ScheduleOps`` is a mixin of ``BrokerService`` (like ``OperatorOps``). The
wire, REST and the CLI all call ``schedule_request``; the broker's
``scheduler_loop`` (tq/broker/loops.py) calls ``fire_due`` and sleeps until
``next_schedule_at`` (at most ``SCHEDULER_MAX_SLEEP``, so a schedule another
broker added to a shared PostgreSQL store is seen within that), woken early
when a schedule changes through this broker.

Who may do what: ``list`` and ``get`` are reads (reader, producer, admin);
everything that changes a schedule or submits from it is admin only. A key
limited to some queues sees and acts on the schedules whose task goes to one
of its queues. Changes are audited (``schedule.add``, ``schedule.remove``,
``schedule.pause``, ``schedule.resume``, ``schedule.run_now``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from tq.core.errors import Forbidden, PayloadTooLarge
from tq.core.schedule import Schedule, ScheduleIn, check_schedule, describe, upcoming
from tq.core.task import MAX_PAYLOAD_BYTES, TaskSpec
from tq.protocol.answers import (
    ScheduleAddAnswer,
    ScheduleAnswer,
    ScheduleChangeAnswer,
    ScheduleListAnswer,
    ScheduleMap,
    ScheduleRemoveAnswer,
    ScheduleRunAnswer,
)
from tq.protocol.schema import Schedule as ScheduleRequest
from tq.protocol.schema import check_op, check_required
from tq.store.base import SubmitResult
from tq.store.schedule_sql import FIRE_BATCH

if TYPE_CHECKING:
    from tq.broker.auth import Auth
    from tq.broker.events import EventBus
    from tq.security.roles import Principal
    from tq.store.base import Store

log = logging.getLogger("tq.broker")

# what a ``schedule`` request answers, by op (tq/protocol/answers.py)
ScheduleReply = (
    ScheduleAddAnswer
    | ScheduleListAnswer
    | ScheduleAnswer
    | ScheduleRemoveAnswer
    | ScheduleChangeAnswer
    | ScheduleRunAnswer
)
SCHEDULER_MAX_SLEEP = 1.0  # seconds between looks at the schedules when none is due sooner


class ScheduleOps:
    # provided by BrokerService
    store: Store
    auth: Auth
    clock: Callable[[], float]
    counters: dict[str, int]
    events: EventBus
    max_payload: int
    notify_work: Callable[[], None]
    _schedules_changed: trio.Event

    def notify_schedules(self) -> None:
        self._schedules_changed.set()
        self._schedules_changed = trio.Event()

    async def wait_schedules_changed(self) -> None:
        await self._schedules_changed.wait()

    async def schedule_request(
        self, msg: ScheduleRequest, principal: Principal | None = None
    ) -> ScheduleReply:
        """One ``schedule`` request (op: add, list, get, remove, pause, resume, run_now);
        its fields' types and ranges are the declaration's (tq/protocol/schema.py)."""
        op = check_op(msg)
        check_required(msg)
        now, rid = self.clock(), msg.id
        if op == "list":
            found = [s for s in await self.store.list_schedules() if _sees(principal, s)]
            return ScheduleListAnswer(id=rid, schedules=[schedule_map(s, now) for s in found])
        name = msg.name
        assert name is not None  # required by every op but list
        if op == "add":
            assert msg.cron is not None and msg.task is not None  # required by add
            spec = ScheduleIn(
                name=name, cron=msg.cron, task=msg.task, timezone=msg.timezone, missed=msg.missed
            )
            schedule = check_schedule(spec, now)
            self._check_payload(schedule)
            if principal is not None:
                principal.check_queue(str(schedule.task["queue"]))
            stored, created = await self.store.put_schedule(schedule)
            self.notify_schedules()
            await self._record(principal, "schedule.add", stored.name, {"cron": stored.cron})
            return ScheduleAddAnswer(id=rid, schedule=schedule_map(stored, now), created=created)
        current = await self.store.get_schedule(name)
        if not _sees(principal, current):
            raise Forbidden(f"this key may not use the queue of schedule {name!r}")
        if op == "get":
            return ScheduleAnswer(id=rid, schedule=schedule_map(current, now))
        if op == "remove":
            removed = await self.store.remove_schedule(name)
            self.notify_schedules()
            if removed:
                await self._record(principal, "schedule.remove", name, {})
            return ScheduleRemoveAnswer(id=rid, removed=removed)
        if op in ("pause", "resume"):
            schedule, changed = await self.store.pause_schedule(name, op == "pause", now)
            self.notify_schedules()
            if changed:
                await self._record(principal, f"schedule.{op}", name, {})
            return ScheduleChangeAnswer(
                id=rid, schedule=schedule_map(schedule, now), changed=changed
            )
        schedule, task_id = await self.store.run_schedule(name, now)  # run_now
        self._submitted(schedule, [task_id])
        await self._record(principal, "schedule.run_now", name, {"task": task_id})
        return ScheduleRunAnswer(id=rid, schedule=schedule_map(schedule, now), task=task_id)

    def _check_payload(self, schedule: Schedule) -> None:
        """Each tick submits the schedule's task: its payload must fit a submit (this
        broker's limit and the store's), else every tick would fail, and with it the
        firing of the schedules due with it."""
        from tq.protocol.frames import pack

        limit = min(self.max_payload, MAX_PAYLOAD_BYTES)
        size = len(pack(schedule.task.get("payload")))
        if size > limit:
            raise PayloadTooLarge(
                f"schedule {schedule.name!r}: its task's payload is {size} bytes once encoded; "
                f"each tick submits it, and this broker's limit is {limit} bytes (store large "
                "data elsewhere and pass a reference)"
            )

    async def fire_due(self) -> int:
        """Fire every due schedule (in batches); the number of tasks submitted."""
        total = 0
        while True:
            fired = await self.store.fire_schedules(self.clock())
            for one in fired:
                if one.task_ids:
                    spec = TaskSpec(type=one.type, queue=one.queue)
                    self._submitted_specs([spec] * len(one.task_ids), one.task_ids)
                    total += len(one.task_ids)
                if one.skipped:
                    log.info("schedule %s: %d missed tick(s) not fired", one.schedule, one.skipped)
                elif one.skipped is None:
                    log.info("schedule %s: many missed ticks not fired", one.schedule)
            if len(fired) < FIRE_BATCH:
                return total

    def _submitted(self, schedule: Schedule, ids: list[str]) -> None:
        task = schedule.task
        spec = TaskSpec(type=str(task["type"]), queue=str(task["queue"]))
        self._submitted_specs([spec] * len(ids), ids)

    def _submitted_specs(self, specs: list[TaskSpec], ids: list[str]) -> None:
        self.counters["submitted"] += len(ids)
        self.events.submitted(specs, [SubmitResult(i, True) for i in ids])
        self.notify_work()

    async def _record(
        self, principal: Principal | None, action: str, target: str, detail: dict[str, Any]
    ) -> None:
        from tq.broker.auth import actor_of

        await self.auth.record(actor_of(principal), action, target, detail)


def schedule_map(schedule: Schedule, now: float) -> ScheduleMap:
    """A stored schedule as its answer map: ``next_runs``, the next PREVIEW ticks after
    ``now`` (none while paused), and ``description``, the cron expression in words."""
    paused = schedule.paused_at is not None
    return ScheduleMap(
        name=schedule.name,
        cron=schedule.cron,
        timezone=schedule.timezone,
        task=schedule.task,
        missed=schedule.missed,
        paused=paused,
        paused_at=schedule.paused_at,
        next_at=None if paused else schedule.next_at,
        last_fired_at=schedule.last_fired_at,
        last_task=schedule.last_task,
        fired=schedule.fired,
        created_at=schedule.created_at,
        updated_at=schedule.updated_at,
        description=describe(schedule.cron),
        next_runs=[] if paused else upcoming(schedule, max(now, schedule.next_at - 1e-6)),
    )


def _sees(principal: Principal | None, schedule: Schedule) -> bool:
    return (
        principal is None
        or principal.queues is None
        or principal.may_use(str(schedule.task.get("queue")))
    )
