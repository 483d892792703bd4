"""Recurring schedules: validation and the arithmetic of ticks (pure: no I/O).

A schedule is a name, a cron expression (five fields, evaluated by the
cronsim library the way Debian's cron does, DST transitions included) in a
time zone (an IANA name, default UTC), the task it submits at each tick, and
a policy for ticks missed while no broker ran:

* ``skip`` (default): missed ticks are dropped; the schedule carries on with
  its next tick;
* ``once``: one task stands in for all the missed ticks;
* ``all``: one task per missed tick, at most ``MAX_CATCH_UP`` (the latest).

A tick counts as *missed* when it is more than ``GRACE`` seconds old by the
time a broker gets to it; a tick fired late within the grace (a busy broker,
a restart of a few seconds) is simply late, not missed.

``plan`` decides, for one due schedule, which ticks to fire now and when the
next one is: the store calls it inside the transaction that inserts the
tasks and moves ``next_at``, so a tick fires exactly once however many
brokers look.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from tq.core.errors import InvalidRequest
from tq.core.limits import MAX_CRON_LENGTH, MAX_TIMEZONE
from tq.core.task import TaskSpec, _name

MISSED_POLICIES = ("skip", "once", "all")
GRACE = 60.0  # seconds: a tick older than this when fired counts as missed
MAX_CATCH_UP = 100  # ticks fired at most for one schedule at once (policy "all")
MAX_TICKS_WALKED = 10_000  # past ticks walked at most before jumping to the present
PREVIEW = 5  # next runs shown by list/show
SCHEDULE_TASK_FIELDS = frozenset(
    {"type", "payload", "queue", "priority", "max_retries", "timeout", "retry_base", "retry_cap"}
)


@dataclass(frozen=True)
class Schedule:
    """A stored schedule. ``task`` is the submit map each tick uses."""

    name: str
    cron: str
    timezone: str
    task: dict[str, Any]
    missed: str = "skip"
    next_at: float = 0.0
    paused_at: float | None = None
    last_fired_at: float | None = None
    last_task: str | None = None
    fired: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0


def check_name(name: object) -> str:
    """A schedule's name: the rules of queue and type names."""
    try:
        return _name({"name": name}, "name", None)
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc.message).replace("task name", "schedule name")) from None


def check_cron(cron: object, timezone: object = None) -> tuple[str, str]:
    """The cron expression and time zone, checked: InvalidRequest says what is wrong."""
    if not isinstance(cron, str) or not cron.strip() or len(cron) > MAX_CRON_LENGTH:
        raise InvalidRequest(
            f"cron must be a cron expression (five fields, e.g. '*/5 * * * *'), "
            f"at most {MAX_CRON_LENGTH} characters"
        )
    cron = " ".join(cron.split())
    if len(cron.split()) != 5:
        raise InvalidRequest(
            f"cron {cron!r} must have five fields: minute hour day-of-month month "
            "day-of-week (e.g. '0 9 * * MON-FRI')"
        )
    zone = "UTC" if timezone is None else timezone
    if not isinstance(zone, str) or not zone or len(zone) > MAX_TIMEZONE:
        raise InvalidRequest("timezone must be an IANA time zone name such as Europe/Berlin")
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(
            f"unknown timezone {zone!r}: use an IANA name such as UTC, Europe/Berlin or "
            "America/New_York"
        ) from None
    try:
        CronSim(cron, datetime.now(tz))
    except CronSimError as exc:
        raise InvalidRequest(f"cron {cron!r}: {exc}") from None
    return cron, zone


