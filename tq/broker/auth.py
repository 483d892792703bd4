"""The broker's keys, roles, submission rate limits and audit trail.

One ``Auth`` per broker, owned by the service layer, used by every edge
(wire sessions now, REST routes later):

    principal = await auth.authenticate(key_text)    # at hello (or per HTTP request)
    auth.check(principal)                            # before every request
    principal.authorize(action)                      # the role table, tq.security.roles
    auth.take_submit(principal, n)                   # rate limit, before a submit

Keys live in the store; the broker keeps them in an in-memory table (key
id -> record) so the check before each request costs a dict lookup. The
table is updated at once by this broker's create/revoke paths and
reloaded from the store every ``KEY_REFRESH`` seconds, which picks up
keys created or revoked offline (``tq keys ... --data``) or by another
broker sharing the store. A secret is verified with scrypt (~60 ms, in a
thread, one at a time) the first time it is presented; later hellos with
the same key compare a cheap keyed digest kept in memory. Unknown key ids
never reach scrypt. With ``enabled`` False (``--no-auth``) every request is
allowed and principals are None.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tq.config import Settings, parse_address
from tq.core.auth import ApiKey, AuditEntry, parse_queues
from tq.core.errors import InvalidRequest, NotFound, RateLimited, TQError, Unauthorized
from tq.core.values import number
from tq.security.keys import fast_digest, new_key, parse_key, read_key_file, verify_secret
from tq.security.limits import RateLimiter
from tq.security.roles import Principal
from tq.security.tls import write_private
from tq.security.tokens import advertised_addresses, encode_join_token
from tq.store.base import Store

log = logging.getLogger("tq.broker.auth")

KEY_REFRESH = 5.0  # seconds between reloads of the key table from the store
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z
RATE_LOG_EVERY = 10.0  # seconds: a flood of rate-limited submissions logs one line per key
MAX_AUDIT_PAGE = 1000
MAX_SEQ = 2**63 - 1  # SQLite's largest integer: an audit seq is never above it


def actor_of(principal: Principal | None) -> str:
    return "anonymous" if principal is None else principal.key_id


class Auth:
    def __init__(
        self,
        store: Store,
        *,
        enabled: bool = True,
        submit_rate: float = 0.0,
        submit_burst: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.enabled = enabled
        self.clock = clock
        self.limiter = RateLimiter(submit_rate, submit_burst)
        self._keys: dict[str, ApiKey] = {}
        self._verified: dict[str, bytes] = {}  # key id -> fast digest of a verified secret
        self._scrypt = trio.CapacityLimiter(1)  # failed logins cannot take every core
        self._limited_logged: dict[str, float] = {}  # key id -> when its last refusal was logged

    # -- the key table -----------------------------------------------------
    async def load(self) -> None:
        """(Re)load the key table from the store, keeping what this broker did meanwhile.

        A revocation or creation that lands while the store is being read may
        be missing from what the read returns; the in-memory table already
        has it, and keys are never deleted, so it wins for those.
        """
        loaded = {key.id: key for key in await self.store.list_keys()}
        for key_id, known in self._keys.items():
            fresh = loaded.get(key_id)
            if fresh is None or (known.revoked_at is not None and fresh.revoked_at is None):
                loaded[key_id] = known
        self._keys = loaded

    async def refresh_loop(self, interval: float = KEY_REFRESH) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await self.load()
            except TQError as exc:
                log.error("cannot reload the API keys (the last known table stays): %s", exc)

    def _remember(self, key: ApiKey) -> None:
        self._keys[key.id] = key
        if key.state(self.clock()) != "active":
            self._verified.pop(key.id, None)
            self.limiter.forget(key.id)

    async def bootstrap_admin(self, path: Path) -> str | None:
        """On a store with no keys: create an admin key, write it to ``path`` (0600)."""
        if not self.enabled or self._keys:
            return None
        text, key = await self._mint("admin (first start)", "admin")
        await self._create(key, "broker", {"bootstrap": True})
        await trio.to_thread.run_sync(write_private, path, (text + "\n").encode())
        log.info("created admin key %s and wrote it to %s (mode 0600)", key.id, path)
        return text

    async def join_key(self, path: Path) -> str | None:
        """The worker key the printed join token carries: ``path``'s if still good, else new."""
        if not self.enabled:
            return None
        text = read_key_file(path)
        if text is not None:
            try:
                principal = await self.authenticate(text)
                if principal is not None and principal.role == "worker":
                    return text
            except TQError:
                pass
        text, key = await self._mint("join token", "worker")
        await self._create(key, "broker", {"join": True})
        await trio.to_thread.run_sync(write_private, path, (text + "\n").encode())
        return text

    # -- authentication ----------------------------------------------------
    async def authenticate(self, text: object) -> Principal | None:
        """The principal a key string stands for; Unauthorized if it stands for none."""
        if not self.enabled:
            return None
        key_id, secret = parse_key(text)
        key = self._keys.get(key_id)
        if key is None:  # created offline or by another broker since the last reload?
            try:
                key = await self.store.get_key(key_id)
            except NotFound:
                raise Unauthorized(f"unknown API key {key_id}; ask an admin for a key") from None
            self._remember(key)
        self._check_state(key)
        digest = fast_digest(secret, key)
        if self._verified.get(key_id) != digest:
            ok = await trio.to_thread.run_sync(verify_secret, secret, key, limiter=self._scrypt)
            if not ok:
                raise Unauthorized(f"wrong secret for API key {key_id}")
            self._verified[key_id] = digest
        return Principal.of(key)

    def check(self, principal: Principal | None) -> None:
        """Before every request: the key must still exist, unrevoked and unexpired."""
        if principal is None:
            return
        key = self._keys.get(principal.key_id)
        if key is None:
            raise Unauthorized(f"API key {principal.key_id} no longer exists")
        self._check_state(key)

    def principal_of(self, key_id: str) -> Principal | None:
        """The principal of a key already authenticated once (a dashboard session names
        only its key id): Unauthorized if the key is unknown, revoked or expired now."""
        if not self.enabled:
            return None
        key = self._keys.get(key_id)
        if key is None:
            raise Unauthorized(f"API key {key_id} no longer exists; log in again")
        self._check_state(key)
        return Principal.of(key)

    def _check_state(self, key: ApiKey) -> None:
        state = key.state(self.clock())
        if state == "revoked":
            raise Unauthorized(
                f"API key {key.id} ({key.name}) was revoked; ask an admin for a new one"
            )
        if state == "expired":
            raise Unauthorized(
                f"API key {key.id} ({key.name}) has expired; ask an admin for a new one"
            )

    def take_submit(self, principal: Principal | None, n: int) -> None:
        """Charge ``n`` submitted tasks to the key's bucket (admins are not limited)."""
        if principal is None or principal.role == "admin":
            return
        now = self.clock()
        try:
            self.limiter.take(principal.key_id, n, now)
        except RateLimited as exc:
            if now - self._limited_logged.get(principal.key_id, -RATE_LOG_EVERY) >= RATE_LOG_EVERY:
                self._limited_logged[principal.key_id] = now
                log.warning(
                    "rate limiting key %s (%s): %s (logged at most every %gs per key)",
                    principal.key_id,
                    principal.name,
                    exc,
                    RATE_LOG_EVERY,
                )
            raise

    # -- key management (admin requests) -----------------------------------
    async def create_key(
        self,
        actor: Principal | None,
        *,
        name: str = "",
        role: str,
        queues: object = None,
        expires_at: float | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key: (its text, shown once; the stored record)."""
        text, key = await self._mint(name, role, queues=parse_queues(queues), expires_at=expires_at)
        await self._create(key, actor_of(actor), {"name": key.name, "role": key.role})
        return text, key

    async def _mint(self, name: str, role: str, **fields: Any) -> tuple[str, ApiKey]:
        """``new_key`` (scrypt, ~60 ms) in a thread, so the broker keeps serving."""
        now = self.clock()
        return await trio.to_thread.run_sync(
            lambda: new_key(name, role, now=now, **fields), limiter=self._scrypt
        )

    async def _create(self, key: ApiKey, actor: str, detail: dict[str, Any]) -> None:
        await self.store.create_key(key)
        self._remember(key)
        await self.record(actor, "key.create", key.id, detail)

    async def revoke_key(self, actor: Principal | None, key_id: str) -> ApiKey:
        key = await self.store.revoke_key(key_id, self.clock())
        self._remember(key)
        await self.record(actor_of(actor), "key.revoke", key_id, {"name": key.name})
        log.info("API key %s (%s) revoked by %s", key_id, key.name, actor_of(actor))
        return key

    async def list_keys(self) -> list[ApiKey]:
        keys = await self.store.list_keys()
        for key in keys:
            self._remember(key)
        return keys

    async def request(self, principal: Principal | None, msg: dict[str, Any]) -> dict[str, Any]:
        """A ``keys`` request: op create / list / revoke (the role was checked already)."""
        op, now = msg.get("op"), self.clock()
        if op == "create":
            expires = msg.get("expires_at")
            if expires is not None:  # epoch seconds: finite, after 1970, before year 10000
                expires = number(expires, "keys create: expires_at", hi=MAX_EPOCH)
            text, key = await self.create_key(
                principal,
                name=_text(msg.get("name"), "name"),
                role=msg.get("role"),  # type: ignore[arg-type]  # parse_role checks it
                queues=msg.get("queues"),
                expires_at=expires,
            )
            return {"key": text, "info": key.to_public(now)}
        if op == "list":
            return {"keys": [key.to_public(now) for key in await self.list_keys()]}
        if op == "revoke":
            key_id = msg.get("key_id")
            if not isinstance(key_id, str) or not key_id:
                raise InvalidRequest("keys revoke needs 'key_id' (the public id of the key)")
            return {"info": (await self.revoke_key(principal, key_id)).to_public(now)}
        raise InvalidRequest(f"unknown keys op {op!r}; known: create, list, revoke")

    # -- audit ------------------------------------------------------------------
    async def record(
        self, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Append to the audit log; a failure is logged, never raised (the act is done)."""
        entry = AuditEntry(self.clock(), actor, action, target, detail or {})
        try:
            await self.store.record_audit(entry)
        except TQError as exc:
            log.error("cannot record audit entry %s %s by %s: %s", action, target, actor, exc)

    async def audit_page(self, msg: dict[str, Any]) -> dict[str, Any]:
        """An ``audit`` request: newest first, ``limit`` and a ``before`` cursor."""
        limit, before = msg.get("limit", 100), msg.get("before")
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_AUDIT_PAGE
        ):
            raise InvalidRequest(f"audit limit must be 1..{MAX_AUDIT_PAGE}")
        if before is not None and (
            isinstance(before, bool) or not isinstance(before, int) or not 0 <= before <= MAX_SEQ
        ):
            raise InvalidRequest("audit before must be an entry's seq (integer)")
        entries = await self.store.list_audit(limit, before)
        cursor = entries[-1].seq if len(entries) == limit else None
        return {"entries": [e.to_dict() for e in entries], "next": cursor}


def _text(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"keys create: {what} must be a string")
    return value


async def open_auth(store: Store, settings: Settings) -> tuple[Auth, bool]:
    """The broker's Auth with its key table loaded; True if an admin key was just created."""
    auth = Auth(
        store,
        enabled=settings.auth,
        submit_rate=settings.submit_rate,
        submit_burst=settings.submit_burst,
    )
    await auth.load()
    created = await auth.bootstrap_admin(settings.admin_key_file) is not None
    return auth, created


async def broker_join_token(
    auth: Auth, settings: Settings, port: int, ca_file: Path | None
) -> str | None:
    """The join token a broker prints at start (None without auth or TLS)."""
    if not auth.enabled or ca_file is None:
        return None
    key = await auth.join_key(settings.join_key_file)
    if key is None:
        return None
    host = parse_address(settings.listen)[0]
    addresses = advertised_addresses(host, port, settings.tls_san)
    return encode_join_token(addresses, ca_file.read_bytes(), key)
