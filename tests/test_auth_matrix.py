"""Every request type x {no key, wrong key, revoked key, insufficient role, right role}.

One broker, one table: each row names a request, a role its table entry
forbids and a role it allows, and how to build a valid request (so the
right role gets an ACK, not a domain error). Every cell is a fresh
connection. Mismatches are collected and reported together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tq.core.errors import TQError
from tq.protocol import REQUEST_TYPES
from tq.security.roles import ALLOWED
from tq.testing import RunningBroker, running_broker

Build = Callable[["Fixture"], Awaitable[dict[str, Any] | None]]


@dataclass
class Fixture:
    broker: RunningBroker
    keys: dict[str, str]  # role -> key text

    async def admin(self, msg: dict[str, Any]) -> dict[str, Any]:
        async with self.broker.client() as client:
            return await client.request(msg)

    async def task(self, then: str | None = None) -> str:
        reply = await self.admin({"t": "submit", "tasks": [{"type": "echo"}]})
        task_id: str = reply["tasks"][0]["id"]
        if then == "cancel":
            await self.admin({"t": "cancel", "task": task_id})
        return task_id


async def _fixed(msg: dict[str, Any]) -> dict[str, Any]:
    return msg


def const(msg: dict[str, Any]) -> Build:
    return lambda fx: _fixed(msg)


async def _with_task(fx: Fixture, t: str, then: str | None, **extra: Any) -> dict[str, Any]:
    return {"t": t, "task": await fx.task(then), **extra}


async def _with_schedule(fx: Fixture, op: str) -> dict[str, Any]:
    """A ``schedule`` request on a schedule that exists (made, or made again, by admin)."""
    name = f"matrix-{op}"
    add = {"op": "add", "name": name, "cron": "0 0 * * *", "task": {"type": "echo"}}
    await fx.admin({"t": "schedule", **add})
    return {"t": "schedule", "op": op, "name": name}


def _schedule_row(op: str, forbidden: str, allowed: str) -> tuple[str, Build, str, str, str]:
    return (f"schedule:{op}", lambda fx: _with_schedule(fx, op), "client", forbidden, allowed)


async def _revoke_target(fx: Fixture) -> dict[str, Any]:
    reply = await fx.admin({"t": "keys", "op": "create", "role": "reader", "name": "victim"})
    return {"t": "keys", "op": "revoke", "key_id": reply["info"]["id"]}


# (action, message builder, kind of hello for the allowed role, forbidden role, allowed role)
TABLE: list[tuple[str, Build, str, str, str]] = [
    ("hello", const({}), "client", "-", "reader"),
    ("hello:worker", const({}), "worker", "producer", "worker"),
    ("submit", const({"t": "submit", "tasks": [{"type": "echo"}]}), "client", "reader", "producer"),
    (
        "claim",
        const({"t": "claim", "n": 1, "queues": ["q"], "wait": 0.01}),
        "worker",
        "producer",
        "worker",
    ),
    (
        "result",
        const({"t": "result", "results": [{"id": "x", "token": 1, "status": "ok"}]}),
        "worker",
        "producer",
        "worker",
    ),
    ("heartbeat", const({"t": "heartbeat", "leases": []}), "worker", "producer", "worker"),
    ("query:get", lambda fx: _with_task(fx, "query", None, q="get"), "client", "worker", "reader"),
    ("query:list", const({"t": "query", "q": "list"}), "client", "worker", "reader"),
    ("query:stats", const({"t": "query", "q": "stats"}), "client", "worker", "reader"),
    ("query:workers", const({"t": "query", "q": "workers"}), "client", "worker", "reader"),
    ("query:depth", const({"t": "query", "q": "depth"}), "client", "worker", "reader"),
    ("query:health", const({"t": "query", "q": "health"}), "client", "worker", "reader"),
    (
        "query:explain",
        lambda fx: _with_task(fx, "query", None, q="explain"),
        "client",
        "worker",
        "reader",
    ),
    (
        "query:workflow",
        lambda fx: _with_task(fx, "query", None, q="workflow"),
        "client",
        "worker",
        "reader",
    ),
    (
        "query:history",
        lambda fx: _with_task(fx, "query", None, q="history"),
        "client",
        "worker",
        "reader",
    ),
    ("wait", lambda fx: _with_task(fx, "wait", None, timeout=0), "client", "worker", "reader"),
    ("cancel", lambda fx: _with_task(fx, "cancel", None), "client", "reader", "producer"),
    (
        "set_priority",
        lambda fx: _with_task(fx, "set_priority", None, priority=7),
        "client",
        "reader",
        "producer",
    ),
    ("retry", lambda fx: _with_task(fx, "retry", "cancel"), "client", "producer", "admin"),
    ("retry_many", const({"t": "retry_many", "state": "dead"}), "client", "producer", "admin"),
    (
        "queue:pause",
        const({"t": "queue", "op": "pause", "queue": "matrix"}),
        "client",
        "producer",
        "admin",
    ),
    ("schedule:list", const({"t": "schedule", "op": "list"}), "client", "worker", "reader"),
    (
        "schedule:add",
        const(
            {
                "t": "schedule",
                "op": "add",
                "name": "matrix",
                "cron": "0 0 * * *",
                "task": {"type": "echo"},
            }
        ),
        "client",
        "producer",
        "admin",
    ),
    _schedule_row("get", "worker", "reader"),
    _schedule_row("pause", "producer", "admin"),
    _schedule_row("resume", "producer", "admin"),
    _schedule_row("run_now", "producer", "admin"),
    _schedule_row("remove", "producer", "admin"),
    (
        "queue:resume",
        const({"t": "queue", "op": "resume", "queue": "matrix"}),
        "client",
        "producer",
        "admin",
    ),
    ("cap:list", const({"t": "cap", "op": "list"}), "client", "worker", "reader"),
    (
        "cap:set",
        const({"t": "cap", "op": "set", "kind": "queue", "name": "matrix", "concurrency": 2}),
        "client",
        "producer",
        "admin",
    ),
    (
        "cap:remove",
        const({"t": "cap", "op": "remove", "kind": "queue", "name": "matrix"}),
        "client",
        "producer",
        "admin",
    ),
    (
        "purge",
        const({"t": "purge", "states": ["succeeded"], "older_than": 60, "dry_run": True}),
        "client",
        "reader",
        "admin",
    ),
    ("subscribe", const({"t": "subscribe", "topics": ["counts"]}), "client", "worker", "reader"),
    ("unsubscribe", const({"t": "unsubscribe"}), "client", "worker", "reader"),
    (
        "keys:create",
        const({"t": "keys", "op": "create", "role": "reader"}),
        "client",
        "producer",
        "admin",
    ),
    ("keys:list", const({"t": "keys", "op": "list"}), "client", "producer", "admin"),
    ("keys:revoke", _revoke_target, "client", "producer", "admin"),
    ("audit", const({"t": "audit"}), "client", "producer", "admin"),
]

CREDENTIALS = ("no key", "wrong key", "revoked key", "insufficient role", "right role")


def expected(credential: str) -> str:
    return {
        "no key": "unauthorized",
        "wrong key": "unauthorized",
        "revoked key": "unauthorized",
        "insufficient role": "forbidden",
        "right role": "ack",
    }[credential]


async def outcome(fx: Fixture, key: str | None, kind: str, msg: dict[str, Any] | None) -> str:
    """ "ack", or the NACK code: from the hello, else from the request."""
    try:
        async with fx.broker.client(key=key, kind=kind) as client:
            if msg is not None:
                await client.request(msg)
    except TQError as exc:
        return exc.code
    return "ack"


def key_for(fx: Fixture, credential: str, forbidden: str, allowed: str) -> str | None:
    if credential == "no key":
        return None
    if credential == "wrong key":
        key_id = fx.keys[allowed].split("_")[1]
        return f"tq_{key_id}_{'A' * 43}"  # a real key id, the wrong secret
    if credential == "revoked key":
        return fx.keys["revoked"]
    return fx.keys[forbidden if credential == "insufficient role" else allowed]


def test_the_table_covers_every_request_type() -> None:
    covered = {action.split(":")[0] for action, *_ in TABLE}
    assert covered >= REQUEST_TYPES, f"add rows for {sorted(REQUEST_TYPES - covered)}"
    actions = {action for action, *_ in TABLE}
    assert actions >= set(ALLOWED), f"add rows for {sorted(set(ALLOWED) - actions)}"


@pytest.mark.slow  # ~100 connections
@pytest.mark.trio
async def test_every_request_type_by_credential(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as admin:
        keys: dict[str, str] = {"admin": str(broker.key)}
        for role in ("producer", "worker", "reader", "revoked"):
            msg = {"t": "keys", "op": "create", "role": "producer" if role == "revoked" else role}
            keys[role] = (await admin.request(msg))["key"]
        await admin.request({"t": "keys", "op": "revoke", "key_id": keys["revoked"].split("_")[1]})
        fx = Fixture(broker, keys)
        wrong: list[str] = []
        late: list[tuple[str, str | None, str, dict[str, Any] | None]] = []
        for action, build, kind, forbidden, allowed in TABLE:
            for credential in CREDENTIALS:
                if forbidden == "-" and credential == "insufficient role":
                    continue  # every role may say hello as a client
                key = key_for(fx, credential, forbidden, allowed)
                # the forbidden role says hello as a client, so the request itself is judged
                hello_kind = (
                    kind
                    if credential != "insufficient role" or action.startswith("hello")
                    else "client"
                )
                msg = await build(fx)
                if credential == "wrong key":  # refused after a delay: all at once, below
                    late.append((action, key, hello_kind, msg or None))
                    continue
                got = await outcome(fx, key, hello_kind, msg or None)
                if got != expected(credential):
                    wrong.append(f"{action} / {credential}: {got}, expected {expected(credential)}")

        async def judge(action: str, key: str | None, kind: str, msg: Any) -> None:
            got = await outcome(fx, key, kind, msg)
            if got != expected("wrong key"):
                wrong.append(f"{action} / wrong key: {got}, expected {expected('wrong key')}")

        async with trio.open_nursery() as nursery:
            for case in late:
                nursery.start_soon(judge, *case)
        assert late and not wrong, "\n".join(wrong)
