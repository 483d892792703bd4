"""Several brokers on one PostgreSQL database: the state they share besides the tasks.

    async with open_postgres_store(url, broker=BrokerSelf("b1", "1.0")) as store:
        store.cluster.leader          # does this broker run the cluster's upkeep now?

Contract: implements ``tq.store.base.ClusterState`` for the PostgreSQL store,
which starts it when a broker opens the store (``open_postgres_store(...,
broker=...)``); a store opened without a broker (tests, ``tq migrate``) has
none. The SQL of the workers and brokers tables (migration 2 of
``tq.store.pg_schema``) lives here.

Two connections of its own per broker, each used from one thread at a time:

    beat      every BEAT_INTERVAL seconds: try to take the leadership if this
              broker does not hold it (``pg_try_advisory_lock``, a session lock
              keyed by the schema), write this broker's row (its last sign of
              life, on the database's clock) and the workers it heard from
              since the last beat. The lock lives as long as this session: a
              broker that dies (kill -9, a crash, a network cut the server
              notices) loses it with its session, and another broker's next
              beat takes it, within about BEAT_INTERVAL of the server noticing.
    listener  ``LISTEN`` on the schema's channel: another broker's transaction
              that made tasks pending ends with ``pg_notify`` (see
              ``tq.store.postgres``); the notification arrives once that
              transaction committed, and the listener thread calls ``on_work``
              in trio (``trio.from_thread``), which wakes the broker's idle
              claims. Its own notifications (payload: its id) are skipped: it
              woke its claims itself.
              The same connection listens on the schema's second channel for
              finished tasks (below).

Finished tasks (a ``wait`` on one broker for a task another broker finishes):
a broker with waits in progress holds a shared advisory lock (keyed by the
schema) on its beat session, taken before a wait first reads its task
(``hear_finished``) and given up at a beat that finds no wait left. A write
batch that finished tasks (successes, deaths, cancels, released leases) ends,
in its transaction, with one statement that tries the same lock exclusively
for the transaction: taken, nobody waits anywhere and nothing is sent (the hot
path stays quiet); refused, it sends the finished ids with ``pg_notify`` on the
finished channel (at most MAX_DONE_NOTES notifications of NOTE_BYTES each; more
ids than fit, or a change whose ids are not known here, send EVERY: each
waiter reads its task again). No wake-up is lost: either the waiting broker
held its lock first (the writer notifies), or the writer held the exclusive
lock first, and the waiter's lock waits for that commit, after which its read
sees the task finished. The listener passes the ids this broker waits for (all
notifications that arrived together, at once) to ``on_done`` in trio.

Task events (``subscribe``): a broker whose subscribers want task changes or
counts (``events_wanted``) holds a second shared advisory lock on its beat
session; each beat also reads whether another session holds it and tells the
broker (``on_events_wanted``). While one does, the broker hands every tasks
event it flushes to ``forward_event``: sent from the beat connection with
``pg_notify`` on the events channel (JSON; past NOTE_BYTES without the
listed changes, then with nothing but their number), at most EVENTS_QUEUED
waiting (older ones are dropped: the subscribers' counts are read again
anyway). The listener hands other brokers' events to ``on_events``.

Leadership is an optimisation, never a condition of correctness: every upkeep
statement locks the rows it changes (``FOR UPDATE SKIP LOCKED``), so two
brokers that both believe they lead for a moment (a session the server has
not yet found dead) release and promote each task once.

Workers: a broker's beat upserts the rows of the workers that said something
to it (hello, heartbeat, claim, report) since its previous beat, stamped with
the database's clock. The leader releases the leases of workers no broker
heard from for the worker timeout plus LOST_MARGIN (a row lags the worker's
last word by up to one beat) (``release_lost_workers``): a worker that moved
to another broker keeps its leases as long as it heartbeats anywhere.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import psycopg
import trio
from psycopg import sql

from tq.core.errors import TQError
from tq.core.states import TERMINAL, Event
from tq.store import pg_caps, pg_ops, pg_schema, retention_sql
from tq.store.base import BrokerRecord, BrokerSelf, ClusterState, WorkerBeat

if TYPE_CHECKING:
    from tq.store.postgres import PostgresStore

log = logging.getLogger("tq.store.cluster")

BEAT_INTERVAL = 1.0  # seconds between a broker's beats (and leadership attempts)
LISTEN_POLL = 0.5  # seconds the listener waits for a notification before checking for a stop
RECONNECT_DELAY = 1.0  # seconds between attempts to reconnect a lost listener
FORGET_BROKERS = 3600.0  # a broker silent this long is dropped from the brokers table
LOST_MARGIN = 2 * BEAT_INTERVAL  # added to the worker timeout (release_lost_workers)
LOG_EVERY = 60.0  # seconds between log lines of a beat that keeps failing the same way

DB_EPOCH = "extract(epoch from now())::float8"  # the database's clock, seconds since the epoch
LEADER_LOCK = "SELECT pg_try_advisory_lock(hashtext('tq leader ' || current_schema()))"
CURRENT_SCHEMA = "SELECT current_schema()"
UPSERT_BROKER = (
    "INSERT INTO brokers (id, address, http, version, started_at, last_seen, leader) "
    f"VALUES (%s, %s, %s, %s, {DB_EPOCH}, {DB_EPOCH}, %s) ON CONFLICT (id) DO UPDATE SET "
    "address = EXCLUDED.address, http = EXCLUDED.http, version = EXCLUDED.version, "
    "last_seen = EXCLUDED.last_seen, leader = EXCLUDED.leader"
)
DEPOSE_OTHERS = "UPDATE brokers SET leader = false WHERE leader AND id <> %s"
FORGET_SILENT_BROKERS = f"DELETE FROM brokers WHERE last_seen < {DB_EPOCH} - %s"
LEAVE = "DELETE FROM brokers WHERE id = %s"
LIST_BROKERS = (
    f"SELECT id, address, http, version, started_at, last_seen, leader, {DB_EPOCH} "
    "FROM brokers ORDER BY started_at, id"
)
UPSERT_WORKERS = (  # sorted by id: two brokers upserting one worker never deadlock
    "INSERT INTO workers (id, broker, key_id, info, joined_at, last_seen) "
    f"SELECT w.id, %s, w.key_id, w.info, {DB_EPOCH}, {DB_EPOCH} "
    "FROM unnest(%s::text[], %s::text[], %s::text[]) AS w(id, key_id, info) ORDER BY w.id "
    "ON CONFLICT (id) DO UPDATE SET broker = EXCLUDED.broker, key_id = EXCLUDED.key_id, "
    "info = EXCLUDED.info, last_seen = EXCLUDED.last_seen"
)
LOST_WORKERS = "DELETE FROM workers WHERE last_seen < %s RETURNING id"
NOTIFY = "SELECT pg_notify(%s, %s)"
WAITS_KEY = "hashtext('tq waits ' || current_schema())"
HEAR_FINISHED = f"SELECT pg_advisory_lock_shared({WAITS_KEY})"
STOP_HEARING = f"SELECT pg_advisory_unlock_shared({WAITS_KEY})"
NOTIFY_DONE = (  # sent only while some broker holds the waits lock (see the module doc)
    f"WITH lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock({WAITS_KEY}) AS free) "
    "SELECT pg_notify(%s, note) FROM lock, unnest(%s::text[]) AS note WHERE NOT lock.free"
)
EVERY = "*"  # a finished-tasks notification that names no ids: every waiter reads again
EVENTS_KEY = "hashtext('tq events ' || current_schema())"
WANT_EVENTS = f"SELECT pg_try_advisory_lock_shared({EVENTS_KEY})"
STOP_EVENTS = f"SELECT pg_advisory_unlock_shared({EVENTS_KEY})"
OTHERS_WANT_EVENTS = (  # the lock's holders but this session (advisory keys: classid/objid)
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
    f"objid = ({EVENTS_KEY})::oid AND objsubid = 1 AND pid <> pg_backend_pid())"
)
EVENTS_QUEUED = 20  # tasks events waiting to be sent to the other brokers, at most
NOTE_BYTES = 7900  # a notification's payload must stay under 8000 bytes
MAX_DONE_NOTES = 4  # finished-tasks notifications per write batch; more ids send EVERY
WORKER_TYPES = "SELECT DISTINCT (info::json -> 'types')::text FROM workers"


DB_CLOCK = f"SELECT {DB_EPOCH}"


class _DbNow:
    """Stands for ``now`` in a write's arguments: the transaction's database clock."""

    def __repr__(self) -> str:
        return "DB_NOW"


DB_NOW: Any = _DbNow()


def resolve(conn: psycopg.Connection[Any], args: tuple[Any, ...], clock: list[float]) -> Any:
    """``args`` with DB_NOW replaced by the transaction's database clock (read into
    ``clock`` by the first write of the transaction that needs it)."""
    if not any(arg is DB_NOW for arg in args):
        return args
    if not clock:
        clock.append(float(pg_schema._one(conn, DB_CLOCK)))
    return tuple(clock[0] if arg is DB_NOW else arg for arg in args)


_WAKES = ("pending", "failed")


def made_work(op: Any) -> bool:
    """Whether a write (a ``_Op`` of the writer's batch) that succeeded may have left
    tasks claimable: the batch then notifies the other brokers. A write this module
    does not list is taken to have (a spurious wake-up costs a claim query; a
    missed one leaves a claim parked until its wait ends)."""
    if op.error is not None:
        return False
    fn, result = op.fn, op.result
    fn = SAME_AS.get(fn, fn)
    if fn in _NO_WORK:
        return False
    if fn is pg_schema.insert_rows or fn is pg_schema.insert_unkeyed:
        return any(r.created for r in result)
    if fn is pg_schema.complete:  # a release, a retry due later (the leader's promoter
        # sleeps until the earliest due time), a success that released dependents, or
        # (with caps in force) any finished task: a capped claim may take its place
        return any(
            r.accepted and (r.state in _WAKES or r.dependents or caps_in_force()) for r in result
        )
    if fn is pg_schema.change_one:
        return bool(op.args[1] is Event.RETRY)
    if fn in _WORK_IF_ANY:
        return bool(result)
    return True


def caps_in_force() -> bool:
    """Whether the last claim of this process saw a cap (then every finished task
    notifies the other brokers, whose claims may wait on that cap)."""
    return pg_caps.CAPS_SEEN[0]


_ENDED = frozenset(state.value for state in TERMINAL)


def finished_ids(op: Any) -> builtins.list[str] | None:
    """The tasks a write (a ``_Op`` that succeeded or failed) finished, for waits on
    other brokers; None when it may have finished tasks it does not name (a cancel
    cascading to dependents, a released lease that left a task dead)."""
    if op.error is not None or op.result is None:
        return []
    fn = SAME_AS.get(op.fn, op.fn)
    if fn is pg_schema.complete:
        ids: builtins.list[str] = []
        for r in op.result:
            if r.accepted and r.state in _ENDED:
                ids.append(r.id)
            ids += r.dependents
        return ids
    if fn in _RELEASES:
        return None if op.result else []
    if fn in FINISHES_SOME:
        return None
    return []


def done_notes(broker: str, batch: builtins.list[Any]) -> builtins.list[str]:
    """The finished-tasks notifications' payloads for a write batch (none if it
    finished nothing): the broker's id, then task ids, each under NOTE_BYTES."""
    ids: builtins.list[str] = []
    for op in batch:
        found = finished_ids(op)
        if found is None:
            return [f"{broker} {EVERY}"]
        ids += found
    notes: builtins.list[str] = []
    note = broker
    for task_id in dict.fromkeys(ids):
        if len(note) + 1 + len(task_id) > NOTE_BYTES:
            notes.append(note)
            note = broker
        note += " " + task_id
    if note != broker:
        notes.append(note)
    if len(notes) > MAX_DONE_NOTES:
        return [f"{broker} {EVERY}"]
    return notes


