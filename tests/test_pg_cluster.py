"""PostgreSQL only: several brokers on one database, as real processes on loopback TLS.

Two brokers racing claims on one backlog, a worker that moves from one broker
to another keeping its leases, the leader killed with SIGKILL and another
broker taking the upkeep over, a submit on one broker waking a claim parked
on another, and the database's clock for leases. Each test gets a schema of
its own in the session's throwaway cluster (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from tq.client import Client
from tq.core.task import Outcome, TaskSpec
from tq.store.base import BrokerSelf
from tq.store.postgres import open_postgres_store
from tq.testing import BrokerProcess, running_broker, running_worker, tq_command

TTL = "2"  # seconds of lease: short, so that expiry and worker loss show within a test


@contextlib.contextmanager
def brokers(tmp_path: Path, pg_url: str, *names: str) -> Iterator[list[BrokerProcess]]:
    """Broker processes on one PostgreSQL store, started in order (the first one
    started leads the cluster)."""
    with contextlib.ExitStack() as stack:
        procs = []
        for name in names:
            proc = BrokerProcess(tmp_path / name, "--store", pg_url, "--lease-ttl", TTL)
            procs.append(stack.enter_context(proc))
        yield procs


def key_of(procs: list[BrokerProcess]) -> str | None:
    """The admin key (the first broker on the empty store wrote it; all share it)."""
    return procs[0].key


@contextlib.asynccontextmanager
async def connect(
    broker: BrokerProcess, key: str | None, worker: str | None = None
) -> AsyncIterator[Client]:
    options: dict[str, Any] = {"ca": broker.ca, "key": key}
    if worker is not None:
        options.update(kind="worker", hello={"worker_id": worker, "queues": ["default"]})
    async with Client.connect(broker.address, **options) as client:
        yield client


async def claim(client: Client, n: int = 1, wait: float = 0) -> list[dict[str, Any]]:
    reply = await client.request({"t": "claim", "n": n, "queues": ["default"], "wait": wait})
    tasks: list[dict[str, Any]] = reply["tasks"]
    return tasks


async def report(client: Client, lease: dict[str, Any], **result: Any) -> dict[str, Any]:
    item = {"id": lease["id"], "token": lease["token"], "status": "ok", **result}
    reply = await client.request({"t": "result", "results": [item]})
    answer: dict[str, Any] = reply["results"][0]
    return answer


async def health(client: Client) -> dict[str, Any]:
    return await client.cluster_status()


@pytest.mark.trio
async def test_two_brokers_race_claims_and_never_lease_a_task_twice(
    tmp_path: Path, pg_url: str
) -> None:
    with brokers(tmp_path, pg_url, "a", "b") as (a, b):
        key = key_of([a, b])
        async with connect(a, key) as producer:
            ids = await producer.submit_many([{"type": "t", "payload": i} for i in range(400)])
        leased: list[tuple[str, int]] = []

        async def worker(broker: BrokerProcess, name: str) -> None:
            async with connect(broker, key, name) as client:
                while leases := await claim(client, n=7):
                    for lease in leases:
                        leased.append((lease["id"], lease["token"]))
                        assert (await report(client, lease, result=name))["accepted"]

        async with trio.open_nursery() as nursery:
            for i, broker in enumerate((a, b, a, b)):
                nursery.start_soon(worker, broker, f"w{i}")
        async with connect(b, key) as client:
            states = {(await client.get(task_id)).state for task_id in ids[::37]}
            stats = await client.stats()
    assert sorted(task_id for task_id, _ in leased) == sorted(ids)  # each exactly once
    assert states == {"succeeded"}
    assert stats["queues"]["default"]["succeeded"] == 400


@pytest.mark.trio
async def test_a_worker_that_moves_to_another_broker_keeps_its_leases(
    tmp_path: Path, pg_url: str
) -> None:
    """The worker claims on the leader, leaves it and heartbeats to the other broker
    for three lease lifetimes: the leader, which runs the upkeep and no longer hears
    from the worker, releases nothing; the worker reports with its token there."""
    with brokers(tmp_path, pg_url, "leader", "other") as (leader, other):
        key = key_of([leader, other])
        async with connect(leader, key) as producer:
            task_id = await producer.submit("t", 1, max_retries=5)
            assert (await health(producer))["role"] == "leader"
        async with connect(leader, key, "mover") as first:
            [lease] = await claim(first)
        assert lease["id"] == task_id
        async with connect(other, key, "mover") as second:
            assert (await health(second))["role"] == "follower"
            end = trio.current_time() + 3 * float(TTL)
            while trio.current_time() < end:
                beat = await second.request(
                    {"t": "heartbeat", "leases": [[task_id, lease["token"]]], "stats": {}}
                )
                assert beat["lost"] == []
                await trio.sleep(float(TTL) / 4)
            task = await second.get(task_id)
            assert task.state == "running" and task.attempts == 1
            assert (await report(second, lease, result="kept"))["accepted"]
            task = await second.get(task_id)
    assert task.state == "succeeded" and task.result == "kept" and task.attempts == 1


@pytest.mark.trio
async def test_a_worker_whose_broker_dies_keeps_its_leases_on_another(
    tmp_path: Path, pg_url: str
) -> None:
    """The worker claims on the leader, which is then killed: it goes on with the
    other broker (which takes the upkeep over), heartbeats and reports there."""
    with brokers(tmp_path, pg_url, "leader", "other") as (leader, other):
        key = key_of([leader, other])
        async with connect(other, key) as producer:
            task_id = await producer.submit("t", 1, max_retries=5)
        async with connect(leader, key, "survivor") as first:
            [lease] = await claim(first)
            with trio.fail_after(10):  # the leader's beat wrote the worker's row
                while not worker_row(pg_url, "survivor"):
                    await trio.sleep(0.05)
            leader.kill()
        async with connect(other, key, "survivor") as second:
            end = trio.current_time() + 3 * float(TTL)
            while trio.current_time() < end:
                beat = await second.request(
                    {"t": "heartbeat", "leases": [[task_id, lease["token"]]], "stats": {}}
                )
                assert beat["lost"] == []
                await trio.sleep(float(TTL) / 4)
            assert (await health(second))["role"] == "leader"
            assert (await report(second, lease, result="kept"))["accepted"]
            task = await second.get(task_id)
    assert task.state == "succeeded" and task.result == "kept" and task.attempts == 1
    assert worker_row(pg_url, "survivor") is not None


@pytest.mark.trio
async def test_when_the_leader_is_killed_another_broker_takes_the_upkeep_over(
    tmp_path: Path, pg_url: str
) -> None:
    with brokers(tmp_path, pg_url, "first", "second") as (first, second):
        key = key_of([first, second])
        async with connect(second, key) as client:
            status = await health(client)
            assert status["role"] == "follower"
            roles = {entry["address"]: entry["role"] for entry in status["brokers"]}
            assert roles == {first.address: "leader", second.address: "follower"}
            first.kill()  # kill -9: its database session, and with it the lock, ends
            expiring = await client.submit("t", 1, max_retries=3)
            retrying = await client.submit("t", 2, max_retries=3, retry_base=0.5, retry_cap=0.5)
            async with connect(second, key, "silent") as worker:
                leases = {lease["id"]: lease for lease in await claim(worker, n=2)}
                failed = {**leases[retrying], "status": "retry"}
                failed["error"] = {"type": "E", "message": "again", "traceback": ""}
                reply = await worker.request({"t": "result", "results": [failed]})
                assert reply["results"][0]["state"] == "failed"
            # nobody heartbeats the first lease, and the retry falls due: only a leader
            # releases and promotes them
            with trio.fail_after(30):
                while True:
                    states = [(await client.get(i)).state for i in (expiring, retrying)]
                    if states == ["pending", "pending"]:
                        break
                    await trio.sleep(0.1)
            status = await health(client)
        args = ["-o", "table", "--broker", second.address, "--ca", str(second.ca)]
        args += ["--key", key or ""]
        shown = subprocess.run(
            tq_command("cluster-status", *args),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "250"},  # one line per broker, whatever its id
        )
    assert status["role"] == "leader"
    assert shown.returncode == 0, shown.stderr
    assert f"leader at {second.address}" in shown.stdout, shown.stdout
    mine = [entry for entry in status["brokers"] if entry["self"]]
    assert [entry["role"] for entry in mine] == ["leader"]
    assert [e["role"] for e in status["brokers"] if e["address"] == first.address] == ["follower"]


@pytest.mark.trio
async def test_a_submit_on_one_broker_wakes_a_claim_parked_on_another(
    tmp_path: Path, pg_url: str
) -> None:
    """The claim waits up to 30 s and nothing on its broker polls: only the other
    broker's notification can hand it the task before its wait ends."""
    with brokers(tmp_path, pg_url, "a", "b") as (a, b):
        key = key_of([a, b])
        got: list[dict[str, Any]] = []
        async with connect(b, key, "parked") as worker, connect(a, key) as producer:
            async with trio.open_nursery() as nursery:

                async def parked() -> None:
                    started = trio.current_time()
                    got.extend(await claim(worker, wait=30))
                    got.append({"waited": trio.current_time() - started})

                nursery.start_soon(parked)
                with trio.fail_after(10):  # its broker's beat wrote the worker's row
                    while not worker_row(pg_url, "parked"):
                        await trio.sleep(0.05)
                await trio.sleep(0.5)  # the claim found nothing and waits
                reply = await producer.request(
                    {"t": "submit", "tasks": [{"type": "t", "payload": "wake up"}]}
                )
    [task] = reply["tasks"]
    assert [lease["id"] for lease in got[:-1]] == [task["id"]]
    assert got[-1]["waited"] < 30
    # no worker is connected to the producer's broker, but one of the cluster takes
    # any type: no "no connected worker handles" warning
    assert reply["warnings"] == []


