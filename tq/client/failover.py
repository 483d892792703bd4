"""Failover policy, one for both clients and the worker: which broker next, how long to
wait, and what may be sent again after a lost connection. Pure: no I/O, no clock reads
(callers pass the time), so it is tested without brokers or sleeps.

* ``parse_brokers("b1:7470, b2:7470")`` -> ``("b1:7470", "b2:7470")``: the broker list
  of ``--broker`` / ``TQ_BROKER`` / the config file / a join token, or a ConfigError
  naming the entry that is wrong.
* ``Rotation``: the order to try the brokers in. It starts at the first; a broker that
  failed (or whose connection was lost) moves to the back, so the next attempt starts
  with the following one; a broker that accepted is tried first next time.
* ``Backoff``: the pause after each round of failed attempts, exponential with equal
  jitter (``tq.core.retry``) and never past the failover budget's deadline; ``None``
  when the budget is spent (then the last error is raised).
* ``resend_safe(message)``: may this request be sent again after its connection broke
  before the answer came? Reads (``query``, ``wait``) yes; a ``submit`` only when every
  task carries an ``idempotency_key`` (the broker stores a key once, so a resend
  answers ``created: false`` and duplicates nothing); every other write no: its outcome
  is unknown and ``OutcomeUnknown`` says so.
* ``with_idempotency_keys(message)``: a ``submit`` whose tasks without a key get one
  (``tq-auto-`` + 32 hex digits). A client with failover on attaches them before the
  first send, so that the resend after a lost connection is safe; ``resent_answer``
  then reports those tasks as ``created`` (the first attempt made them).

A request answered with a NACK of its own id committed nothing (docs/PROTOCOL.md,
"Errors"): after an ``unavailable`` one (the broker is going away) any request may go
to another broker.
"""

from __future__ import annotations

import enum
import random
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from tq.core.errors import ConfigError, ConnectionFailed, TLSFailure, TQError, Unavailable
from tq.core.retry import RetryPolicy

AUTO_KEY_PREFIX = "tq-auto-"
DEFAULT_WINDOW = 15.0  # seconds a client with several brokers keeps trying after a loss
RECONNECT = RetryPolicy(base=0.1, cap=5.0)  # pause after the n-th failed round in a row
_ADDRESS = re.compile(r"^[A-Za-z0-9._%:\[\]-]+$")  # what a host (and :port) may hold
_HINT = "separate several brokers with commas, e.g. --broker host1:7470,host2:7470"


def parse_brokers(text: str) -> tuple[str, ...]:
    """The broker addresses in ``text`` (comma-separated), checked one by one."""
    from tq.config import parse_address  # tq.config imports this module lazily too

    if not text or not text.strip():
        raise ConfigError("no broker address; pass --broker HOST:PORT (or --join TOKEN)")
    parts = [p.strip() for p in text.split(",")]
    out: list[str] = []
    for n, part in enumerate(parts, 1):
        if not part:
            raise ConfigError(f"broker list {text!r}: entry {n} of {len(parts)} is empty; {_HINT}")
        if any(c.isspace() for c in part):
            raise ConfigError(f"broker list {text!r}: {part!r} contains a space; {_HINT}")
        if not _ADDRESS.match(part):
            raise ConfigError(
                f"broker list {text!r}: {part!r} is not HOST:PORT (a name, an IPv4 "
                f"address or an [IPv6] address, then :PORT); {_HINT}"
            )
        try:
            parse_address(part)
        except ConfigError as exc:
            raise ConfigError(f"broker list {text!r}: {exc}; {_HINT}") from None
        if part not in out:
            out.append(part)
    return tuple(out)


class Rotation:
    """The brokers in the order to try them: the preferred one first, then the rest."""

    def __init__(self, addresses: Sequence[str]) -> None:
        if not addresses:
            raise ConfigError("no broker address; pass --broker HOST:PORT (or --join TOKEN)")
        self.addresses = tuple(addresses)
        self._first = 0

    def order(self) -> list[str]:
        n = self._first
        return [*self.addresses[n:], *self.addresses[:n]]

    def connected(self, address: str) -> None:
        """``address`` accepted: try it first next time."""
        if address in self.addresses:
            self._first = self.addresses.index(address)

    def failed(self, address: str) -> None:
        """``address`` refused, or its connection was lost: start with the next one."""
        if address in self.addresses and self.addresses[self._first] == address:
            self._first = (self._first + 1) % len(self.addresses)


class Backoff:
    """Pauses between rounds of attempts, bounded by ``deadline`` (None: no bound)."""

    def __init__(
        self,
        deadline: float | None,
        policy: RetryPolicy = RECONNECT,
        rng: random.Random | None = None,
    ) -> None:
        self.deadline = deadline
        self.policy = policy
        self.rng = rng
        self.failures = 0

    def next_delay(self, now: float) -> float | None:
        """The pause before the next round, or None when the deadline has passed."""
        if self.deadline is not None and now >= self.deadline:
            return None
        self.failures += 1
        delay = self.policy.delay(self.failures, self.rng)
        if self.deadline is not None:
            delay = min(delay, self.deadline - now)
        return delay

    def reset(self) -> None:
        self.failures = 0


