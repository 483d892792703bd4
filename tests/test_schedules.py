"""Recurring schedules: the tick arithmetic (tq.core.schedule), the scheduler loop
under trio's fake clock against a real SQLite store, and the whole path (the
`schedule` request, REST, the CLI) against a real broker process. The store's
behaviour on both backends is in tests/test_store.py."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trio
import trio.testing

from tq.broker.loops import scheduler_loop
from tq.broker.service import BrokerService
from tq.core.errors import Forbidden, InvalidRequest
from tq.core.schedule import (
    GRACE,
    MAX_CATCH_UP,
    check_schedule,
    parse_schedule,
    plan,
    upcoming,
)
from tq.core.task import ListFilter, ScheduleTaskIn
from tq.protocol.answers import ScheduleAddAnswer, ScheduleAnswer
from tq.protocol.schema import Schedule as ScheduleRequest
from tq.store.sqlite import open_sqlite_store
from tq.testing import BrokerProcess, tq_command

NOW = datetime(2026, 3, 27, 12, 0, tzinfo=UTC).timestamp()  # a Friday, before DST


def schedule(cron: str = "0 9 * * *", zone: str = "UTC", missed: str = "skip") -> Any:
    fields = {"name": "s", "cron": cron, "timezone": zone, "task": {"type": "t"}, "missed": missed}
    return check_schedule(parse_schedule(fields), NOW)


# -- ticks -----------------------------------------------------------------------------


def test_ticks_are_read_in_the_schedules_time_zone_across_dst() -> None:
    berlin = schedule("0 9 * * *", "Europe/Berlin")
    local = [
        datetime.fromtimestamp(at, ZoneInfo("Europe/Berlin")) for at in upcoming(berlin, NOW, 4)
    ]
    assert [d.strftime("%d %H:%M") for d in local] == [
        "28 09:00",
        "29 09:00",
        "30 09:00",
        "31 09:00",
    ]
    offsets = [d.utcoffset().total_seconds() / 3600 for d in local]  # type: ignore[union-attr]
    assert offsets == [1.0, 2.0, 2.0, 2.0]  # DST began on the 29th: 08:00 UTC, then 07:00


def test_a_tick_in_an_hour_dst_skips_or_repeats_runs_once() -> None:
    """Debian cron's rule, as cronsim applies it (and OPERATIONS.md says)."""
    zone = ZoneInfo("Europe/Berlin")
    nightly = schedule("30 2 * * *", "Europe/Berlin")

    def local(start: datetime) -> list[str]:
        ticks = upcoming(nightly, start.timestamp(), 3)
        return [datetime.fromtimestamp(t, zone).strftime("%d %H:%M%z") for t in ticks]

    assert local(datetime(2026, 3, 28, tzinfo=UTC)) == [
        "28 02:30+0100",
        "29 03:00+0200",  # 02:30 does not exist on the 29th
        "30 02:30+0200",
    ]
    assert local(datetime(2026, 10, 24, tzinfo=UTC)) == [
        "24 02:30+0200",
        "25 02:30+0200",  # 02:30 happens twice on the 25th: one run
        "26 02:30+0100",
    ]


def test_a_tick_fired_late_within_the_grace_is_not_missed() -> None:
    s = schedule("*/5 * * * *")
    decided = plan(s, s.next_at + GRACE - 1)
    assert decided.fire == [s.next_at] and decided.skipped == 0
    assert decided.next_at == s.next_at + 300


@pytest.mark.parametrize(("missed", "fired"), [("skip", 0), ("once", 1), ("all", 12)])
def test_missed_tick_policies(missed: str, fired: int) -> None:
    s = schedule("*/5 * * * *", missed=missed)
    decided = plan(s, s.next_at + 3300 + GRACE + 10)  # an hour of ticks, all stale
    assert len(decided.fire) == fired
    assert decided.skipped == 12 - fired
    assert decided.fire == sorted(decided.fire)


