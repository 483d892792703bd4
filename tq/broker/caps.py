"""Caps in the service layer: the ``cap`` request (set, remove, list).

``CapOps`` is a mixin of ``BrokerService`` (like ``OperatorOps``). The wire,
REST and the CLI all call ``cap_request``. A cap limits a queue or a task type
cluster-wide: at most ``concurrency`` running at once and at most ``rate``
started per second (a bucket of ``burst`` tokens); the store enforces it in the
claim's transaction (tq.store.claimplan). Setting a cap replaces both limits
(a limit left out is lifted). ``list`` is a read (reader, producer, admin);
``set`` and ``remove`` are admin only and audited (``cap.set``, ``cap.remove``).
A key limited to some queues sees and sets the caps of its queues only (type
caps span queues: such a key may list them, not change them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from tq.core.errors import Forbidden, InvalidRequest
from tq.core.limits import MAX_CAP_RATE as MAX_RATE
from tq.core.typed import describe
from tq.store.claimplan import QUEUE, Cap, default_burst

if TYPE_CHECKING:  # tq.cli.caps imports this module: no protocol (msgpack) at its start
    from tq.broker.auth import Auth
    from tq.protocol.answers import (
        CapListAnswer,
        CapListed,
        CapMap,
        CapRemoveAnswer,
        CapSetAnswer,
    )
    from tq.protocol.schema import CapOp
    from tq.security.roles import Principal
    from tq.store.base import Store

RUNNING_LIMIT = 100_000  # running tasks counted per cap for list (more: "at least")


def parse_rate(value: float | str | None) -> float | None:
    """A rate: a number of tasks per second, or text ``R/s``, ``R/m``, ``R/h``; None: none.
    A number's type and range are the declaration's (tq/protocol/schema.py); text is read
    here and its value held to the same range."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().replace(" ", "")
    per = 1.0
    for suffix, seconds in (("/s", 1.0), ("/m", 60.0), ("/min", 60.0), ("/h", 3600.0)):
        if text.endswith(suffix):
            text, per = text[: -len(suffix)], seconds
            break
    try:
        rate = float(text) / per
    except ValueError:
        rate = math.nan
    if not math.isfinite(rate) or not 0 < rate <= MAX_RATE:
        from tq.protocol.schema import RATE_RULE

        raise InvalidRequest(
            f"cap message: field 'rate' must be {RATE_RULE}, got {describe(value)}"
        )
    return rate


def rate_text(rate: float) -> str:
    """A rate in the unit that reads best: ``10/s``, ``30/m``, ``2/h``."""
    if rate >= 1:
        return f"{rate:.4g}/s"
    if rate * 60 >= 1:
        return f"{rate * 60:.4g}/m"
    return f"{rate * 3600:.4g}/h"


def burst_of(rate: float, burst: float | None) -> float:
    """The bucket size in force: ``burst``, or one second's worth (at least 1)."""
    return default_burst(rate) if burst is None else burst


def check_cap(msg: CapOp) -> Cap:
    """The cap a ``set`` request asks for (its fields' types and ranges checked by the
    declaration); InvalidRequest naming what joins two fields wrongly."""
    assert msg.kind is not None and msg.name is not None  # required for set
    rate = parse_rate(msg.rate)
    if msg.burst is not None and rate is None:
        raise InvalidRequest(
            "cap message: field 'burst' needs a rate (--rate): it is the rate bucket's size"
        )
    if msg.concurrency is None and rate is None:
        raise InvalidRequest(
            "cap message: a cap needs a concurrency, a rate or both (to lift a cap, remove it)"
        )
    return Cap(msg.kind, msg.name, msg.concurrency, rate, msg.burst)


class CapOps:
    # provided by BrokerService
    store: Store
    auth: Auth
    clock: Callable[[], float]
    notify_work: Callable[[], None]

    async def cap_request(
        self, msg: CapOp, principal: Principal | None = None
    ) -> CapSetAnswer | CapRemoveAnswer | CapListAnswer:
        """One ``cap`` request (op: set, remove, list)."""
        from tq.broker.auth import actor_of
        from tq.protocol.answers import CapListAnswer, CapRemoveAnswer, CapSetAnswer
        from tq.protocol.schema import check_op, check_required

        op = check_op(msg)
        check_required(msg)
        if op == "list":
            return CapListAnswer(id=msg.id, caps=await self.list_caps(principal))
        if op == "set":
            cap = check_cap(msg)
            _check_may_change(principal, cap.kind, cap.name)
            stored = await self.store.set_cap(cap, self.clock())
            self.notify_work()  # a raised cap lets waiting claims take more
            await self.auth.record(actor_of(principal), "cap.set", _target(cap), cap.to_dict())
            return CapSetAnswer(id=msg.id, cap=cap_map(stored))
        kind, name = msg.kind, msg.name
        assert kind is not None and name is not None  # required for remove
        _check_may_change(principal, kind, name)
        removed = await self.store.remove_cap(kind, name)
        if removed:
            self.notify_work()
            await self.auth.record(actor_of(principal), "cap.remove", f"{kind}:{name}", {})
        return CapRemoveAnswer(id=msg.id, kind=kind, name=name, removed=removed)

    async def visible_caps(self, principal: Principal | None = None) -> list[Cap]:
        """Every cap this principal may see (a queue-limited key: its queues' and the type
        caps), by kind then name."""
        return [
            cap
            for cap in await self.store.list_caps()
            if principal is None or cap.kind != QUEUE or principal.may_use(cap.name)
        ]

    async def list_caps(self, principal: Principal | None = None) -> list[CapListed]:
        """Every cap this principal may see, with its running count now."""
        from tq.protocol.answers import CapListed

        return [
            CapListed(
                kind=cap.kind,
                name=cap.name,
                concurrency=cap.concurrency,
                rate=cap.rate,
                burst=cap.burst,
                running=await self.store.running_count(cap.kind, cap.name, RUNNING_LIMIT),
            )
            for cap in await self.visible_caps(principal)
        ]


def cap_map(cap: Cap) -> CapMap:
    """A cap as its answer map (nil: that limit is not set)."""
    from tq.protocol.answers import CapMap

    return CapMap(
        kind=cap.kind, name=cap.name, concurrency=cap.concurrency, rate=cap.rate, burst=cap.burst
    )


def _target(cap: Cap) -> str:
    return f"{cap.kind}:{cap.name}"


def _check_may_change(principal: Principal | None, kind: str, name: str) -> None:
    if principal is None or principal.queues is None:
        return
    if kind == QUEUE:
        principal.check_queue(name)
        return
    raise Forbidden(
        f"key {principal.key_id} is limited to some queues: a type cap spans every queue, "
        "so only a key for every queue may set or remove one"
    )
