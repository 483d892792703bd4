"""Security building blocks: TLS, API keys, roles, rate limits, join tokens.

Contract: pure pieces the broker, clients and CLI assemble (docs/SECURITY.md).

* ``tls``: turns files in the broker's TLS directory into ``ssl.SSLContext``
  objects and operator-readable messages. It creates the CA and the broker's
  server certificate on first start, issues client certificates for mutual
  TLS, computes fingerprints and explains handshake failures in one line.
* ``keys``: the ``tq_<id>_<secret>`` key format; salted HMAC-SHA256 hashes.
* ``roles``: the one table of which role may make which request; ``Principal``.
* ``limits``: token buckets (time is an argument).
* ``tokens``: join tokens (addresses + CA certificate + key in one string).

Blocking file I/O only, no networking and no event loop: callers hand the
contexts to trio themselves (the broker's use of keys is tq/broker/auth.py).
Errors leave as tq.core.errors.ConfigError (files), TLSFailure (client side),
Unauthorized / Forbidden / RateLimited (keys, roles, limits).
May import: the standard library (ssl, hashlib, ...), cryptography, msgpack,
tq.core. Not trio, not the store.
"""

from tq.security.tls import (
    TLSFiles,
    cert_not_after,
    client_ssl_context,
    describe_tls_error,
    ensure_broker_tls,
    fingerprint,
    fingerprint_der,
    issue_client_cert,
    server_ssl_context,
)

__all__ = [
    "TLSFiles",
    "cert_not_after",
    "client_ssl_context",
    "describe_tls_error",
    "ensure_broker_tls",
    "fingerprint",
    "fingerprint_der",
    "issue_client_cert",
    "server_ssl_context",
]
