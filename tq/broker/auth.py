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
broker sharing the store.

Logins: a secret is checked with a keyed SHA-256 hash and a constant-time
compare (``tq.security.keys``): microseconds, inline, no queue, so nothing
a failed attempt does can hold up another login. Every refusal of a
well-formed key (unknown key id, wrong secret) looks the same: one message,
and it is answered no sooner than ``FAIL_DELAY`` after it arrived, after a
reload of the key table that started after it arrived (shared by every
refusal in flight, at most one per ``RELOAD_SPACING``): so a key created a
moment ago offline still gets in, an unknown id costs what a wrong secret
costs (a dummy verification), and guessing is slow without holding anything
anyone else waits for. A revoked or expired key is named as such only to
whoever presents its secret.

Keys made by older brokers are hashed with scrypt (~60 ms). Such a key is
verified in a thread, one at a time per key id and ``LEGACY_THREADS`` at
once across key ids (first come, first served: a waiting login is behind at
most one attempt per other legacy key id, however many attempts there are),
and rehashed in the store the first time it is verified; from then on it is
an ordinary key. Only legacy keys that have not logged in since the upgrade
take this path; ``open_auth`` upgrades the broker's own ``admin.key`` at
start. A login never waits longer than ``login_timeout``.

With ``enabled`` False (``--no-auth``) every request is allowed and
principals are None.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from tq.config import BrokerSettings, parse_address
from tq.core.auth import ApiKey, AuditEntry
from tq.core.errors import RateLimited, Timeout, TQError, Unauthorized
from tq.core.limits import DEFAULT_AUDIT_PAGE
from tq.protocol import answers
from tq.protocol.answers import (
    AuditAnswer,
    KeyCreatedAnswer,
    KeyInfo,
    KeyListAnswer,
    KeyRevokedAnswer,
)
from tq.protocol.schema import Audit, Keys, check_op, check_required
from tq.security.keys import (
    is_legacy,
    new_key,
    parse_key,
    read_key_file,
    rehash,
    verify_dummy,
    verify_secret,
)
from tq.security.limits import RateLimiter
from tq.security.roles import Principal
from tq.security.tls import write_private
from tq.security.tokens import advertised_addresses, encode_join_token
from tq.store.base import Store

log = logging.getLogger("tq.broker.auth")

KEY_REFRESH = 5.0  # seconds between reloads of the key table from the store
FAIL_DELAY = 0.5  # seconds: no refused login is answered sooner (unknown id, wrong secret)
RELOAD_SPACING = 0.5  # seconds between reloads of the key table asked for by refused logins
LEGACY_THREADS = 1  # scrypt verifications of keys made by older brokers, at once
LOGIN_TIMEOUT = 10.0  # seconds a login may take at most (a wire hello: its own deadline)
RATE_LOG_EVERY = 10.0  # seconds: a flood of rate-limited submissions logs one line per key


def actor_of(principal: Principal | None) -> str:
    return "anonymous" if principal is None else principal.key_id


def history_actor(principal: Principal | None) -> str:
    """Who made a change, as the task history records it."""
    return "anonymous" if principal is None else f"key:{principal.key_id}"