def worker_row(url: str, worker_id: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT broker FROM workers WHERE id = %s", (worker_id,)).fetchone()


@pytest.mark.trio
async def test_a_cluster_members_leases_use_the_database_clock(pg_url: str) -> None:
    """A broker whose clock is an hour behind still leases for lease_ttl from the
    database's now, and its extension and report are judged on that clock too."""
    me = BrokerSelf("clock-test", "0")
    async with open_postgres_store(pg_url, broker=me) as store:
        [res] = await store.submit([TaskSpec(type="t")], time.time())
        behind = time.time() - 3600
        [lease] = await store.claim("w", ["default"], None, 1, behind, 30.0)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT lease_expires_at - extract(epoch from now())::float8 FROM tasks"
            ).fetchone()
        assert row is not None and 20 < row[0] <= 30, row
        assert abs(lease.expires_at - time.time() - 30) < 10
        assert await store.extend_leases("w", [(res.id, lease.token)], behind, 30.0) == []
        ahead = time.time() + 3600  # a clock an hour ahead expires nothing either
        assert await store.release_expired(ahead) == []
        [done] = await store.complete([Outcome(res.id, lease.token, "ok")], ahead)
    assert done.accepted and done.state == "succeeded"


def kill_sessions(url: str) -> None:
    """Terminate every store session (as a server restart would), and wait until they
    are gone."""
    with psycopg.connect(url, autocommit=True) as admin:
        query = "SELECT pid FROM pg_stat_activity WHERE application_name = 'tq broker'"
        pids = [pid for (pid,) in admin.execute(query).fetchall()]
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS p(pid)", (pids,))
        for _ in range(500):
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchone()
            if left == (0,):
                return
            time.sleep(0.01)
    raise AssertionError("the server did not end the sessions")