def check_schedule(
    name: object,
    cron: object,
    timezone: object,
    task: object,
    missed: object,
    now: float,
) -> Schedule:
    """A new or redeclared schedule from a request's fields, checked; ``next_at`` is the
    first tick after ``now``."""
    checked_name = check_name(name)
    expr, zone = check_cron(cron, timezone)
    policy = "skip" if missed is None else missed
    if policy not in MISSED_POLICIES:
        raise InvalidRequest(f"missed must be one of {', '.join(MISSED_POLICIES)}, not {policy!r}")
    if not isinstance(task, Mapping):
        raise InvalidRequest(
            "a schedule needs 'task': a map like a submit's task (type, payload...)"
        )
    unknown = sorted(set(task) - SCHEDULE_TASK_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"a schedule's task cannot carry {', '.join(map(repr, unknown))}; it may have "
            f"{', '.join(sorted(SCHEDULE_TASK_FIELDS))}"
        )
    spec = TaskSpec.from_mapping(task)  # the same rules as a submit
    kept = {key: value for key, value in task.items() if value is not None}
    kept["type"], kept["queue"], kept["priority"] = spec.type, spec.queue, spec.priority
    base = Schedule(checked_name, expr, zone, kept, str(policy), created_at=now, updated_at=now)
    return replace(base, next_at=next_after(base, now))


def _walk(schedule: Schedule, after: float) -> CronSim:
    zone = ZoneInfo(schedule.timezone)
    start = datetime.fromtimestamp(after, UTC).astimezone(zone).replace(microsecond=0)
    return CronSim(schedule.cron, start)


def next_after(schedule: Schedule, after: float) -> float:
    """The first tick strictly after ``after`` (Unix seconds)."""
    for tick in _walk(schedule, after):
        at = tick.timestamp()
        if at > after:
            return at
    raise AssertionError("unreachable: CronSim is endless for a valid expression")


def upcoming(schedule: Schedule, after: float, n: int = PREVIEW) -> list[float]:
    out: list[float] = []
    at = after
    while len(out) < n:
        at = next_after(schedule, at)
        out.append(at)
    return out


def describe(cron: str) -> str:
    """The expression in words (cronsim's explanation), or the expression itself."""
    try:
        return str(CronSim(cron, datetime.now(UTC)).explain())
    except Exception:  # an explanation is a nicety: never fail a listing for it
        return cron


@dataclass(frozen=True)
class Plan:
    fire: list[float]  # tick times to submit a task for, oldest first
    next_at: float  # the schedule's next tick after this firing
    skipped: int | None  # past ticks not fired (None: more than MAX_TICKS_WALKED)


def plan(schedule: Schedule, now: float) -> Plan:
    """For a due schedule (``next_at <= now``): which ticks to fire and the next one."""
    ticks: list[float] = []
    at = schedule.next_at
    while at <= now and len(ticks) < MAX_TICKS_WALKED:
        ticks.append(at)
        at = next_after(schedule, at)
    walked_all = at > now
    if not walked_all:  # more past ticks than we walk: the latest ones, then the present
        ticks = _latest(schedule, now, MAX_CATCH_UP)
        at = next_after(schedule, now)
    late = [t for t in ticks if t < now - GRACE]
    current = [t for t in ticks if t >= now - GRACE]
    if schedule.missed == "all":
        fire = late[-MAX_CATCH_UP:] + current
        fire = fire[-MAX_CATCH_UP:]
    elif schedule.missed == "once" and late:
        fire = [ticks[-1]]
    else:  # skip, or once with nothing missed
        fire = current
    return Plan(fire, at, len(ticks) - len(fire) if walked_all else None)


def _latest(schedule: Schedule, now: float, n: int) -> list[float]:
    """The last ``n`` ticks at or before ``now``, oldest first."""
    zone = ZoneInfo(schedule.timezone)
    start = datetime.fromtimestamp(now, UTC).astimezone(zone)
    out: list[float] = []
    for tick in CronSim(schedule.cron, start, reverse=True):
        at = tick.timestamp()
        if at <= now:
            out.append(at)
        if len(out) >= n:
            break
    return out[::-1]


def tick_key(name: str, tick: float) -> str:
    """The idempotency key of the task a tick submits: a tick inserts at most one task,
    even if two brokers fire it."""
    return f"tq-schedule:{name}:{tick:.0f}"