def channel_of(schema: str) -> str:
    """The notification channel of one schema (channels are database-wide)."""
    return "tq_work_" + hashlib.sha1(schema.encode()).hexdigest()[:16]


def done_channel_of(schema: str) -> str:
    """The channel of one schema's finished-tasks notifications."""
    return "tq_done_" + hashlib.sha1(schema.encode()).hexdigest()[:16]


def events_channel_of(schema: str) -> str:
    """The channel of one schema's task events (brokers forwarding to each other)."""
    return "tq_events_" + hashlib.sha1(schema.encode()).hexdigest()[:16]


def event_note(broker: str, event: dict[str, Any]) -> str:
    """A tasks event as a notification payload under NOTE_BYTES: the broker's id, then
    the event as JSON; a large one without its listed changes, then without totals."""
    note = f"{broker} {json.dumps(event, separators=(',', ':'), default=str)}"
    if len(note.encode()) <= NOTE_BYTES:
        return note
    listed = len(event.get("changes") or ())
    brief = {**event, "changes": [], "more": int(event.get("more") or 0) or listed}
    note = f"{broker} {json.dumps(brief, separators=(',', ':'), default=str)}"
    if len(note.encode()) <= NOTE_BYTES:
        return note
    total = sum(int(row.get("n", 0)) for row in event.get("totals") or ())
    bare = {**brief, "more": brief["more"] or total, "totals": []}
    return f"{broker} {json.dumps(bare, separators=(',', ':'), default=str)}"