def lock_holder(url: str) -> int | None:
    """The backend pid holding the leader's advisory lock, if any."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
            "objid = hashtext('tq leader ' || current_schema())::oid"
        ).fetchone()
    return None if row is None else int(row[0])


@pytest.mark.trio
async def test_leadership_and_wake_ups_come_back_after_the_sessions_are_cut(
    pg_url: str,
) -> None:
    async with (
        open_postgres_store(pg_url, broker=BrokerSelf("one", "0")) as one,
        open_postgres_store(pg_url, broker=BrokerSelf("two", "0")) as two,
    ):
        assert one.cluster is not None and two.cluster is not None
        assert (one.cluster.leader, two.cluster.leader) == (True, False)
        woken = trio.Event()
        two.cluster.on_work = woken.set
        await one.submit([TaskSpec(type="t")], time.time())
        with trio.fail_after(10):
            await woken.wait()
        woken = trio.Event()
        two.cluster.on_work = woken.set
        kill_sessions(pg_url)
        with trio.fail_after(10):  # the listener's reconnection wakes once (what it missed)
            await woken.wait()
        with trio.fail_after(10):  # a new session holds the lock, and its broker knows it
            while (holder := lock_holder(pg_url)) is None or [
                store.cluster._beat_conn.conn.info.backend_pid  # type: ignore[union-attr]
                for store in (one, two)
                if store.cluster.leader  # type: ignore[union-attr]
            ] != [holder]:
                await trio.sleep(0.05)
        woken = trio.Event()
        two.cluster.on_work = woken.set
        await one.submit([TaskSpec(type="t")], time.time())
        with trio.fail_after(10):
            await woken.wait()
        leaders = [r.id for r in await two.cluster.brokers() if r.leader and r.alive]
    assert len(leaders) == 1


@pytest.mark.trio
async def test_only_writes_that_make_work_wake_the_other_brokers(pg_url: str) -> None:
    """Claims, heartbeats and successes (the hot path) notify nobody; a submit and a
    released lease do. Notifications arrive in commit order, so once the last
    submit's has arrived, every earlier one has too."""
    async with (
        open_postgres_store(pg_url, broker=BrokerSelf("one", "0")) as one,
        open_postgres_store(pg_url, broker=BrokerSelf("two", "0")) as two,
    ):
        assert two.cluster is not None
        wakes = [0]
        arrived = trio.Event()

        def woken() -> None:
            wakes[0] += 1
            arrived.set()

        two.cluster.on_work = woken
        with trio.fail_after(10):  # two listens; its first wake (for what it missed) ran
            while not listening(pg_url):
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        baseline = wakes[0]
        arrived = trio.Event()
        now = time.time()
        await one.submit([TaskSpec(type="t"), TaskSpec(type="t")], now)
        with trio.fail_after(10):
            await arrived.wait()
        assert wakes[0] == baseline + 1
        a, b = await one.claim("w", ["default"], None, 2, now, 30.0)
        assert await one.extend_leases("w", [(a.id, a.token)], now, 30.0) == []
        [ok] = await one.complete([Outcome(a.id, a.token, "ok")], now)
        assert ok.state == "succeeded"
        arrived = trio.Event()
        await one.submit([TaskSpec(type="t")], now)
        with trio.fail_after(10):
            await arrived.wait()
        assert wakes[0] == baseline + 2
        arrived = trio.Event()
        [released] = await one.complete([Outcome(b.id, b.token, "release")], now)
        assert released.state == "pending"
        with trio.fail_after(10):
            await arrived.wait()
        assert wakes[0] == baseline + 3


