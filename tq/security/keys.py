"""API key strings: make them, parse them, hash and verify their secrets.

    text, record = new_key("ci", "producer", queues=("emails",), now=time.time())
    # show ``text`` once; store ``record`` (it holds only a salted scrypt hash)
    key_id, secret = parse_key(text)
    verify_secret(secret, record)   # True / False, ~60 ms of scrypt

Format: ``tq_<key id>_<secret>``: the key id is 12 lowercase hex digits
(public: it names the key everywhere), the secret 32 random bytes in
unpadded base64url (43 characters). Only ``scrypt(secret, salt)`` is kept,
so the stored table cannot be used to log in. The secret already carries
256 bits of entropy; the slow hash is defence in depth for a stolen
database. Verification is deliberately expensive, so the broker caches
successful verifications (``tq.broker.auth``) and runs scrypt in a thread.
Pure: no I/O beyond ``secrets``; time is an argument.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from tq.core.auth import ApiKey, parse_queues, parse_role
from tq.core.errors import ConfigError, InvalidRequest, Unauthorized

PREFIX = "tq"
KEY_ID_BYTES = 6
SECRET_BYTES = 32
SALT_BYTES = 16
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~16 MiB, ~60 ms on a small VM
SCRYPT_LEN = 32
KDF = f"scrypt:n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}"
_MAXMEM = 64 * 1024 * 1024


def new_key(
    name: str,
    role: str,
    *,
    now: float,
    queues: tuple[str, ...] | None = None,
    expires_at: float | None = None,
) -> tuple[str, ApiKey]:
    """A fresh key: (the full key text to show once, the record to store)."""
    role = parse_role(role)
    queues = parse_queues(queues)
    if not isinstance(name, str) or len(name) > 200:
        raise InvalidRequest("key name must be a string of at most 200 characters")
    if expires_at is not None and expires_at <= now:
        raise InvalidRequest("a key's expiry must be in the future")
    key_id = secrets.token_hex(KEY_ID_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    salt = secrets.token_bytes(SALT_BYTES)
    record = ApiKey(
        id=key_id,
        name=name or key_id,
        role=role,
        queues=queues,
        created_at=now,
        expires_at=expires_at,
        revoked_at=None,
        kdf=KDF,
        salt=salt,
        hash=hash_secret(secret, salt, KDF),
    )
    return f"{PREFIX}_{key_id}_{secret}", record


def parse_key(text: object) -> tuple[str, str]:
    """(key id, secret) of a key string; Unauthorized if it is not one."""
    if not isinstance(text, str) or not text:
        raise Unauthorized(
            "this broker requires an API key: pass --key (or set TQ_KEY); an admin creates "
            "one with `tq keys create`"
        )
    parts = text.strip().split("_", 2)
    if (
        len(parts) != 3
        or parts[0] != PREFIX
        or len(parts[1]) != 2 * KEY_ID_BYTES
        or not all(c in "0123456789abcdef" for c in parts[1])
        or not parts[2]
    ):
        raise Unauthorized("that is not a tq API key (expected tq_<key id>_<secret>)")
    return parts[1], parts[2]


def key_id_of(text: str) -> str:
    """The public part of a key string (safe to log)."""
    return parse_key(text)[0]


def hash_secret(secret: str, salt: bytes, kdf: str = KDF) -> bytes:
    if kdf != KDF:
        raise Unauthorized(f"key hashed with an unknown method {kdf!r}; create a new key")
    return hashlib.scrypt(
        secret.encode(),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_MAXMEM,
        dklen=SCRYPT_LEN,
    )


def verify_secret(secret: str, record: ApiKey) -> bool:
    """Whether ``secret`` is the one ``record`` was made from (constant-time compare)."""
    return hmac.compare_digest(hash_secret(secret, record.salt, record.kdf), record.hash)


def fast_digest(secret: str, record: ApiKey) -> bytes:
    """A cheap keyed digest for caching a successful verification in memory.

    Keyed with the stored hash, so a cache entry is useless if the key is
    re-created, and never equal to anything stored.
    """
    return hmac.new(record.hash, secret.encode(), hashlib.sha256).digest()


def read_key_file(path: Path) -> str | None:
    """The key stored in ``path`` (e.g. ``<data>/admin.key``), or None if there is none."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    return text or None
