"""Live events: subscribe/unsubscribe on the wire, the broker's bus, both clients."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tq.broker import events as bus_module
from tq.broker.events import DETAIL_LIMIT, SUBSCRIBER_BUFFER, EventBus, event_fields
from tq.client import Client
from tq.client._api import Event
from tq.core.errors import ConnectionFailed, InvalidRequest, InvalidTransition, Unavailable
from tq.protocol import answers
from tq.testing import running_broker, running_worker

pytestmark = pytest.mark.trio


async def next_event(events: Any, topic: str, seconds: float = 10.0) -> Event:
    """The next event of ``topic`` (others are skipped)."""
    with trio.fail_after(seconds):
        async for event in events:
            if event.topic == topic:
                return event
    raise AssertionError("the subscription ended")


async def collect_changes(events: Any, wanted: int, seconds: float = 10.0) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    with trio.fail_after(seconds):
        while len(changes) < wanted:
            event = await next_event(events, "tasks", seconds)
            changes += event.data["changes"]
    return changes


async def counts_settle(events: Any, client: Client, seconds: float = 10.0) -> dict[str, Any]:
    """Counts events until one equals what `query stats` says."""
    with trio.fail_after(seconds):
        while True:
            event = await next_event(events, "counts", seconds)
            if event.data["queues"] == (await client.stats())["queues"]:
                return dict(event.data["queues"])


@pytest.mark.slow
async def test_task_changes_and_counts_follow_a_task_through_its_life(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        async with client.subscribe(["tasks", "counts"]) as events:
            assert sorted(events.topics) == ["counts", "tasks"]
            first = await next_event(events, "counts")  # a new subscriber gets counts at once
            assert first.data["queues"] == {} and first.seq >= 1
            ids = [await client.submit("echo", i, queue="q1") for i in range(3)]
            submitted = await collect_changes(events, 3)
            assert {c["id"] for c in submitted} == set(ids)
            assert all(
                (c["type"], c["queue"], c["from"], c["to"]) == ("echo", "q1", None, "pending")
                for c in submitted
            )
            assert await counts_settle(events, client) == {"q1": {"pending": 3}}
            async with running_worker(broker, queues=("q1",)):
                for task_id in ids:
                    await client.wait(task_id, timeout=10)
                changes = await collect_changes(events, 6)
            moves = sorted((c["from"], c["to"]) for c in changes if c["id"] == ids[0])
            assert moves == [("pending", "running"), ("running", "succeeded")]
            assert all(c["type"] == "echo" and c["queue"] == "q1" for c in changes)
            assert await counts_settle(events, client) == {"q1": {"succeeded": 3}}


@pytest.mark.slow
async def test_a_batch_is_one_compact_event(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        async with client.subscribe(["tasks"]) as events:
            n = 1000
            await client.submit_many([{"type": "echo", "queue": "bulk"}] * n)
            event = await next_event(events, "tasks")
            assert n > DETAIL_LIMIT
            assert event.data["changes"] == [] and event.data["more"] == n
            assert event.data["totals"] == [
                {"queue": "bulk", "from": None, "to": "pending", "n": n}
            ]


@pytest.mark.slow
async def test_operator_changes_carry_the_state_before(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        task_id = await client.submit("echo", 1)
        async with client.subscribe(["tasks"]) as events:
            await client.cancel(task_id)
            await client.retry(task_id)
            changes = await collect_changes(events, 2)
    assert [(c["from"], c["to"]) for c in changes] == [
        ("pending", "cancelled"),
        ("cancelled", "pending"),
    ]


@pytest.mark.slow
async def test_bulk_retry_and_purge_are_published(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        ids = await client.submit_many([{"type": "echo", "queue": "ops"}] * 3)
        for task_id in ids:
            await client.cancel(task_id)
        async with client.subscribe(["tasks"]) as events:
            retried = await client.retry_many("cancelled")
            assert len(retried["retried"]) == 3
            event = await next_event(events, "tasks")
            assert {"queue": None, "from": None, "to": "pending", "n": 3} in event.data["totals"]
            for task_id in ids:
                await client.cancel(task_id)
            purged = await client.purge(["cancelled"], 0)
            assert purged["purged"] == 2  # never the newest task
            while True:  # the cancels come first; then the purge
                event = await next_event(events, "tasks")
                removed = [t for t in event.data["totals"] if t["to"] is None]
                if removed:
                    break
            assert removed == [{"queue": None, "from": None, "to": None, "n": 2}]


@pytest.mark.slow
async def test_workers_join_heartbeat_and_leave(tmp_path: Path) -> None:
    async with running_broker(tmp_path, lease_ttl=0.6) as broker, broker.client() as client:
        async with client.subscribe(["workers"]) as events:
            async with running_worker(broker, name="w-events") as worker_id:
                joined = await next_event(events, "workers")
                assert (joined.data["kind"], joined.data["worker_id"]) == ("joined", worker_id)
                assert joined.data["worker"]["name"] == "w-events"
                with trio.fail_after(10):
                    while (await next_event(events, "workers")).data["kind"] != "heartbeat":
                        pass
            with trio.fail_after(10):
                while (event := await next_event(events, "workers")).data["kind"] != "left":
                    pass
            assert (
                event.data["worker_id"] == worker_id and event.data["worker"]["connected"] is False
            )


@pytest.mark.slow
async def test_unsubscribe_then_requests_go_on(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        async with client.subscribe(["tasks"]) as events:
            await client.submit("echo", 1)  # requests share the connection meanwhile
            assert (await next_event(events, "tasks")).data["changes"][0]["to"] == "pending"
        # unsubscribed: the same connection subscribes again and still answers requests
        async with client.subscribe(["tasks"]) as events:
            task_id = await client.submit("echo", 2)
            change = (await next_event(events, "tasks")).data["changes"][0]
            assert change["id"] == task_id


@pytest.mark.slow
async def test_subscribe_refusals(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        with pytest.raises(InvalidRequest, match="unknown topic"):
            await client.subscribe(["bogus"]).start()
        with pytest.raises(InvalidRequest, match="non-empty list"):
            await client.request({"t": "subscribe", "topics": []})
        async with client.subscribe(["tasks"]):
            with pytest.raises(InvalidRequest, match="already has a subscription"):
                await client.subscribe(["counts"]).start()
        assert (await client.stats())["queues"] == {}


@pytest.mark.slow
async def test_set_priority_on_the_wire(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        low = await client.submit("echo", 1, queue="p")
        task = await client.set_priority(low, "high")
        assert task.priority == 200
        with pytest.raises(InvalidRequest, match="priority"):
            await client.set_priority(low, 300)
        async with running_worker(broker, queues=("p",)):
            await client.wait(low, timeout=10)
        with pytest.raises(InvalidTransition, match="succeeded"):
            await client.set_priority(low, 10)


@pytest.mark.slow
async def test_subscriber_sees_the_broker_go_away(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        events = client.subscribe(["tasks"])
        await events.start()
        broker.shutdown.set()
        # told why: the broker says it is shutting down before it closes the connection
        with pytest.raises(Unavailable, match="shutting down"), trio.fail_after(10):
            async for _ in events:
                pass


@pytest.mark.slow
async def test_blocking_client_subscription_in_a_thread(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        got: list[Event] = []
        ready = threading.Event()

        def reader() -> None:
            with broker.blocking_client() as blocking:
                with blocking.subscribe(["tasks"]) as events:
                    with pytest.raises(InvalidRequest, match="another client"):
                        blocking.stats()
                    ready.set()
                    for event in events:
                        got.append(event)
                        if sum(len(e.data["changes"]) for e in got) >= 2:
                            break
                assert blocking.stats()["queues"]  # unsubscribed: requests work again

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, reader)
            await trio.to_thread.run_sync(ready.wait, 10)
            await client.submit("echo", 1)
            await client.submit("echo", 2)
        assert [c["to"] for e in got for c in e.data["changes"]] == ["pending", "pending"]


@pytest.mark.slow
async def test_closing_a_blocking_client_wakes_its_reader(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        blocking = await trio.to_thread.run_sync(broker.blocking_client)
        events = await trio.to_thread.run_sync(blocking.subscribe, ["tasks"])
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                next(events)
            except ConnectionFailed as exc:
                errors.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        await trio.sleep(0.2)
        blocking.close()
        await trio.to_thread.run_sync(thread.join, 10)
        assert not thread.is_alive() and len(errors) == 1


# -- the bus itself: back-pressure never reaches publishers ------------------------------


def workers_event(i: int) -> answers.WorkersEvent:
    return answers.WorkersEvent(
        id=0, seq=0, topic="workers", time=1.0, kind="heartbeat", worker_id=f"w{i}", worker=None
    )


def tasks_event(i: int) -> answers.TasksEvent:
    return answers.TasksEvent(id=0, seq=0, topic="tasks", time=1.0, changes=[], more=i, totals=[])


def drain(channel: trio.MemoryReceiveChannel[answers.Event]) -> list[dict[str, Any]]:
    """The queued events as plain data (``event_fields``: no ``t``/``id``/``seq``)."""
    items = []
    while True:
        try:
            items.append(event_fields(channel.receive_nowait()))
        except trio.WouldBlock:
            return items


async def test_a_slow_subscriber_is_dropped_for_and_told_it_lagged() -> None:
    bus = EventBus(clock=lambda: 1.0)
    slow = bus.subscribe(1, ["workers"])
    fast = bus.subscribe(2, ["workers"])
    for i in range(SUBSCRIBER_BUFFER + 10):
        bus._offer("workers", workers_event(i))  # never blocks
        fast.receive.receive_nowait()  # the fast one keeps up
    assert fast.dropped_total == 0 and slow.dropped_total == 10
    for _ in range(5):  # the slow one catches up a little
        slow.receive.receive_nowait()
    bus._offer("workers", workers_event(-1))
    queued = drain(slow.receive)
    assert len(queued) == SUBSCRIBER_BUFFER - 5 + 2
    assert queued[-2] == {"topic": "lagged", "time": 1.0, "dropped": 10}
    assert queued[-1]["worker_id"] == "w-1"
    assert queued[-3]["worker_id"] == f"w{SUBSCRIBER_BUFFER - 1}"
    assert slow.dropped == 0


async def test_the_marker_is_retried_without_new_events(autojump_clock: trio.abc.Clock) -> None:
    from tq.store.base import StoreStats

    async def stats() -> StoreStats:
        return StoreStats()

    bus = EventBus()
    sub = bus.subscribe(1, ["tasks"])
    for i in range(SUBSCRIBER_BUFFER + 1):
        bus._offer("tasks", tasks_event(i))
    sub.receive.receive_nowait()  # room again, but nothing new is published
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bus._counts_loop, stats)
        await trio.sleep(bus_module.COUNTS_INTERVAL * 2)
        nursery.cancel_scope.cancel()
    last = drain(sub.receive)[-1]
    assert last["topic"] == "lagged" and last["dropped"] == 1


async def test_publishing_without_subscribers_does_nothing() -> None:
    bus = EventBus()
    bus.claimed([])  # no subscriber: returns before looking at its argument
    bus.submitted(None, None)  # type: ignore[arg-type]
    bus.worker("joined", "w", None)  # type: ignore[arg-type]
    assert bus._count == 0 and not bus._totals and bus.events_sent == 0


async def test_another_brokers_event_is_checked_before_it_is_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(clock=lambda: 1.0)
    sub = bus.subscribe(7, ["tasks"])
    good = event_fields(tasks_event(3))
    good["changes"] = [{"id": "t1", "type": "x", "queue": "q", "from": None, "to": "pending"}]
    bus.from_other_broker(good)
    event = sub.receive.receive_nowait()
    assert isinstance(event, answers.TasksEvent) and event.changes[0].to == "pending"
    assert event_fields(event) == good
    # a malformed one (another version's bug, or a forged notification) is not sent
    bus.from_other_broker({**good, "more": "many"})
    bus.from_other_broker({**good, "changes": [{"id": 1}]})
    with pytest.raises(trio.WouldBlock):
        sub.receive.receive_nowait()
    assert caplog.text.count("a tasks event from another broker is malformed") == 2