def listening(url: str) -> bool:
    """Whether a broker's listener session has run its LISTEN."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tq broker' "
            "AND query LIKE 'LISTEN%%'"
        ).fetchone()
    return row is not None and row[0] > 0


@pytest.mark.trio
async def test_a_wait_on_one_broker_returns_when_another_broker_finishes_the_task(
    tmp_path: Path, pg_url: str
) -> None:
    """The waits are parked on broker B for up to 60 s; the task is reported (and
    the other one cancelled) through broker A: only A's finished-tasks notification
    can end them before their time."""
    with brokers(tmp_path, pg_url, "a", "b") as (a, b):
        key = key_of([a, b])
        answers: dict[str, Any] = {}
        async with (
            connect(a, key, "w") as worker,
            connect(a, key) as producer,
            connect(b, key) as waiter,
        ):
            done_id = await producer.submit("t", 1)
            cancelled_id = await producer.submit("t", 2)
            [lease] = await claim(worker)
            assert lease["id"] == done_id

            async def wait(task_id: str) -> None:
                started = trio.current_time()
                task = await waiter.wait(task_id, timeout=60)
                answers[task_id] = (task.state, trio.current_time() - started)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, done_id)
                nursery.start_soon(wait, cancelled_id)
                with trio.fail_after(10):  # B listens for finished tasks: it holds the lock
                    while waits_lock_holders(pg_url) == 0:
                        await trio.sleep(0.05)
                await trio.sleep(0.2)
                assert (await report(worker, lease, result="done"))["accepted"]
                await producer.cancel(cancelled_id)
        with trio.fail_after(10):  # no wait left: B gives the lock up at a beat
            while waits_lock_holders(pg_url):
                await trio.sleep(0.05)
    assert answers[done_id][0] == "succeeded" and answers[done_id][1] < 30
    assert answers[cancelled_id][0] == "cancelled" and answers[cancelled_id][1] < 30


def waits_lock_holders(url: str) -> int:
    """Sessions holding the finished-tasks lock of the URL's schema (shared)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
            "mode = 'ShareLock' AND objid = hashtext('tq waits ' || current_schema())::oid"
        ).fetchone()
    return 0 if row is None else int(row[0])


