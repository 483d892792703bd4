"""How both clients reach a broker: addresses, TLS context, credentials.

Shared by ``Client`` (trio) and ``BlockingClient`` (sockets):

* ``address`` may list several brokers, comma-separated
  (``"b1:7470,b2:7470"``): they are tried in order until one accepts the
  TCP connection (a join token lists its addresses that way).
* ``tls_context`` builds the client side of TLS: the broker's CA (a file,
  or PEM text from a join token), optionally a client certificate.
* ``settings_options`` turns ``ConnectionSettings`` into connect arguments; a join
  token (``--join``) supplies the addresses, the CA and the key at once.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from tq.client import _api as api
from tq.client.failover import parse_brokers
from tq.config import ConnectionSettings
from tq.security.tls import client_ssl_context
from tq.security.tokens import decode_join_token

JOIN_CA = "the CA in the join token"


def split_addresses(address: str) -> list[str]:
    """The brokers of ``address`` (tq.client.failover.parse_brokers: checked one by one)."""
    return list(parse_brokers(address))


def tls_context(
    address: str,
    *,
    ca: Path | None,
    insecure: bool,
    ca_data: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext | None:
    """The client TLS context, or None for plaintext (``insecure``)."""
    if insecure:
        return None
    if ca is None and ca_data is None:
        raise api.missing_ca(address)
    return client_ssl_context(ca, ca_data=ca_data, client_cert=client_cert, client_key=client_key)


def ca_name(ca: Path | None, ca_data: str | None) -> Path | str | None:
    """What to call the trusted CA in error messages."""
    return JOIN_CA if ca_data is not None else ca


def with_key(hello: dict[str, Any] | None, key: str | None) -> dict[str, Any]:
    """The extra hello fields, with the API key if there is one."""
    extra = dict(hello or {})
    if key:
        extra.setdefault("key", key)
    return extra


def settings_options(settings: ConnectionSettings) -> dict[str, Any]:
    """``connect`` arguments from settings: address, TLS, key (or all three from --join)."""
    options: dict[str, Any] = {
        "address": settings.broker,
        "ca": settings.ca_file(),
        "insecure": settings.insecure,
        "max_frame": settings.max_frame,
        "client_cert": settings.client_cert,
        "client_key": settings.client_key,
    }
    if settings.join:
        token = decode_join_token(settings.join)
        options.update(
            address=token.broker,
            ca=None,
            ca_data=token.ca_pem,
            insecure=False,
            key=settings.key or token.key,
        )
    else:
        options["key"] = settings.api_key()
    return options
