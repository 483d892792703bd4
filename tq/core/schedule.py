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

A schedule is declared once (``ScheduleIn``: its task is ``ScheduleTaskIn``, the
task spec's fields a schedule may carry); the wire's ``schedule`` request uses the
same declarations and plain data (a file, a test) is converted into them
(``parse_schedule``), so ``check_schedule`` checks only what no declaration can
say: the cron grammar, a known time zone, the rules joining a task's fields.

``plan`` decides, for one due schedule, which ticks to fire now and when the
next one is: the store calls it inside the transaction that inserts the
tasks and moves ``next_at``, so a tick fires exactly once however many
brokers look.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError
from msgspec import Meta

from tq.core.errors import InvalidRequest
from tq.core.limits import MAX_CRON_LENGTH, MAX_TIMEZONE
from tq.core.task import Name, ScheduleTaskIn, TaskSpec, TaskSpecIn
from tq.core.typed import explain

GRACE = 60.0  # seconds: a tick older than this when fired counts as missed
MAX_CATCH_UP = 100  # ticks fired at most for one schedule at once (policy "all")
MAX_TICKS_WALKED = 10_000  # past ticks walked at most before jumping to the present
PREVIEW = 5  # next runs shown by list/show

# what a schedule is declared with (the wire's ``schedule`` request uses these too)
Cron = Annotated[str, Meta(min_length=1, max_length=MAX_CRON_LENGTH)]  # five fields: check_cron
Zone = Annotated[str, Meta(min_length=1, max_length=MAX_TIMEZONE)]  # an IANA name: check_cron
Missed = Literal["skip", "once", "all"]


class ScheduleIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A schedule as declared: the fields of the wire's ``schedule`` add (whose
    declaration guarantees these types), or plain data decoded by ``parse_schedule``."""

    name: Name
    cron: Cron
    task: ScheduleTaskIn
    timezone: Zone | None = None
    missed: Missed | None = None


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


def parse_schedule(fields: object) -> ScheduleIn:
    """A schedule given as plain data (a file, a test) as its declaration; InvalidRequest
    naming the field and its rule otherwise. ``check_schedule`` does the rest."""
    try:
        return msgspec.convert(fields, ScheduleIn, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(explain(exc, ScheduleIn, fields, what="schedule")) from None


def check_cron(cron: str, timezone: str | None = None) -> tuple[str, str]:
    """The cron expression (its grammar) and time zone (a known one); their types and
    lengths are the declaration's. InvalidRequest says what is wrong."""
    cron = " ".join(cron.split())
    if len(cron.split()) != 5:
        raise InvalidRequest(
            f"cron {cron!r} must have five fields: minute hour day-of-month month "
            "day-of-week (e.g. '0 9 * * MON-FRI')"
        )
    zone = "UTC" if timezone is None else timezone
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


def check_schedule(spec: ScheduleIn, now: float) -> Schedule:
    """A new or redeclared schedule, checked beyond its declaration (the cron grammar,
    the zone, the task with a submit's rules); ``next_at`` is the first tick after
    ``now``."""
    expr, zone = check_cron(spec.cron, spec.timezone)
    task = spec.task
    fields = msgspec.structs.asdict(task)
    checked = TaskSpec.of(TaskSpecIn(**fields))  # the same rules as a submit
    kept = {key: value for key, value in fields.items() if value is not None}
    kept["type"], kept["queue"], kept["priority"] = checked.type, checked.queue, checked.priority
    policy = spec.missed or "skip"
    base = Schedule(spec.name, expr, zone, kept, policy, created_at=now, updated_at=now)
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