async def finished_notes(url: str, channel: str, act: Any) -> list[str]:
    """The finished-tasks notifications sent while ``act()`` runs: a marker sent after
    it arrives after every notification its commits sent (commit order)."""
    listener = await trio.to_thread.run_sync(lambda: psycopg.connect(url, autocommit=True))
    try:
        listener.execute(f'LISTEN "{channel}"')
        await act()
        listener.execute("SELECT pg_notify(%s, 'marker')", (channel,))

        def until_marker() -> list[str]:
            seen: list[str] = []
            for note in listener.notifies(timeout=10):
                if note.payload == "marker":
                    return seen
                seen.append(note.payload)
            raise AssertionError(f"the marker did not arrive; seen {seen}")

        return await trio.to_thread.run_sync(until_marker)
    finally:
        listener.close()


@pytest.mark.trio
async def test_finished_tasks_are_announced_only_while_a_broker_waits(pg_url: str) -> None:
    """Successes notify nobody while no broker waits (the hot path stays quiet); once
    a broker hears, they carry the finished ids, and a cancel (which may cascade to
    tasks it does not name) tells every waiter to read its task again."""
    from tq.store import pg_cluster

    async with (
        open_postgres_store(pg_url, broker=BrokerSelf("one", "0")) as one,
        open_postgres_store(pg_url, broker=BrokerSelf("two", "0")) as two,
    ):
        assert two.cluster is not None
        channel = two.cluster.done_channel  # type: ignore[attr-defined]
        now = time.time()
        res = await one.submit([TaskSpec(type="t") for _ in range(4)], now)
        leases = await one.claim("w", ["default"], None, 3, now, 30.0)

        async def succeed(lease: Any) -> None:
            [ok] = await one.complete([Outcome(lease.id, lease.token, "ok")], now)
            assert ok.state == "succeeded"

        assert await finished_notes(pg_url, channel, lambda: succeed(leases[0])) == []
        heard: list[list[str]] = []
        arrived = trio.Event()

        def on_done(ids: list[str]) -> None:
            heard.append(ids)
            arrived.set()

        two.cluster.on_done = on_done
        two.cluster.waited = {leases[1].id, res[3].id}
        await two.cluster.hear_finished()
        assert await finished_notes(pg_url, channel, lambda: succeed(leases[1])) == [
            f"one {leases[1].id}"
        ]
        with trio.fail_after(10):
            await arrived.wait()
        assert heard == [[leases[1].id]]
        arrived = trio.Event()

        async def cancel() -> None:
            await one.cancel(res[3].id, now)

        assert await finished_notes(pg_url, channel, cancel) == [f"one {pg_cluster.EVERY}"]
        with trio.fail_after(10):
            await arrived.wait()
        assert sorted(heard[1]) == sorted(two.cluster.waited)
        two.cluster.waited = ()
        with trio.fail_after(10):  # its next beat gives the lock up
            while waits_lock_holders(pg_url):
                await trio.sleep(0.05)
        assert await finished_notes(pg_url, channel, lambda: succeed(leases[2])) == []


