"""Join tokens: everything a worker (or client) on another machine needs, in one string.

    text = encode_join_token(["queue.example.com:7470"], ca_pem, key)
    token = decode_join_token(text)   # JoinToken(addresses, ca_pem, key)

Format: ``tqj1_`` + unpadded base64url of a msgpack map
``{"a": [address, ...], "ca": <CA certificate, DER>, "k": <API key>}``.
Several addresses are several brokers of one cluster (same CA), tried in turn
(tq.client.failover). Every token made so far stays valid: the format has held
a list from the start; an entry that itself lists brokers ("b1:7470,b2:7470")
counts as those brokers.

What the token pins: it carries the broker's CA *certificate* (~400 bytes
of DER), not only its fingerprint. The client trusts exactly that CA and
verifies the broker's certificate chain and host name against it as usual,
so a broker with any other CA is refused during the TLS handshake, and the
broker can re-issue its server certificate (renewal, new ``--tls-san``)
without invalidating tokens. (Pinning a fingerprint instead would have to
pin the *server* certificate: Python 3.11 cannot read the peer's chain to
compare a CA fingerprint, see ``tls.client_ssl_context``.) The CA
fingerprint operators compare is ``JoinToken.ca_fingerprint``; ``tq token
inspect`` prints it. A token holds a live API key: treat it as a secret.
"""

from __future__ import annotations

import base64
import binascii
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from tq.core.errors import ConfigError, TQError
from tq.security.keys import key_id_of, parse_key
from tq.security.tls import fingerprint_der

PREFIX = "tqj1_"
_HINT = "copy the whole token the broker (or `tq token create`) printed"


@dataclass(frozen=True)
class JoinToken:
    addresses: tuple[str, ...]
    ca_der: bytes
    key: str

    @property
    def ca_pem(self) -> str:
        return ssl.DER_cert_to_PEM_cert(self.ca_der)

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint_der(self.ca_der)

    @property
    def key_id(self) -> str:
        return key_id_of(self.key)

    @property
    def broker(self) -> str:
        """The addresses as one comma-separated broker setting (tried in order)."""
        return ",".join(self.addresses)


def _brokers(addresses: Sequence[str]) -> list[str]:
    """Each entry split at commas and checked (ConfigError naming the bad one)."""
    from tq.client.failover import parse_brokers

    return list(dict.fromkeys(a for entry in addresses for a in parse_brokers(entry)))


def encode_join_token(addresses: Sequence[str], ca_pem: str | bytes, key: str) -> str:
    if not addresses:
        raise ConfigError("a join token needs at least one broker address")
    addresses = _brokers(addresses)
    parse_key(key)
    from cryptography import x509  # the broker and admin commands only: ~50 ms to import
    from cryptography.hazmat.primitives import serialization

    data = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    try:
        der = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise ConfigError(f"the CA for a join token is not a PEM certificate ({exc})") from None
    body = msgpack.packb({"a": list(addresses), "ca": der, "k": key}, use_bin_type=True)
    return PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_join_token(text: str) -> JoinToken:
    """The token's contents; ConfigError naming what is wrong with it."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise ConfigError(f"that is not a tq join token (it should start with {PREFIX}); {_HINT}")
    raw = text[len(PREFIX) :]
    try:
        body = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        fields = msgpack.unpackb(body, raw=False)
    except (binascii.Error, ValueError, msgpack.UnpackException):
        raise ConfigError(
            f"the join token is damaged (not valid base64/msgpack); {_HINT}"
        ) from None
    if not isinstance(fields, dict):
        raise ConfigError(f"the join token is damaged; {_HINT}")
    addresses, der, key = fields.get("a"), fields.get("ca"), fields.get("k")
    if (
        not isinstance(addresses, list)
        or not addresses
        or not all(isinstance(a, str) and a for a in addresses)
        or not isinstance(der, bytes)
        or not isinstance(key, str)
    ):
        raise ConfigError(f"the join token lacks its addresses, CA or key; {_HINT}")
    try:
        addresses = _brokers(addresses)
    except ConfigError as exc:
        raise ConfigError(f"the join token's broker addresses are damaged ({exc})") from None
    try:
        # OpenSSL parses the CA (the standard library's ssl: no cryptography on the client path)
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
        parse_key(key)
    except ssl.SSLError as exc:
        raise ConfigError(f"the join token's CA is damaged ({exc.reason}); {_HINT}") from None
    except (ValueError, TQError) as exc:
        raise ConfigError(f"the join token's CA or key is damaged ({exc}); {_HINT}") from None
    return JoinToken(tuple(addresses), der, key)


def advertised_addresses(host: str, port: int, names: Sequence[str] = ()) -> list[str]:
    """Where workers on other machines can reach a broker listening on ``host:port``.

    A wildcard listen address (0.0.0.0, ::) is not reachable as such: the
    broker's certificate names (``--tls-san``) and its host name stand in.
    """
    wildcard = host in ("", "0.0.0.0", "::", "*")
    hosts = [*names, socket.gethostname()] if wildcard else [host, *names]
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in dict.fromkeys(hosts) if h]
