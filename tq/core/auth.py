"""API keys and audit entries as the store keeps them. Pure data, no I/O.

An API key is the string ``tq_<key id>_<secret>``. The key id is public
(it names the key in lists, logs and the audit trail); the secret is shown
once, when the key is created, and only a salted hash of it is kept
(``ApiKey.salt``/``hash``, computed by ``tq.security.keys``). A key has one
role (``ROLES``) and optionally a set of queues it is limited to.

Time is an argument: ``ApiKey.state(now)`` says whether the key is usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tq.core.errors import InvalidRequest
from tq.core.limits import MAX_KEY_NAME

ROLES = ("admin", "producer", "worker", "reader")


def parse_role(value: object) -> str:
    if value not in ROLES:
        raise InvalidRequest(f"role {value!r} is not one of {', '.join(ROLES)}")
    return str(value)


def parse_queues(value: object) -> tuple[str, ...] | None:
    """None (every queue) or a non-empty tuple of queue names."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(q, str) and q and len(q) <= MAX_KEY_NAME for q in value)
    ):
        raise InvalidRequest("queues must be a non-empty list of queue names (or absent: all)")
    return tuple(dict.fromkeys(value))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One stored key: everything but the secret, which is kept only as ``hash``."""

    id: str
    name: str
    role: str
    queues: tuple[str, ...] | None  # None: every queue
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    kdf: str  # how ``hash`` was derived: "hmac-sha256" (older keys: "scrypt:n=16384,r=8,p=1")
    salt: bytes = field(repr=False)
    hash: bytes = field(repr=False)

    def state(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """Who did what, when. ``seq`` is assigned by the store (0 before it is stored)."""

    at: float
    actor: str  # key id, or "local" (offline CLI), "broker" (the broker itself), "anonymous"
    action: str  # e.g. "key.create", "key.revoke", "task.cancel", "task.retry"
    target: str = ""  # e.g. the key id or task id acted upon
    detail: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