@pytest.mark.trio
async def test_a_subscriber_on_one_broker_sees_the_changes_made_through_another(
    tmp_path: Path, pg_url: str
) -> None:
    """Task events on broker B for tasks submitted, claimed and reported through
    broker A: B's subscriber asks for them through the store, A forwards its events."""
    with brokers(tmp_path, pg_url, "a", "b") as (a, b):
        key = key_of([a, b])
        async with (
            connect(b, key) as watcher,
            connect(a, key) as producer,
            connect(a, key, "w") as worker,
            watcher.subscribe(["tasks"]) as events,
        ):
            with trio.fail_after(10):  # B says, through the store, that it wants changes
                while not events_lock_holders(pg_url):
                    await trio.sleep(0.05)
            seen = False
            with trio.fail_after(30):  # ... and A hears it at one of its next beats
                while not seen:
                    probe = await producer.submit("probe", 1, queue="probes")
                    with trio.move_on_after(1):
                        async for event in events:
                            changes = event.data.get("changes") or ()
                            if any(c["id"] == probe for c in changes):
                                seen = True
                                break
            task_id = await producer.submit("t", 1)
            [lease] = await claim(worker)
            assert (await report(worker, lease, result="seen"))["accepted"]
            moves: list[tuple[str | None, str | None]] = []
            with trio.fail_after(20):
                async for event in events:
                    if event.topic != "tasks":
                        continue
                    moves += [
                        (c["from"], c["to"]) for c in event.data["changes"] if c["id"] == task_id
                    ]
                    if (None, "pending") in moves and ("running", "succeeded") in moves:
                        break
    assert moves == [(None, "pending"), ("pending", "running"), ("running", "succeeded")]
    assert task_id == lease["id"]


def events_lock_holders(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
            "objid = hashtext('tq events ' || current_schema())::oid"
        ).fetchone()
    return 0 if row is None else int(row[0])


def test_a_large_event_still_fits_in_one_notification() -> None:
    from tq.store import pg_cluster

    change = {"id": "x" * 36, "type": "t" * 50, "queue": "q", "from": "pending", "to": "running"}
    event = {
        "topic": "tasks",
        "time": 1.0,
        "changes": [change] * 100,
        "more": 0,
        "totals": [{"queue": "q", "from": "pending", "to": "running", "n": 100}],
    }
    note = pg_cluster.event_note("b1", event)
    assert len(note.encode()) <= pg_cluster.NOTE_BYTES
    parsed = pg_cluster.parse_event(note, "b2")
    assert parsed is not None and parsed["changes"] == [] and parsed["more"] == 100
    assert parsed["totals"] == event["totals"]
    assert pg_cluster.parse_event(note, "b1") is None  # its own
    many = {**event, "totals": [{"queue": f"q{i}" * 20, "n": 1} for i in range(500)]}
    bare = pg_cluster.parse_event(pg_cluster.event_note("b1", many), "b2")
    assert bare is not None and bare["totals"] == [] and bare["more"] == 100


def test_finished_ids_fit_in_a_few_notifications() -> None:
    from tq.store import pg_cluster, pg_schema
    from tq.store.base import OutcomeResult
    from tq.store.sqlite import _Op

    def op(n: int) -> Any:
        done = _Op(pg_schema.complete, (), n)
        done.error = None
        done.result = [OutcomeResult(f"{i:036d}", True, "succeeded", "") for i in range(n)]
        return done

    notes = pg_cluster.done_notes("b1", [op(250)])
    assert len(notes) == 2 and all(len(note) <= pg_cluster.NOTE_BYTES for note in notes)
    assert [i for note in notes for i in note.split(" ")[1:]] == [f"{i:036d}" for i in range(250)]
    assert pg_cluster.done_notes("b1", [op(1000)]) == [f"b1 {pg_cluster.EVERY}"]
    claimed = _Op(pg_schema.claim, (), 1)
    claimed.error, claimed.result = None, []
    assert pg_cluster.done_notes("b1", [claimed]) == []


@pytest.mark.trio
async def test_heartbeats_keep_a_long_task_leased_with_a_short_lease(
    tmp_path: Path, pg_url: str
) -> None:
    """A lease of 0.5 s, shorter than a beat: the worker's row lags its heartbeats,
    and the leader must not call it lost for that."""
    async with running_broker(tmp_path, store=pg_url, lease_ttl=0.5) as broker:
        async with running_worker(broker), broker.client() as client:
            task = await client.wait(await client.submit("sleep", 3.0), timeout=30)
    assert task.state == "succeeded" and task.attempts == 1


