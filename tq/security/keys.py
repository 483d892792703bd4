"""API key strings: make them, parse them, hash and verify their secrets.

    text, record = new_key("ci", "producer", queues=("emails",), now=time.time())
    # show ``text`` once; store ``record`` (it holds only a hash of the secret)
    key_id, secret = parse_key(text)
    verify_secret(secret, record)   # True / False, a microsecond, constant-time
    verify_dummy(secret)            # the same work for a key id nobody knows

Format: ``tq_<key id>_<secret>``: the key id is 12 lowercase hex digits
(public: it names the key everywhere), the secret 32 random bytes in
unpadded base64url (43 characters). Only ``HMAC-SHA256(salt, secret)`` is
kept (``KDF`` "hmac-sha256"), so the stored table cannot be used to log in:
finding a secret that matches a stored hash means searching 2^256
possibilities, which no slow hash would make harder. A slow password hash
would only make every login expensive, and let wrong secrets queue in front
of right ones. Keys made by older brokers carry a salted scrypt hash
(``LEGACY_KDF``); ``is_legacy`` says so, ``verify_secret`` still checks
them (~60 ms: callers run it in a thread) and ``rehash`` gives the new-style
record to store once such a key has been verified.
Pure: no I/O beyond ``secrets``; time is an argument.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from pathlib import Path

from tq.core.auth import ApiKey, parse_queues, parse_role
from tq.core.errors import ConfigError, InvalidRequest, Unauthorized

PREFIX = "tq"
KEY_ID_BYTES = 6
SECRET_BYTES = 32
SALT_BYTES = 16
MAX_SECRET = 128  # characters; tq's own secrets have 43
KDF = "hmac-sha256"  # HMAC-SHA256 keyed with the salt, of the secret
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # keys made by older brokers: ~60 ms each
SCRYPT_LEN = 32
LEGACY_KDF = f"scrypt:n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}"
_MAXMEM = 64 * 1024 * 1024
_DUMMY_SALT = secrets.token_bytes(SALT_BYTES)  # verify_dummy: same work, never a match
_DUMMY_HASH = secrets.token_bytes(32)


def new_key(
    name: str,
    role: str,
    *,
    now: float,
    queues: Sequence[str] | None = None,
    expires_at: float | None = None,
) -> tuple[str, ApiKey]:
    """A fresh key: (the full key text to show once, the record to store); ``queues``
    as ``parse_queues`` reads them."""
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
        or len(parts[2]) > MAX_SECRET
    ):
        raise Unauthorized("that is not a tq API key (expected tq_<key id>_<secret>)")
    return parts[1], parts[2]


def key_id_of(text: str) -> str:
    """The public part of a key string (safe to log)."""
    return parse_key(text)[0]


def hash_secret(secret: str, salt: bytes, kdf: str = KDF) -> bytes:
    if kdf == KDF:
        return hmac.new(salt, secret.encode(), hashlib.sha256).digest()
    if kdf == LEGACY_KDF:
        return hashlib.scrypt(
            secret.encode(),
            salt=salt,
            n=SCRYPT_N,
            r=SCRYPT_R,
            p=SCRYPT_P,
            maxmem=_MAXMEM,
            dklen=SCRYPT_LEN,
        )
    raise Unauthorized(f"key hashed with an unknown method {kdf!r}; create a new key")


def is_legacy(record: ApiKey) -> bool:
    """True for a key hashed with scrypt by an older broker (slow to verify)."""
    return record.kdf == LEGACY_KDF


def verify_secret(secret: str, record: ApiKey) -> bool:
    """Whether ``secret`` is the one ``record`` was made from (constant-time compare)."""
    return hmac.compare_digest(hash_secret(secret, record.salt, record.kdf), record.hash)


def verify_dummy(secret: str) -> bool:
    """The work of ``verify_secret`` for a key id that matches no key: always False."""
    hmac.compare_digest(hash_secret(secret, _DUMMY_SALT), _DUMMY_HASH)
    return False


def rehash(secret: str, record: ApiKey) -> ApiKey:
    """``record`` with a fresh salt and the current hash of ``secret`` (already verified)."""
    salt = secrets.token_bytes(SALT_BYTES)
    return dataclasses.replace(record, kdf=KDF, salt=salt, hash=hash_secret(secret, salt))


def read_key_file(path: Path) -> str | None:
    """The key stored in ``path`` (e.g. ``<data>/admin.key``), or None if there is none."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    return text or None
