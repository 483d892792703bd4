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
from typing import TYPE_CHECKING, Any

from tq.core.errors import Forbidden, InvalidRequest
from tq.core.task import _name
from tq.store.claimplan import KINDS, MAX_CONCURRENCY, MAX_RATE, QUEUE, Cap, default_burst

if TYPE_CHECKING:
    from tq.broker.auth import Auth
    from tq.security.roles import Principal
    from tq.store.base import Store

OPS = ("set", "remove", "list")
RUNNING_LIMIT = 100_000  # running tasks counted per cap for list (more: "at least")


def parse_rate(value: object) -> float | None:
    """A rate: a number of tasks per second, or text ``R/s``, ``R/m``, ``R/h``; None: none."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        per = 1.0
        for suffix, seconds in (("/s", 1.0), ("/m", 60.0), ("/min", 60.0), ("/h", 3600.0)):
            if text.endswith(suffix):
                text, per = text[: -len(suffix)], seconds
                break
        try:
            amount = float(text)
        except ValueError:
            raise InvalidRequest(
                f"cap rate {value!r} is not a rate: give tasks per second, e.g. 5/s, 30/m or 0.5"
            ) from None
        value = amount / per
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"cap rate must be a number of tasks per second, not {value!r}")
    rate = float(value)
    if not math.isfinite(rate) or not 0 < rate <= MAX_RATE:
        raise InvalidRequest(f"cap rate must be > 0 and at most {MAX_RATE:g} per second")
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


def check_cap(msg: Any) -> Cap:
    """The cap a ``set`` request asks for; InvalidRequest naming what is wrong."""
    kind = msg.get("kind")
    if kind not in KINDS:
        raise InvalidRequest(f"cap kind must be one of {', '.join(KINDS)}, not {kind!r}")
    name = _name({kind: msg.get("name")}, str(kind), None)
    concurrency = msg.get("concurrency")
    if concurrency is not None and (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        raise InvalidRequest(f"cap concurrency must be a whole number 1..{MAX_CONCURRENCY}")
    rate = parse_rate(msg.get("rate"))
    burst = msg.get("burst")
    if burst is not None:
        if rate is None:
            raise InvalidRequest("cap burst needs a rate (--rate): it is the rate bucket's size")
        if isinstance(burst, bool) or not isinstance(burst, int | float):
            raise InvalidRequest("cap burst must be a number of tasks")
        burst = float(burst)
        if not math.isfinite(burst) or not 1 <= burst <= MAX_RATE:
            raise InvalidRequest(f"cap burst must be 1..{MAX_RATE:g} tasks")
    if concurrency is None and rate is None:
        raise InvalidRequest("a cap needs a concurrency, a rate or both (to lift a cap, remove it)")
    return Cap(str(kind), name, concurrency, rate, burst)


class CapOps:
    # provided by BrokerService
    store: Store
    auth: Auth
    clock: Callable[[], float]
    notify_work: Callable[[], None]

    async def cap_request(self, msg: Any, principal: Principal | None = None) -> dict[str, Any]:
        """One ``cap`` request (op: set, remove, list)."""
        from tq.broker.auth import actor_of

        op = msg.get("op")
        if op not in OPS:
            raise InvalidRequest(f"unknown cap op {op!r}; known: {', '.join(OPS)}")
        if op == "list":
            caps = await self.list_caps(principal)
            return {"caps": caps}
        if op == "set":
            cap = check_cap(msg)
            _check_may_change(principal, cap.kind, cap.name)
            stored = await self.store.set_cap(cap, self.clock())
            self.notify_work()  # a raised cap lets waiting claims take more
            await self.auth.record(actor_of(principal), "cap.set", _target(cap), cap.to_dict())
            return {"cap": stored.to_dict()}
        kind = msg.get("kind")
        if kind not in KINDS:
            raise InvalidRequest(f"cap kind must be one of {', '.join(KINDS)}, not {kind!r}")
        name = _name({kind: msg.get("name")}, str(kind), None)
        _check_may_change(principal, str(kind), name)
        removed = await self.store.remove_cap(str(kind), name)
        if removed:
            self.notify_work()
            await self.auth.record(actor_of(principal), "cap.remove", f"{kind}:{name}", {})
        return {"kind": kind, "name": name, "removed": removed}

    async def visible_caps(self, principal: Principal | None = None) -> list[Cap]:
        """Every cap this principal may see (a queue-limited key: its queues' and the type
        caps), by kind then name."""
        return [
            cap
            for cap in await self.store.list_caps()
            if principal is None or cap.kind != QUEUE or principal.may_use(cap.name)
        ]

    async def list_caps(self, principal: Principal | None = None) -> list[dict[str, Any]]:
        """Every cap this principal may see, with its running count now."""
        found = []
        for cap in await self.visible_caps(principal):
            entry = cap.to_dict()
            entry["running"] = await self.store.running_count(cap.kind, cap.name, RUNNING_LIMIT)
            found.append(entry)
        return found


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