class Auth:
    def __init__(
        self,
        store: Store,
        *,
        enabled: bool = True,
        submit_rate: float = 0.0,
        submit_burst: float = 1.0,
        clock: Callable[[], float] = time.time,
        login_timeout: float = LOGIN_TIMEOUT,
    ) -> None:
        self.store = store
        self.enabled = enabled
        self.clock = clock
        self.login_timeout = login_timeout
        self.limiter = RateLimiter(submit_rate, submit_burst)
        self._keys: dict[str, ApiKey] = {}
        self._legacy = trio.CapacityLimiter(LEGACY_THREADS)  # scrypt threads across key ids
        self._legacy_locks: dict[str, trio.Lock] = {}  # key id -> one scrypt at a time
        self._reloading: trio.Event | None = None  # set when the running reload finishes
        self._reload_started = -math.inf  # trio time the last on-demand reload started
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
            self.limiter.forget(key.id)

    async def _reload_since(self, arrived: float) -> None:
        """Return once a reload of the key table that started at or after ``arrived``
        has finished. One reload serves every caller waiting for it, and on-demand
        reloads start at most once per ``RELOAD_SPACING``."""
        while True:
            running = self._reloading
            if running is None and self._reload_started >= arrived:
                return
            if running is not None:
                started = self._reload_started
                await running.wait()
                if started >= arrived:
                    return
                continue
            due = self._reload_started + RELOAD_SPACING
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            done = self._reloading = trio.Event()
            self._reload_started = trio.current_time()
            try:
                await self.load()
            except TQError as exc:
                log.error("cannot reload the API keys (the last known table stays): %s", exc)
            finally:
                self._reloading = None
                done.set()
            return

    async def bootstrap_admin(self, path: Path) -> str | None:
        """On a store with no keys: create an admin key, write it to ``path`` (0600)."""
        if not self.enabled or self._keys:
            return None
        text, key = await self._mint("admin (first start)", "admin")
        await self._create(key, "broker", {"bootstrap": True})
        await trio.to_thread.run_sync(write_private, path, (text + "\n").encode())
        log.info("created admin key %s and wrote it to %s (mode 0600)", key.id, path)
        return text

    async def upgrade_key_file(self, path: Path) -> None:
        """Rehash now the key in ``path`` if an older broker made it (see the docstring)."""
        if not self.enabled:
            return
        try:
            text = read_key_file(path)
            key_id, secret = parse_key(text)
        except TQError:
            return
        key = self._keys.get(key_id)
        if key is not None and is_legacy(key) and key.state(self.clock()) == "active":
            await self._verify_legacy(secret, key)

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
        """The principal a key string stands for; Unauthorized if it stands for none.

        Timeout if verifying takes longer than ``login_timeout`` (only a key made
        by an older broker can make it wait, see the module docstring).
        """
        if not self.enabled:
            return None
        arrived = trio.current_time()
        key_id, secret = parse_key(text)
        with trio.move_on_after(self.login_timeout):
            principal = await self._verify(key_id, secret)
            if principal is not None:
                return principal
            return await self._refuse(key_id, secret, arrived)
        raise Timeout(f"verifying API key {key_id} took longer than {self.login_timeout:g}s; retry")

    async def _verify(self, key_id: str, secret: str) -> Principal | None:
        """The principal if ``secret`` is ``key_id``'s; None for an unknown id or a wrong
        secret (the same work either way); Unauthorized if the key is revoked or expired."""
        key = self._keys.get(key_id)
        if key is None:
            verify_dummy(secret)
            return None
        if is_legacy(key):
            if key.state(self.clock()) != "active":
                return None  # no scrypt for a dead key
            ok = await self._verify_legacy(secret, key)
        else:
            ok = verify_secret(secret, key)
        if not ok:
            return None
        self._check_state(key)  # told only to whoever holds the secret
        return Principal.of(key)

    async def _refuse(self, key_id: str, secret: str, arrived: float) -> Principal:
        """A refused login: answered ``FAIL_DELAY`` after it arrived, after a fresh look
        at the key table (a key created offline a moment ago gets in)."""
        before = self._keys.get(key_id)
        await trio.sleep_until(arrived + FAIL_DELAY)
        await self._reload_since(arrived)
        after = self._keys.get(key_id)
        if after is not None and after != before:
            principal = await self._verify(key_id, secret)
            if principal is not None:
                return principal
        raise Unauthorized(
            f"API key {key_id} was refused: there is no such key, or the secret is wrong; "
            "check the whole key, or ask an admin for one"
        )

    async def _verify_legacy(self, secret: str, key: ApiKey) -> bool:
        """scrypt for a key made by an older broker; rehash it in the store on success."""
        lock = self._legacy_locks.setdefault(key.id, trio.Lock())
        try:
            async with lock:
                current = self._keys.get(key.id, key)
                if not is_legacy(current):  # upgraded by a login that held the lock before
                    return verify_secret(secret, current)
                ok = await trio.to_thread.run_sync(
                    verify_secret, secret, current, limiter=self._legacy
                )
                if ok:
                    await self._upgrade(secret, current)
                return ok
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._legacy_locks.pop(key.id, None)

    async def _upgrade(self, secret: str, key: ApiKey) -> None:
        """Replace a verified legacy hash by the current kind, in the store and the table."""
        fresh = rehash(secret, key)
        try:
            if await self.store.rehash_key(fresh, key.kdf):
                self._keys[key.id] = dataclasses.replace(
                    self._keys.get(key.id, key), kdf=fresh.kdf, salt=fresh.salt, hash=fresh.hash
                )
                log.info("API key %s rehashed (scrypt -> %s)", key.id, fresh.kdf)
        except TQError as exc:
            log.error("cannot rehash API key %s (it keeps working): %s", key.id, exc)

    def is_active(self, key_id: str) -> bool:
        """Whether ``key_id`` names a key that is neither revoked nor expired."""
        key = self._keys.get(key_id)
        return key is not None and key.state(self.clock()) == "active"

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
        """Unauthorized for a revoked or expired key; called only once its secret is known
        to be right, so its state (and name) reach only the key's holder."""
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
        queues: Sequence[str] | None = None,
        expires_at: float | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key: (its text, shown once; the stored record). ``new_key`` checks the
        fields a plain caller may get wrong (the wire's declaration guarantees them), and
        reads ``queues`` as ``parse_queues`` does (a comma-separated string too)."""
        text, key = await self._mint(name, role, queues=queues, expires_at=expires_at)
        await self._create(key, actor_of(actor), {"name": key.name, "role": key.role})
        return text, key

    async def _mint(self, name: str, role: str, **fields: Any) -> tuple[str, ApiKey]:
        return new_key(name, role, now=self.clock(), **fields)

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

    async def request(
        self, principal: Principal | None, msg: Keys
    ) -> KeyCreatedAnswer | KeyListAnswer | KeyRevokedAnswer:
        """A ``keys`` request: op create / list / revoke (the role was checked already;
        the fields' types and ranges are the declaration's, tq/protocol/schema.py)."""
        op, now = check_op(msg), self.clock()
        check_required(msg)
        if op == "create":
            assert msg.role is not None  # required for create
            text, key = await self.create_key(
                principal,
                name=msg.name or "",
                role=msg.role,
                queues=msg.queues,
                expires_at=msg.expires_at,
            )
            return KeyCreatedAnswer(id=msg.id, key=text, info=key_info(key, now))
        if op == "list":
            keys = [key_info(key, now) for key in await self.list_keys()]
            return KeyListAnswer(id=msg.id, keys=keys)
        assert msg.key_id is not None  # revoke: required
        revoked = await self.revoke_key(principal, msg.key_id)
        return KeyRevokedAnswer(id=msg.id, info=key_info(revoked, now))

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

    async def audit_page(self, msg: Audit) -> AuditAnswer:
        """An ``audit`` request: newest first, ``limit`` and a ``before`` cursor (their
        types and ranges are the declaration's, tq/protocol/schema.py)."""
        limit = DEFAULT_AUDIT_PAGE if msg.limit is None else msg.limit  # nil equals absent
        before = msg.before
        entries = await self.store.list_audit(limit, before)
        cursor = entries[-1].seq if len(entries) == limit else None
        return AuditAnswer(id=msg.id, entries=[audit_entry(e) for e in entries], next=cursor)


def key_info(key: ApiKey, now: float) -> KeyInfo:
    """What an operator may see of a key: no salt, no hash."""
    return KeyInfo(
        id=key.id,
        name=key.name,
        role=key.role,
        queues=None if key.queues is None else list(key.queues),
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        state=key.state(now),
    )


def audit_entry(entry: AuditEntry) -> answers.AuditEntry:
    """An audit log entry as its answer map."""
    return answers.AuditEntry(
        seq=entry.seq,
        at=entry.at,
        actor=entry.actor,
        action=entry.action,
        target=entry.target,
        detail=dict(entry.detail),
    )


async def open_auth(store: Store, settings: BrokerSettings) -> tuple[Auth, bool]:
    """The broker's Auth with its key table loaded; True if an admin key was just created."""
    auth = Auth(
        store,
        enabled=settings.auth,
        submit_rate=settings.submit_rate,
        submit_burst=settings.submit_burst,
        login_timeout=settings.hello_timeout,
    )
    await auth.load()
    created = await auth.bootstrap_admin(settings.admin_key_file) is not None
    if not created:
        await auth.upgrade_key_file(settings.admin_key_file)
    return auth, created


async def broker_join_token(
    auth: Auth, settings: BrokerSettings, port: int, ca_file: Path | None
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
