"""TLS for the broker wire: a private CA, certificates and ssl contexts.

Contract: turns files in the broker's TLS directory into ``ssl.SSLContext``
objects and operator-readable messages. It creates the CA and the broker's
server certificate on first start, issues client certificates for mutual
TLS, computes fingerprints and explains handshake failures in one line.
Blocking file I/O only, no networking and no event loop: callers hand the
contexts to trio themselves. Errors leave as tq.core.errors.ConfigError
(broker side, files) or TLSFailure (client side).
May import: the standard library (ssl, ipaddress, ...), cryptography,
tq.core. Not trio.
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