def parse_event(payload: str, me: str) -> dict[str, Any] | None:
    """Another broker's tasks event from a notification (None: this broker's own, or
    not a tasks event)."""
    sender, _, text = payload.partition(" ")
    if sender == me:
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("topic") != "tasks":
        return None
    return event


def release_lost(conn: psycopg.Connection[Any], timeout: float, now: float) -> list[str]:
    """In the writer's transaction: forget workers silent since ``now - timeout`` and
    release their leases (as ``release_worker``); the released task ids."""
    released: list[str] = []
    for (worker_id,) in pg_schema.rows(conn, LOST_WORKERS, (now - timeout,)):
        released += pg_schema.release_worker(conn, worker_id, now)
    return released


class PgClusterState:
    """This broker's part of the cluster (see the module docstring)."""

    def __init__(self, store: PostgresStore, broker: BrokerSelf) -> None:
        from tq.store.postgres import _Connection

        self.broker = broker
        self.on_work: Callable[[], None] | None = None
        self.beats: Callable[[], builtins.list[WorkerBeat]] | None = None
        # finished tasks this broker waits for: ``waited`` holds their ids (read from
        # the listener's thread), ``on_done`` is called in trio with those finished
        self.on_done: Callable[[builtins.list[str]], None] | None = None
        self.waited: Collection[str] = ()
        # task events (see the module docstring)
        self.events_wanted: Callable[[], bool] | None = None
        self.on_events_wanted: Callable[[bool], None] | None = None
        self.on_events: Callable[[builtins.list[dict[str, Any]]], None] | None = None
        self.channel = ""  # learnt from the database (the schema's channel)
        self.done_channel = ""
        self.events_channel = ""
        self._events_held = False  # this broker's beat session holds the events lock
        self._others_want = False
        self._outgoing: deque[dict[str, Any]] = deque(maxlen=EVENTS_QUEUED)
        self._send_wake = trio.Event()
        self._store = store
        self._leader = False
        self._address: str | None = None
        self._http: str | None = None
        self._beat_conn = _Connection(store.url, store.location, autocommit=True)
        self._listen_conn = _Connection(store.url, store.location, autocommit=True)
        self._beat_limiter = trio.CapacityLimiter(1)
        self._listen_limiter = trio.CapacityLimiter(1)
        self._stopping = False
        self._soon = trio.Event()  # beat now (an announcement, or a stop)
        self._done = trio.Event()
        self._types: tuple[float, set[str] | None] = (-BEAT_INTERVAL, set())
        self._hearing = False  # this broker's beat session holds the waits lock
        self._hear_lock = trio.Lock()
        self._failed = ("", 0.0)  # the last beat failure logged, and when

    @property
    def leader(self) -> bool:
        return self._leader

    def announce(self, address: str | None, http: str | None) -> None:
        self._address, self._http = address, http
        self._soon.set()  # written at once, not at the next tick

    def notes(self, batch: builtins.list[Any]) -> builtins.list[tuple[str, tuple[Any, ...]]]:
        """The statements that end a write batch's transaction before COMMIT: the wake-up
        for other brokers' claims if it made work, the finished tasks for their waits."""
        if not self.channel:
            return []
        out: builtins.list[tuple[str, tuple[Any, ...]]] = []
        if any(map(made_work, batch)):
            out.append((NOTIFY, (self.channel, self.broker.id)))
        notes = done_notes(self.broker.id, batch)
        if notes:
            out.append((NOTIFY_DONE, (self.done_channel, notes)))
        return out

    def forward_event(self, event: dict[str, Any]) -> None:
        """Send a tasks event to the other brokers (soon, from the beat connection)."""
        self._outgoing.append(event)
        self._send_wake.set()

    async def _send_loop(self) -> None:
        while not self._stopping:
            await self._send_wake.wait()
            self._send_wake = trio.Event()
            notes = [event_note(self.broker.id, event) for event in self._outgoing]
            self._outgoing.clear()
            if notes and self.events_channel:
                try:
                    await trio.to_thread.run_sync(self._send, notes, limiter=self._beat_limiter)
                except TQError as exc:
                    log.debug("cluster events: not sent: %s", exc)

    def _send(self, notes: builtins.list[str]) -> None:
        from tq.store.postgres import store_error

        try:
            conn = self._beat_conn.get()
            for note in notes:
                conn.execute(NOTIFY, (self.events_channel, note))
        except psycopg.Error as exc:
            raise store_error(exc, "notify through", self._store.location) from exc

    async def hear_finished(self) -> None:
        """Make sure that tasks other brokers finish from now on are announced to this
        one (``on_done``): called before a wait first reads its task. A failure is
        logged; the wait then learns of the task at its next read."""
        if self._hearing:
            return
        async with self._hear_lock:
            if self._hearing:
                return
            try:
                await trio.to_thread.run_sync(self._hear, limiter=self._beat_limiter)
            except TQError as exc:
                log.warning("cluster waits: cannot listen for finished tasks: %s", exc)

    def _hear(self) -> None:
        """In a thread, on the beat connection: take the waits lock (shared)."""
        from tq.store.postgres import store_error

        if self._hearing:  # the beat took it again meanwhile (session locks stack up)
            return
        conn_now = self._beat_conn.conn
        if conn_now is not None and (conn_now.broken or conn_now.closed):
            self._lost_session()  # a new session holds neither lock
        try:
            self._beat_conn.get().execute(HEAR_FINISHED)
        except psycopg.Error as exc:
            raise store_error(exc, "lock in", self._store.location) from exc
        self._hearing = True

    async def release_lost_workers(self, timeout: float) -> builtins.list[str]:
        # a worker's row lags its last word to a broker by up to one beat (and the
        # beat's own time): without the margin a short timeout would lose live workers
        return await self._store.release_lost_workers(timeout + LOST_MARGIN)

    async def brokers(self) -> builtins.list[BrokerRecord]:
        found = await self._store._read(pg_schema.rows, LIST_BROKERS)
        return [BrokerRecord(*row) for row in found]

    async def worker_types(self) -> set[str] | None:
        read_at, types = self._types
        if trio.current_time() - read_at < BEAT_INTERVAL:
            return types
        found = await self._store._read(pg_schema.rows, WORKER_TYPES)
        lists: list[Any] = [None if text is None else json.loads(text) for (text,) in found]
        handled: set[str] | None = None  # a worker with no type list takes any type
        if all(isinstance(listed, list) for listed in lists):
            handled = {str(t) for listed in lists for t in listed}
        self._types = (trio.current_time(), handled)
        return handled

    # -- running ----------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat (the first beat before ``started``) and listen until ``aclose``."""
        try:
            schema = await self._store._read(pg_schema._one, CURRENT_SCHEMA)
            self.channel = channel_of(str(schema))
            self.done_channel = done_channel_of(str(schema))
            self.events_channel = events_channel_of(str(schema))
            await self._beat_once()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen_loop)
                nursery.start_soon(self._send_loop)
                task_status.started()
                while not self._stopping:
                    with trio.move_on_after(BEAT_INTERVAL):
                        await self._soon.wait()
                    self._soon = trio.Event()
                    if not self._stopping:
                        await self._beat_once()
        finally:
            self._done.set()

    async def aclose(self) -> None:
        """Stop beating and listening; leave the brokers table; close the connections
        (which gives the leadership up at once)."""
        self._stopping = True
        self._soon.set()
        self._send_wake.set()
        with trio.CancelScope(shield=True):
            await self._done.wait()
            await trio.to_thread.run_sync(self._leave, limiter=self._beat_limiter)
            await trio.to_thread.run_sync(self._listen_conn.close, limiter=self._listen_limiter)

    async def _beat_once(self) -> None:
        beats = self.beats() if self.beats is not None else []
        # decided here, in trio: a wait that starts meanwhile takes the lock again
        # (queued behind this beat on the same limiter)
        stop_hearing = self._hearing and not self.waited
        if stop_hearing:
            self._hearing = False
        want_events = self.events_wanted is not None and self.events_wanted()
        others = self._others_want
        try:
            await trio.to_thread.run_sync(
                self._beat, beats, stop_hearing, want_events, limiter=self._beat_limiter
            )
            if self._others_want != others and self.on_events_wanted is not None:
                self.on_events_wanted(self._others_want)
        except TQError as exc:
            text, now = str(exc), trio.current_time()
            if text != self._failed[0] or now - self._failed[1] >= LOG_EVERY:
                log.warning("cluster beat: %s", text)
                self._failed = (text, now)
        else:
            if self._failed[0]:
                log.info("cluster beat: the database answers again")
            self._failed = ("", 0.0)

    def _beat(
        self, beats: builtins.list[WorkerBeat], stop_hearing: bool = False, events: bool = False
    ) -> None:
        """In a thread, on the beat connection (see the module docstring)."""
        from tq.store.postgres import store_error

        me = self.broker
        try:
            conn = self._beat_conn.get()
            if stop_hearing:
                conn.execute(STOP_HEARING)
            elif self.waited and not self._hearing:  # its session was lost meanwhile
                conn.execute(HEAR_FINISHED)
                self._hearing = True
            if events and not self._events_held:
                self._events_held = bool(pg_schema._one(conn, WANT_EVENTS))
            elif not events and self._events_held:
                conn.execute(STOP_EVENTS)
                self._events_held = False
            self._others_want = bool(pg_schema._one(conn, OTHERS_WANT_EVENTS))
            if not self._leader and pg_schema._one(conn, LEADER_LOCK):
                self._leader = True
                conn.execute(DEPOSE_OTHERS, (me.id,))
                log.info("this broker (%s) now runs the cluster's upkeep", me.id)
            params = (me.id, self._address, self._http, me.version, self._leader)
            conn.execute(UPSERT_BROKER, params)
            if beats:
                beats = sorted(beats, key=lambda beat: beat.id)
                ids = [beat.id for beat in beats]
                keys = [beat.key_id for beat in beats]
                infos = [json.dumps(beat.info, default=str) for beat in beats]
                conn.execute(UPSERT_WORKERS, (me.id, ids, keys, infos))
            if self._leader:
                conn.execute(FORGET_SILENT_BROKERS, (FORGET_BROKERS,))
        except psycopg.Error as exc:
            conn_now = self._beat_conn.conn
            if conn_now is None or conn_now.broken or conn_now.closed:
                self._lost_session()
            raise store_error(exc, "beat to", self._store.location) from exc
        except TQError:
            self._lost_session()
            raise

    def _lost_session(self) -> None:
        self._beat_conn.drop()
        self._hearing = False
        self._events_held = False
        if self._leader:
            log.warning("this broker lost the cluster's leadership (its session ended)")
        self._leader = False

    def _leave(self) -> None:
        """Delete this broker's row on the beat connection, if it still has one (a
        broker stopping while the database is away does not wait to reconnect)."""
        try:
            conn = self._beat_conn.conn
            if conn is not None and not (conn.broken or conn.closed):
                conn.execute(LEAVE, (self.broker.id,))
        except (psycopg.Error, TQError) as exc:
            log.warning("could not remove this broker from the brokers table: %s", exc)
        finally:
            self._leader = False
            self._beat_conn.close()

    async def _listen_loop(self) -> None:
        await trio.to_thread.run_sync(self._listen, limiter=self._listen_limiter)

    def _listen(self) -> None:
        """In a thread: wait for notifications until ``aclose``; reconnect when lost."""
        listening = False
        while not self._stopping:
            try:
                conn = self._listen_conn.get()
                if not listening:
                    for channel in (self.channel, self.done_channel, self.events_channel):
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    listening = True
                    trio.from_thread.run_sync(self._woken)  # what was missed meanwhile
                    trio.from_thread.run_sync(self._finished, None)
                notes = list(conn.notifies(timeout=LISTEN_POLL, stop_after=1))
                if notes:  # what arrived meanwhile was committed too: one wake covers all
                    notes += conn.notifies(timeout=0)
                work = [note for note in notes if note.channel == self.channel]
                if any(note.payload != self.broker.id for note in work):
                    trio.from_thread.run_sync(self._woken)
                done = self._waited_for(
                    [n.payload for n in notes if n.channel == self.done_channel]
                )
                if done is None or done:
                    trio.from_thread.run_sync(self._finished, done)
                events = [
                    event
                    for n in notes
                    if n.channel == self.events_channel
                    and (event := parse_event(n.payload, self.broker.id)) is not None
                ]
                if events and self.on_events is not None:
                    trio.from_thread.run_sync(self.on_events, events)
            except (psycopg.Error, TQError) as exc:
                if self._stopping:
                    return
                log.warning("cluster wake-ups: lost the listening connection: %s", exc)
                listening = False
                self._listen_conn.drop()
                for _ in range(int(RECONNECT_DELAY / 0.1)):
                    if self._stopping:
                        return
                    time.sleep(0.1)

    def _woken(self) -> None:
        if self.on_work is not None:
            self.on_work()

    def _waited_for(self, payloads: builtins.list[str]) -> builtins.list[str] | None:
        """In the listener's thread: of the finished ids in ``payloads`` (other brokers'
        notifications), those this broker waits for; None: every one (EVERY)."""
        waited = self.waited
        found: builtins.list[str] = []
        if not waited:
            return found
        for payload in payloads:
            sender, _, ids = payload.partition(" ")
            if sender == self.broker.id:
                continue  # this broker's own: its waits were woken when it finished them
            if ids == EVERY:
                return None
            found += [task_id for task_id in ids.split(" ") if task_id in waited]
        return found

    def _finished(self, ids: builtins.list[str] | None) -> None:
        if self.on_done is not None:
            self.on_done(list(self.waited) if ids is None else ids)


if TYPE_CHECKING:  # mypy proves here that PgClusterState implements ClusterState

    def _implements_cluster(state: PgClusterState) -> ClusterState:
        return state


# the store's wrappers of a statement (dependencies settled in the same transaction)
# -> the statement whose rule above they follow; filled in by tq.store.postgres
SAME_AS: dict[Any, Any] = {}
# writes that may finish tasks they do not name (a cancel cascading to dependents);
# filled in by tq.store.postgres
FINISHES_SOME: set[Any] = set()
_RELEASES = (pg_schema.release_expired, pg_schema.release_worker, release_lost)
_WORK_IF_ANY = (  # a non-empty result (ids, a count) is work made
    pg_schema.promote_due,
    pg_schema.release_expired,
    pg_schema.release_worker,
    pg_ops.retry_many,
    release_lost,
)
_NO_WORK = (  # writes that never make a task claimable
    pg_schema.claim,
    pg_caps.claim,
    pg_caps.remove_cap,
    pg_schema.extend_leases,
    pg_schema.set_priority,
    pg_ops.purge,
    retention_sql.expire,
    pg_ops.create_key,
    pg_ops.revoke_key,
    pg_ops.rehash_key,
    pg_ops.record_audit,
)