def test_catching_up_is_bounded() -> None:
    s = schedule("* * * * *", missed="all")
    decided = plan(s, s.next_at + 30 * 86400)  # a month of minutes
    assert len(decided.fire) == MAX_CATCH_UP
    assert decided.skipped is None  # too many to count
    assert decided.fire[-1] <= s.next_at + 30 * 86400 < decided.next_at


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"cron": "* * *"}, "must have five fields"),
        ({"cron": "   "}, "must have five fields"),
        ({"cron": "0 25 * * *"}, "Bad hour"),
        ({"cron": 5}, "schedule cron must be a string of 1..200 characters, got int 5"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
        ({"missed": "sometimes"}, "schedule missed must be one of all, once, skip, got str"),
        (
            {"task": {"type": "t", "idempotency_key": "k"}},
            "schedule task: unknown task field idempotency_key; known: max_retries, payload,",
        ),
        ({"task": {"type": "t", "priority": 999}}, "must be 0..255"),
        ({"task": {"type": "t", "priority": True}}, "task priority must be an integer or a"),
        ({"task": {"type": "t", "payload": {"a": math.nan}}}, "task payload"),
        ({"task": None}, "schedule task must be a map; it is required"),
        ({"name": "two words"}, "schedule name must be a non-empty string of at most 200"),
        ({"timezon": "Europe/Berlin"}, "unknown schedule field timezon; known: cron, missed,"),
    ],
)
def test_bad_schedules_are_refused_with_the_reason(fields: dict[str, Any], said: str) -> None:
    """Plain data (a file, a test) goes through the same declaration as the wire's."""
    args = {"name": "s", "cron": "0 9 * * *", "timezone": None, "task": {"type": "t"}}
    args.update(fields)
    with pytest.raises(InvalidRequest, match=re.escape(said) if "(" in said else said):
        check_schedule(parse_schedule(args), NOW)


# -- the scheduler loop, on trio's fake clock -----------------------------------------------


