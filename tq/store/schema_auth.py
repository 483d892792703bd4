"""The SQL of the security tables (migration 2): API keys and the audit log.

Same rules as ``tq.store.schema`` (whose migrations create these tables):
constant statement texts, plain synchronous operations of one APSW
connection (writes inside the writer's transaction, reads on the reader),
cursors always exhausted. A key row never holds a usable secret: only the
salt and the hash computed by ``tq.security.keys`` (``kdf`` names the
method). Rows of keys made by older brokers hold a scrypt hash; the broker
replaces it (``rehash_key``) the first time such a key logs in, so no
migration can or needs to touch the hashes: only the secret's holder can.
"""

from __future__ import annotations

import json
from typing import Any

import apsw
import msgpack

from tq.core.auth import ApiKey, AuditEntry
from tq.core.errors import InvalidRequest, NotFound

MAX_AUDIT_LIMIT = 10_000

KEY_COLUMNS = "id, name, role, queues, created_at, expires_at, revoked_at, kdf, salt, hash"
INSERT_KEY = f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
GET_KEY = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"
LIST_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
REVOKE_KEY = (
    f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ? RETURNING {KEY_COLUMNS}"
)
REHASH_KEY = "UPDATE api_keys SET kdf = ?, salt = ?, hash = ? WHERE id = ? AND kdf = ?"
INSERT_AUDIT = "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)"
AUDIT_COLUMNS = "seq, at, actor, action, target, detail"
LIST_AUDIT = f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ?"
LIST_AUDIT_BEFORE = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT ?"


def _row_to_key(row: tuple[Any, ...]) -> ApiKey:
    queues = None if row[3] is None else tuple(json.loads(row[3]))
    return ApiKey(
        id=row[0],
        name=row[1],
        role=row[2],
        queues=queues,
        created_at=row[4],
        expires_at=row[5],
        revoked_at=row[6],
        kdf=row[7],
        salt=bytes(row[8]),
        hash=bytes(row[9]),
    )


def _row_to_entry(row: tuple[Any, ...]) -> AuditEntry:
    detail = {} if row[5] is None else msgpack.unpackb(row[5], raw=False, strict_map_key=False)
    return AuditEntry(
        seq=row[0], at=row[1], actor=row[2], action=row[3], target=row[4], detail=detail
    )


def create_key(conn: apsw.Connection, key: ApiKey) -> None:
    queues = None if key.queues is None else json.dumps(list(key.queues))
    conn.execute(
        INSERT_KEY,
        (
            key.id,
            key.name,
            key.role,
            queues,
            key.created_at,
            key.expires_at,
            key.revoked_at,
            key.kdf,
            key.salt,
            key.hash,
        ),
    ).fetchall()


def get_key(conn: apsw.Connection, key_id: str) -> ApiKey:
    rows = conn.execute(GET_KEY, (key_id,)).fetchall()
    if not rows:
        raise NotFound(f"no API key with id {key_id}")
    return _row_to_key(rows[0])


def list_keys(conn: apsw.Connection) -> list[ApiKey]:
    return [_row_to_key(row) for row in conn.execute(LIST_KEYS).fetchall()]


def revoke_key(conn: apsw.Connection, key_id: str, now: float) -> ApiKey:
    """Revoke a key (a second revocation keeps the first time); NotFound if unknown."""
    rows = conn.execute(REVOKE_KEY, (now, key_id)).fetchall()
    if not rows:
        raise NotFound(f"no API key with id {key_id}")
    return _row_to_key(rows[0])


def rehash_key(conn: apsw.Connection, key: ApiKey, old_kdf: str) -> bool:
    """Store ``key``'s new hash if the row still has one made with ``old_kdf``."""
    conn.execute(REHASH_KEY, (key.kdf, key.salt, key.hash, key.id, old_kdf)).fetchall()
    return conn.changes() > 0


def record_audit(conn: apsw.Connection, entry: AuditEntry) -> int:
    detail = msgpack.packb(entry.detail, use_bin_type=True) if entry.detail else None
    conn.execute(
        INSERT_AUDIT, (entry.at, entry.actor, entry.action, entry.target, detail)
    ).fetchall()
    return int(conn.last_insert_rowid())


def list_audit(conn: apsw.Connection, limit: int, before: int | None) -> list[AuditEntry]:
    """Newest first: at most ``limit`` entries with ``seq < before`` (all if None)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise InvalidRequest(f"audit limit must be 1..{MAX_AUDIT_LIMIT}")
    if before is None:
        rows = conn.execute(LIST_AUDIT, (limit,)).fetchall()
    else:
        rows = conn.execute(LIST_AUDIT_BEFORE, (before, limit)).fetchall()
    return [_row_to_entry(row) for row in rows]