@pytest.mark.trio
async def test_a_single_broker_is_its_own_leader(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        status = await client.cluster_status()
    assert status["role"] == "leader"
    [me] = status["brokers"]
    assert me["self"] and me["alive"] and me["role"] == "leader"
    assert me["address"] == status["listen"]["wire"]


@pytest.mark.trio
async def test_three_brokers_lose_one_to_kill_9_and_every_task_succeeds_once(
    tmp_path: Path, pg_url: str
) -> None:
    """Three brokers, two workers that each know every address, 1,000 tasks: the
    leader is killed with SIGKILL a third of the way through. A worker that loses
    its broker moves on to the next and reports what it holds there with its lease
    tokens; a lease whose claim answer was lost with the broker expires and is
    claimed again. Every task succeeds, and exactly one report per task is
    accepted (fencing), so no task ran on two leases at once to completion.

    A report sent just before the kill may have been committed with its answer
    lost: its outcome is unknown to the worker, and the same report sent again to
    another broker is refused (the task is no longer leased). The result names
    the worker and the lease token, so the task itself says whose report won."""
    from tq.core.errors import ConnectionFailed

    total = 1000
    with brokers(tmp_path, pg_url, "a", "b", "c") as procs:
        key = key_of(procs)
        async with connect(procs[2], key) as producer:
            specs = [{"type": "t", "payload": i, "idempotency_key": f"k{i}"} for i in range(total)]
            ids = []
            for start in range(0, total, 250):
                ids += await producer.submit_many(specs[start : start + 250])
        accepted: dict[str, int] = {}
        unknown: list[str] = []  # reports whose answer was lost with the broker, later found
        done = trio.Event()
        killed = trio.Event()

        async def settled(client: Client, lease: dict[str, Any], mine: list[Any]) -> bool:
            """Whether a report whose outcome was unknown went through after all."""
            task = await client.get(lease["id"])
            return task.state == "succeeded" and task.result == mine

        async def worker(name: str, order: list[BrokerProcess]) -> None:
            held: list[dict[str, Any]] = []  # leases claimed, not yet reported
            in_doubt = False  # the report of held[0] was sent and its answer lost
            turn = 0
            while not done.is_set():
                broker = order[turn % len(order)]
                turn += 1
                if broker.proc is not None and broker.proc.poll() is not None:
                    continue  # the dead one
                try:
                    async with connect(broker, key, name) as client:
                        while not done.is_set():
                            if not held:
                                held = await claim(client, n=10, wait=0.5)
                            while held:
                                lease = held[0]
                                mine = [name, lease["token"]]
                                resent, in_doubt = in_doubt, True
                                reply = await report(client, lease, result=mine)
                                ok = bool(reply["accepted"])
                                if not ok and resent and await settled(client, lease, mine):
                                    ok = True  # the first report went through
                                    unknown.append(lease["id"])
                                if ok:
                                    accepted[lease["id"]] = accepted.get(lease["id"], 0) + 1
                                in_doubt = False
                                held.pop(0)
                            if len(accepted) >= total // 3 and not killed.is_set():
                                killed.set()
                                procs[0].kill()
                            if sum(accepted.values()) >= total:
                                done.set()
                except ConnectionFailed:
                    continue

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker, "w1", [procs[0], procs[1], procs[2]])
                nursery.start_soon(worker, "w2", [procs[0], procs[2], procs[1]])
        async with connect(procs[1], key) as client:
            stats = await client.stats()
            results = {task_id: (await client.get(task_id)).result for task_id in ids[::7]}
            with trio.fail_after(20):  # one of the survivors leads
                while True:
                    listed = (await health(client))["brokers"]
                    leaders = [e["address"] for e in listed if e["role"] == "leader"]
                    if leaders and leaders[0] != procs[0].address:
                        break
                    await trio.sleep(0.1)
    assert killed.is_set()
    assert sorted(accepted) == sorted(ids) and set(accepted.values()) == {1}
    assert stats["queues"]["default"] == {"succeeded": total}
    assert all(result[0] in ("w1", "w2") for result in results.values()), results
    assert leaders in ([procs[1].address], [procs[2].address])
    print(f"reports whose answer died with the broker, found applied: {unknown}")