@pytest.mark.trio
async def test_the_scheduler_fires_every_tick_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Fake time running 60 times faster than real time (autojump would leap over the
    store's thread while it writes): nine minutes take nine seconds."""
    mock_clock.rate = 60
    start = datetime(2026, 3, 27, 12, 0, 30, tzinfo=UTC).timestamp()
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        service = BrokerService(store, lease_ttl=30, clock=lambda: start + trio.current_time())
        added = await service.schedule_request(
            ScheduleRequest(
                id=0, op="add", name="minutely", cron="* * * * *", task=ScheduleTaskIn(type="tick")
            )
        )
        assert isinstance(added, ScheduleAddAnswer)
        assert added.created and added.schedule.next_runs[0] == start + 30
        with trio.move_on_after(5 * 60):  # five minutes of fake time: ticks at :01 .. :05
            await scheduler_loop(service)
        tasks = await store.list(ListFilter(limit=100))
        assert [t.type for t in tasks] == ["tick"] * 5
        created = [t.created_at for t in tasks]
        # each at its tick, give or take the store's real milliseconds (x60 here)
        assert all(0 <= c - (start + 30 + 60 * i) < 15 for i, c in enumerate(created)), created
        got = await service.schedule_request(ScheduleRequest(id=0, op="get", name="minutely"))
        assert isinstance(got, ScheduleAnswer)
        assert got.schedule.fired == 5 and got.schedule.last_task == tasks[-1].id

        # a pause stops it; a resume carries on from the next tick, owing nothing
        await service.schedule_request(ScheduleRequest(id=0, op="pause", name="minutely"))
        with trio.move_on_after(3 * 60):
            await scheduler_loop(service)
        assert len(await store.list(ListFilter(limit=100))) == 5
        await service.schedule_request(ScheduleRequest(id=0, op="resume", name="minutely"))
        with trio.move_on_after(60):
            await scheduler_loop(service)
        assert len(await store.list(ListFilter(limit=100))) == 6


# -- the whole path, a real broker ------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("schedules") / "broker") as proc:
        yield proc


def tq(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tq_command(*args, *broker.client_args()), capture_output=True, text=True, timeout=60
    )


def test_the_schedule_commands(broker: BrokerProcess) -> None:
    added = tq(
        broker, "schedule", "add", "nightly", "--cron", "0 3 * * *", "--timezone",
        "Europe/Berlin", "--type", "export", "--payload", '{"full": true}', "--queue", "exports",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    first, second = added.stdout.splitlines()
    assert first.startswith("schedule nightly: At 03:00 every day (Europe/Berlin)")
    assert first.endswith("(added)") and "submits export to queue exports" in first
    assert second.startswith("next runs: ") and second.count("03:00") == 5

    again = tq(broker, "schedule", "add", "nightly", "--cron", "0 3 * * *", "--type", "export")
    assert again.stdout.splitlines()[0].endswith("(updated)")

    listed = json.loads(tq(broker, "schedule", "list", "--output", "json").stdout)
    assert [(s["name"], s["cron"], s["fired"]) for s in listed] == [("nightly", "0 3 * * *", 0)]
    shown = json.loads(tq(broker, "schedule", "show", "nightly", "--json").stdout)
    assert shown["timezone"] == "UTC" and len(shown["next_runs"]) == 5  # redeclared in UTC

    task_id = tq(broker, "schedule", "run-now", "nightly").stdout.strip()
    with broker.client() as client:
        task = client.get(task_id)
    assert (task.type, task.queue, task.payload) == ("export", "default", None)

    assert tq(broker, "schedule", "pause", "nightly").stdout.strip() == "schedule nightly paused"
    paused = json.loads(tq(broker, "schedule", "show", "nightly", "--json").stdout)
    assert paused["paused"] is True and paused["next_runs"] == [] and paused["fired"] == 1
    resumed = tq(broker, "schedule", "resume", "nightly").stdout
    assert resumed.startswith("schedule nightly resumed; next run ")
    assert tq(broker, "schedule", "remove", "nightly").stdout.strip() == "schedule nightly removed"
    gone = tq(broker, "schedule", "show", "nightly")
    assert gone.returncode == 3 and "no schedule named 'nightly'" in gone.stderr


def test_bad_schedule_input_is_a_clear_error(broker: BrokerProcess) -> None:
    bad = tq(broker, "schedule", "add", "x", "--cron", "61 * * * *", "--type", "t")
    assert bad.returncode == 2 and "cron '61 * * * *': Bad minute" in bad.stderr, bad
    zone = tq(broker, "schedule", "add", "x", "--cron", "0 * * * *", "--timezone", "Nowhere",
              "--type", "t")  # fmt: skip
    assert zone.returncode == 2 and "unknown timezone 'Nowhere'" in zone.stderr
    assert "Traceback" not in bad.stderr + zone.stderr


def test_schedules_over_rest_and_who_may_change_them(broker: BrokerProcess) -> None:
    body = {"cron": "*/15 * * * *", "task": {"type": "poll", "payload": [1, 2]}}
    with broker.http_client() as http:
        made = http.put("/api/v1/schedules/poller", json=body)
        assert made.status_code == 201, made.text
        assert "15" in made.json()["schedule"]["description"]  # cronsim's words
        assert http.put("/api/v1/schedules/poller", json=body).status_code == 200
        listed = http.get("/api/v1/schedules").json()["schedules"]
        assert "poller" in {s["name"] for s in listed}
        ran = http.post("/api/v1/schedules/poller/run-now").json()
        assert ran["schedule"]["fired"] == 1
        bad = http.put("/api/v1/schedules/poller", json={"cron": "nope", "task": {"type": "t"}})
        assert bad.status_code == 400 and "five fields" in bad.text
    made = tq(broker, "keys", "create", "--role", "reader", "--name", "viewer", "--output", "json")
    reader_key = json.loads(made.stdout)["key"]
    from tq.client import BlockingClient

    with BlockingClient(broker.address, ca=broker.ca, key=reader_key) as reader:
        assert any(s["name"] == "poller" for s in reader.schedule("list")["schedules"])
        with pytest.raises(Forbidden):
            reader.schedule("remove", name="poller")
    with broker.http_client() as http:
        assert http.delete("/api/v1/schedules/poller").json() == {"removed": True}


def test_a_schedule_task_keeps_bytes_payloads(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.schedule(
            "add", name="binary", cron="0 0 1 1 *", task={"type": "b", "payload": b"\x00\xff"}
        )
        ran = client.schedule("run_now", name="binary")
        assert client.get(ran["task"]).payload == b"\x00\xff"
    with broker.http_client() as http:  # JSON carries it as base64 text
        shown = http.get("/api/v1/schedules/binary").json()["schedule"]
    assert shown["task"]["payload"] == "AP8="
