"""Every JSON example of docs/PROTOCOL.md, sent to a live broker: its answer has the shape shown.

The examples of section 5 are replayed in page order over TLS. Each request
is sent as written, with the examples' task id and token replaced by a real
task's (one in the state the example needs: ``PREPARE``) and the key by the
broker's admin key; the answer (and the events shown after a ``subscribe``)
must have the documented keys, types and states (``protodoc.like``). The
Task example of section 6 must have exactly the keys of a live Task map, and
each table of sections 6, 7 and 12 must match the code's own table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from protodoc import Raw, connect, like, load_doc, loose_json, session, ticked

from tq.broker.events import TOPICS
from tq.core.states import TERMINAL, TRANSITIONS, State
from tq.core.task import Lease, Task
from tq.protocol import REQUEST_TYPES
from tq.security.roles import ALLOWED, allowed
from tq.testing import RunningBroker, running_broker

DOC = load_doc()
EXAMPLE_TASK = "01a21f99-619b-728d-903a-a9848a5fb4eb"
EXAMPLE_TOKEN = 1099524508033828244


def examples() -> list[tuple[dict[str, Any], list[Any]]]:
    """(request, [documented answer and events]) for every example request of section 5."""
    out: list[tuple[dict[str, Any], list[Any]]] = []
    for section in DOC.messages():
        for lang, block in section.blocks:
            if lang != "json":
                continue
            for line in block:
                data = loose_json(line)
                if data.get("t") in REQUEST_TYPES:
                    out.append((data, []))
                elif out and section.names[0] in (out[-1][0]["t"], "event"):
                    out[-1][1].append(data)
    return out


EXAMPLES = examples()


class Scene:
    """The sessions and tasks the examples act on."""

    def __init__(self, broker: RunningBroker) -> None:
        self.broker = broker
        self.client: Raw
        self.worker: Raw
        self.lease: dict[str, Any] = {}
        self.done = ""  # a succeeded task
        self._id = 1000
        self.opened: list[Raw] = []

    async def session(self, **hello: Any) -> Raw:
        raw = await session(self.broker, **hello)
        self.opened.append(raw)
        return raw

    def rid(self) -> int:
        self._id += 1
        return self._id

    async def fresh(self) -> str:
        """A new pending task."""
        answer = await self.client.ask(
            {"t": "submit", "id": self.rid(), "tasks": [{"type": "email"}]}
        )
        assert answer is not None and answer["t"] == "ack", answer
        return str(answer["tasks"][0]["id"])

    async def leased(self) -> dict[str, Any]:
        await self.fresh()
        claim = {"t": "claim", "id": self.rid(), "n": 1, "queues": ["default"], "wait": 5}
        answer = await self.worker.ask(claim)
        assert answer is not None and len(answer["tasks"]) == 1, answer
        return dict(answer["tasks"][0])


def _replace(value: Any, task: str, token: int | None) -> Any:
    if value == EXAMPLE_TASK:
        return task
    if value == EXAMPLE_TOKEN and token is not None:
        return token
    if isinstance(value, dict):
        return {k: _replace(v, task, token) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, task, token) for v in value]
    return value


Prepare = Callable[[Scene, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _as_is(scene: Scene, msg: dict[str, Any]) -> dict[str, Any]:
    return msg


async def _on_fresh(scene: Scene, msg: dict[str, Any]) -> dict[str, Any]:
    return _replace(msg, await scene.fresh(), None)  # type: ignore[no-any-return]


async def _on_lease(scene: Scene, msg: dict[str, Any]) -> dict[str, Any]:
    scene.lease = await scene.leased()
    scene.done = scene.lease["id"]
    return _replace(msg, scene.lease["id"], scene.lease["token"])  # type: ignore[no-any-return]


async def _on_done(scene: Scene, msg: dict[str, Any]) -> dict[str, Any]:
    return _replace(msg, scene.done, None)  # type: ignore[no-any-return]


async def _on_live_lease(scene: Scene, msg: dict[str, Any]) -> dict[str, Any]:
    lease = await scene.leased()
    return _replace(msg, lease["id"], lease["token"])  # type: ignore[no-any-return]


PREPARE: dict[str, Prepare] = {
    "submit": _as_is,
    "claim": _as_is,  # leases the task the submit example made
    "result": _on_lease,  # the example reports "ok": the task is then done
    "heartbeat": _on_live_lease,
    "query": _as_is,
    "cancel": _on_fresh,
    "wait": _on_done,
    "purge": _as_is,
    "retry_many": _as_is,
    "keys": _as_is,
    "audit": _as_is,
    "set_priority": _on_fresh,
    "queue": _as_is,
    "schedule": _as_is,
    "cap": _as_is,
    "subscribe": _as_is,
}
WORKER_REQUESTS = {"claim", "result", "heartbeat"}


@pytest.mark.trio
async def test_examples_live(tmp_path: Path) -> None:
    failures: list[str] = []
    async with running_broker(tmp_path) as broker:
        scene = Scene(broker)
        try:
            failures += await _replay(scene)
        finally:
            for raw in scene.opened:
                await raw.aclose()
    assert not failures, "\n".join(failures)


async def _replay(scene: Scene) -> list[str]:
    failures: list[str] = []
    broker = scene.broker
    hello, answers = EXAMPLES[0]
    assert hello["t"] == "hello" and hello["kind"] == "worker", "the first example: hello"
    scene.worker = await connect(broker)
    scene.opened.append(scene.worker)
    got = await scene.worker.ask({**hello, "key": broker.key})
    if not like(answers[0], {**(got or {}), "role": "worker"}):
        failures.append(f"hello: {got} is not like {answers[0]}")
    scene.client = await scene.session()
    for msg, documented in EXAMPLES[1:]:
        prepare = PREPARE.get(msg["t"])
        assert prepare is not None, f"an example {msg['t']} request: add it to PREPARE"
        sent = await prepare(scene, msg)
        raw = scene.worker if msg["t"] in WORKER_REQUESTS else scene.client
        if msg["t"] == "subscribe":
            raw = await scene.session()
        got = await raw.ask(sent)
        if not documented or not like(documented[0], got):
            failures.append(f"{msg['t']}: {got} is not like {documented[:1]}")
        for event in documented[1:]:
            failures += await _check_event(scene, raw, event)
    return failures


async def _check_event(scene: Scene, raw: Raw, documented: dict[str, Any]) -> list[str]:
    """Make the documented event happen, then read events until one of its topic."""
    topic = documented["topic"]
    if topic == "lagged":
        return []  # needs a subscriber 256 events behind: tested in test_events.py
    if topic == "tasks":
        await scene.fresh()
    if topic == "workers":
        raw = await scene.session()
        answer = await raw.ask({"t": "subscribe", "id": documented["id"], "topics": ["workers"]})
        assert answer is not None and answer["t"] == "ack"
        await scene.session(kind="worker", worker_id="w2")
    if topic == "progress":  # a heartbeat of the worker session with a running task
        raw = await scene.session()
        answer = await raw.ask({"t": "subscribe", "id": documented["id"], "topics": ["progress"]})
        assert answer is not None and answer["t"] == "ack"
        lease = await scene.leased()
        beat = {
            "t": "heartbeat",
            "id": scene.rid(),
            "leases": [[lease["id"], lease["token"]]],
            "progress": [[lease["id"], lease["token"], 0.4, "page 4/10"]],
        }
        assert (await scene.worker.ask(beat) or {}).get("t") == "ack"
    while (got := await raw.read()) is not None and got.get("topic") != topic:
        pass
    if got is None or not like({**documented, "id": got["id"], "seq": got["seq"]}, got):
        return [f"event {topic}: {got} is not like {documented}"]
    return []


# -- sections 6, 7, 12: the Task map, states, roles --------------------------------------


def test_task_table_and_example_list_the_task_fields() -> None:
    section = DOC.section("6.")
    fields = {f.name for f in dataclasses.fields(Task)}
    documented = {name for row in section.tables[0].rows for name in ticked(row[0])}
    assert documented == fields
    example = loose_json(section.blocks[0][1][0])
    assert set(example) == fields
    lease = next(t for t in section.tables if t.before.startswith("**Lease**"))
    assert {ticked(row[0])[0] for row in lease.rows} == {f.name for f in dataclasses.fields(Lease)}


@pytest.mark.trio
async def test_task_example_is_like_a_live_task(tmp_path: Path) -> None:
    example = loose_json(DOC.section("6.").blocks[0][1][0])
    async with running_broker(tmp_path) as broker:
        raw = await session(broker)
        spec = {k: example[k] for k in ("type", "queue", "payload", "priority", "idempotency_key")}
        submitted = await raw.ask({"t": "submit", "id": 2, "tasks": [spec]})
        assert submitted is not None
        got = await raw.ask(
            {"t": "query", "id": 3, "q": "get", "task": submitted["tasks"][0]["id"]}
        )
        assert got is not None
        assert like({**example, "state": "pending"}, got["task"]), got
        await raw.aclose()


def test_transition_table_is_the_state_table() -> None:
    table = DOC.section("7.").tables[0]
    documented = {
        (old, new) for row in table.rows for old in ticked(row[0]) for new in ticked(row[1])
    }
    code = {(old.value, new.value) for (old, _), new in TRANSITIONS.items()}
    assert documented == code
    terminal = re.search(r"Terminal: (.*?)\.", DOC.section("7.").text)
    assert terminal is not None
    assert {State(s) for s in ticked(terminal.group(1))} == TERMINAL


def test_event_topics_are_the_bus_topics() -> None:
    tables = DOC.section("`event`").tables  # one per topic, after "`tasks` events:"
    topics = [ticked(t.before)[0] for t in tables if t.before.endswith(" events:")]
    assert topics == [*TOPICS, "lagged"]


def _actions(cell: str) -> list[str]:
    """The ALLOWED actions a role-table cell names (``query`` kinds become query:<q>)."""
    if cell.startswith('`hello` with `kind: "worker"`'):
        return ["hello:worker"]
    out = []
    for part in cell.split(";"):  # "`schedule` `list`, `get`": the ops of one request
        names = ticked(part)
        if names and names[0] in ("schedule", "cap"):
            out += [f"{names[0]}:{name}" for name in names[1:]]
            continue
        for name in names:
            out.append(f"query:{name}" if f"query:{name}" in ALLOWED else name)
    return [a for a in out if a != "query"]


def test_role_table_is_the_role_table() -> None:
    table = DOC.section("12.").tables[0]
    roles = table.header[1:]
    seen = set()
    for row in table.rows:
        for action in _actions(row[0]):
            seen.add(action)
            for role, mark in zip(roles, row[1:], strict=True):
                assert allowed(role, action) == (mark == "✓"), f"{action} for {role}"
    per_op = {"keys:create", "keys:list", "keys:revoke", "queue:pause", "queue:resume"}
    assert seen == set(ALLOWED) - per_op | {"keys", "queue"}


# -- maps described in prose: their keys ---------------------------------------------------


def top_level_names(span: str) -> set[str]:
    """The quoted names at the top level of a ``{...}`` description (not in nested maps,
    nor in parenthesised remarks)."""
    names, braces, parens = set(), 0, 0
    for token in re.finditer(r'[{}()]|"(\w+)"', span):
        text = token.group(0)
        if text in "{}":
            braces += 1 if text == "{" else -1
        elif text in "()":
            parens += 1 if text == "(" else -1
        elif braces == 1 and parens == 0:
            names.add(token.group(1))
    return names


def described_map(marker: str) -> set[str]:
    """The keys of the first ``{...}`` code span after ``marker`` in section 5."""
    text = "\n".join(s.text for s in DOC.messages())
    after = text[text.index(marker) :]
    span = re.search(r"`(\{.*?\})`", after, re.DOTALL)
    assert span is not None, marker
    return top_level_names(span.group(1))


def test_top_level_names_skip_nested_maps_and_remarks() -> None:
    span = '{"a": {"x": 1}, "b" (one of "p", "q"), "c"}'
    assert top_level_names(span) == {"a", "b", "c"}


@pytest.mark.trio
async def test_maps_described_in_prose_have_the_documented_keys(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        worker = await session(broker, kind="worker")
        raw = await session(broker)
        got: dict[str, set[str]] = {}
        for q in ("stats", "workers", "health"):
            answer = await raw.ask({"t": "query", "id": 2, "q": q})
            assert answer is not None and answer["t"] == "ack", answer
            value = answer[q]
            got[q] = set(value[0] if isinstance(value, list) else value)
        answer = await raw.ask({"t": "keys", "id": 3, "op": "list"})
        assert answer is not None
        got["keys"] = set(answer["keys"][0])
        await raw.aclose()
        await worker.aclose()
    assert got["stats"] == described_map("**`stats`**")
    assert got["workers"] == described_map("**`workers`**")
    assert got["health"] == described_map("**`health`**")
    assert got["keys"] == described_map("Key info:")