def window(addresses: Sequence[str], failover: float | None) -> float:
    """Seconds to keep trying after a lost connection: ``failover`` if given, else
    ``DEFAULT_WINDOW`` with several brokers and 0 (fail at once) with one."""
    if failover is not None:
        if failover != failover or failover < 0:
            raise ConfigError(f"failover must be a number of seconds >= 0, not {failover!r}")
        return float(failover)
    return DEFAULT_WINDOW if len(addresses) > 1 else 0.0


def retriable(error: TQError) -> bool:
    """Another broker (or the same one later) may accept: not a misconfiguration."""
    return isinstance(error, ConnectionFailed | Unavailable) and not isinstance(error, TLSFailure)


# A broker host that vanishes (power, network) sends no reset: without these a request
# in flight would wait for the kernel's retransmission timeout (many minutes).
KEEPALIVE_IDLE = 10  # seconds of silence before the first probe
KEEPALIVE_INTERVAL = 5  # seconds between probes
KEEPALIVE_COUNT = 3  # unanswered probes before the connection is dropped
UNACKED_LIMIT_MS = 30_000  # sent data not acknowledged for this long: dropped


def socket_options() -> list[tuple[int, int, int]]:
    """(level, option, value) for a client's TCP socket: keepalive probes and a bound
    on unacknowledged data, so a silent broker host is noticed within about 30 s
    (each only where the platform has it)."""
    import socket

    tcp = socket.IPPROTO_TCP
    wanted = [
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
        (tcp, "TCP_KEEPIDLE", KEEPALIVE_IDLE),
        (tcp, "TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        (tcp, "TCP_KEEPCNT", KEEPALIVE_COUNT),
        (tcp, "TCP_USER_TIMEOUT", UNACKED_LIMIT_MS),
    ]
    return [(level, getattr(socket, name), v) for level, name, v in wanted if hasattr(socket, name)]


class Resend(enum.Enum):
    READ = "read"  # changes nothing: send again
    KEYED = "keyed"  # a submit whose every task has an idempotency key: send again
    UNSAFE = "unsafe"  # a write that may have committed: never send again


_READS = frozenset({"query", "wait"})


def resend_rule(message: Mapping[str, Any]) -> Resend:
    kind = message.get("t")
    if kind in _READS:
        return Resend.READ
    if kind == "submit":
        tasks = message.get("tasks")
        if isinstance(tasks, list) and tasks and all(_keyed(t) for t in tasks):
            return Resend.KEYED
    return Resend.UNSAFE


def resend_safe(message: Mapping[str, Any]) -> bool:
    return resend_rule(message) is not Resend.UNSAFE


def _keyed(spec: Any) -> bool:
    return isinstance(spec, Mapping) and isinstance(spec.get("idempotency_key"), str)


def auto_key() -> str:
    return AUTO_KEY_PREFIX + secrets.token_hex(16)


def with_idempotency_keys(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` itself unless it is a submit with tasks lacking a key: then a copy
    in which each of those tasks has a fresh ``tq-auto-...`` key."""
    tasks = message.get("tasks")
    if message.get("t") != "submit" or not isinstance(tasks, list):
        return message
    if all(_keyed(t) for t in tasks):
        return message
    keyed = [
        t if _keyed(t) or not isinstance(t, Mapping) else {**t, "idempotency_key": auto_key()}
        for t in tasks
    ]
    return {**message, "tasks": keyed}


def resent_answer(message: Mapping[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    """The answer to a submit that was sent again: a task under a key this client made
    (``tq-auto-``, unique to this request) that answers ``created: false`` was created by
    the first attempt, i.e. by this request: say ``created: true``."""
    tasks, items = message.get("tasks"), reply.get("tasks")
    if message.get("t") != "submit" or not isinstance(tasks, list) or not isinstance(items, list):
        return reply
    fixed = []
    for spec, item in zip(tasks, items, strict=False):
        key = spec.get("idempotency_key") if isinstance(spec, Mapping) else None
        auto = isinstance(key, str) and key.startswith(AUTO_KEY_PREFIX)
        fixed.append({**item, "created": True} if auto and isinstance(item, dict) else item)
    return {**reply, "tasks": fixed}


class OutcomeUnknown(ConnectionFailed):
    """The connection broke after a write was sent and before its answer: it may or may
    not have committed, and resending it could do it twice."""


def outcome_unknown(address: str, message: Mapping[str, Any]) -> OutcomeUnknown:
    kind = str(message.get("t", "request"))
    target = message.get("task")
    what = f"`{kind}`" + (f" of task {target}" if isinstance(target, str) else "")
    hint = (
        "give each task an idempotency_key (then it is re-sent safely)"
        if kind == "submit"
        else "look at the task (`tq status ID`) before doing it again"
    )
    return OutcomeUnknown(
        f"the connection to the broker at {address} was lost after the {what} request "
        f"was sent and before its answer: it may or may not have been done; {hint}"
    )


class Unanswered(Exception):
    """Inside a client: ``error`` ended the connection after the request was sent and
    before its answer (the outcome of a write is unknown). Never escapes a client."""

    def __init__(self, error: TQError) -> None:
        super().__init__(str(error))
        self.error = error
