"""The broker's private CA, its certificates, and the ssl contexts built from them.

The TLS directory (created 0700 on the broker's first start) holds::

    ca.pem  ca.key           the CA clients trust (10 years): hand ca.pem to clients
    server.pem  server.key   the broker's certificate (825 days), signed by the CA

Keys are written 0600 and certificates 0644, each through a temporary file
created with its final mode and renamed into place, so a key is never
world-readable and a crash never leaves half a file.

Clients use only the standard library's ssl here (contexts, PEM blocks, error
messages): cryptography (~50 ms to import) is imported inside the functions
that make or read certificates, which only the broker and admin commands call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from tq.core.errors import ConfigError, TLSFailure

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    _IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_DAYS = 3650
LEAF_DAYS = 825
RENEW_BEFORE = timedelta(days=30)  # re-issue the server certificate this long before it expires
_SKEW = timedelta(minutes=5)  # backdate notBefore for peers whose clocks run a little slow
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, tls_dir: Path) -> TLSFiles:
        d = Path(tls_dir)
        return cls(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key")


def ensure_broker_tls(
    tls_dir: Path, hostnames: Sequence[str] = (), *, now: datetime | None = None
) -> tuple[TLSFiles, bool]:
    """Load the broker's TLS files from ``tls_dir``, creating whatever is missing.

    Returns the files and ``created``: True when a new CA was made (clients
    need the new ca.pem). The server certificate alone is re-issued from the
    existing CA when it lacks one of the wanted names (localhost, 127.0.0.1,
    ::1, this host's name, ``hostnames``), expires within 30 days, or was not
    signed by this CA. Names it already carries are kept.
    """
    now = _utc(now)
    files = TLSFiles.in_dir(tls_dir)
    wanted = _sans(["localhost", "127.0.0.1", "::1", socket.gethostname(), *hostnames])
    try:
        created = not (files.ca_cert.exists() and files.ca_key.exists())
        ca_key: _IssuerKey | None = None
        if created:
            Path(tls_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            ca_key, ca_cert = _make_cert(f"tq CA {socket.gethostname()}", now)
            _write_pair(files.ca_cert, files.ca_key, ca_key, ca_cert)
        else:
            ca_cert = _load_cert(files.ca_cert)
        names = wanted if created else _server_needs(files, ca_cert, wanted, now)
        if names is not None:
            ca = (ca_key or _load_key(files.ca_key), ca_cert)
            key, cert = _make_cert(f"tq broker {socket.gethostname()}", now, ca, sans=names)
            _write_pair(files.server_cert, files.server_key, key, cert)
    except OSError as exc:
        raise ConfigError(
            f"cannot write TLS files in {tls_dir}: {exc.strerror or exc}. "
            f"Pass --data DIR to use a writable data directory, or fix the permissions of {tls_dir}"
        ) from exc
    return files, created


def fingerprint(cert_path_or_pem: Path | str | bytes) -> str:
    """SHA-256 of a certificate's DER as ``AB:CD:...`` (what ``openssl x509 -fingerprint`` shows).

    Takes a path, or the PEM text itself (str or bytes).
    """
    data = cert_path_or_pem
    if isinstance(data, str) and "-----BEGIN" in data:
        data = data.encode()
    from cryptography.hazmat.primitives import serialization

    cert = _parse_cert(data, "PEM text") if isinstance(data, bytes) else _load_cert(Path(data))
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def fingerprint_der(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def cert_not_after(path: Path | str) -> datetime:
    """When the certificate at ``path`` expires (timezone-aware, UTC)."""
    return _load_cert(Path(path)).not_valid_after_utc


def server_ssl_context(
    files: TLSFiles, *, client_ca: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """TLS 1.2+ server context with the broker's certificate; optionally mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # no TLS 1.2 renegotiation: the broker writes answers without reading
    # (tq/broker/wire.py), which a handshake started by the peer mid-stream would stall
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(files.server_cert, files.server_key)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"cannot load the broker certificate {files.server_cert} with key "
            f"{files.server_key}: {exc}. Delete both and restart the broker to re-issue them"
        ) from exc
    if require_client_cert and client_ca is None:
        raise ConfigError("mutual TLS needs client_ca: the CA that signs client certificates")
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except OSError as exc:
            raise ConfigError(f"cannot load client CA {client_ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(
    ca_file: Path | None,
    *,
    ca_data: str | None = None,
    pin_fingerprint: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    """TLS 1.2+ client context that verifies the broker and its hostname.

    ``ca_file`` is the broker's ca.pem (or ``ca_data`` its PEM text, e.g.
    from a join token); None means the system trust store,
    unless ``pin_fingerprint`` is given: then the pin alone authenticates the
    broker. The pin is the fingerprint of the broker's *server* certificate
    and is checked after every handshake (in addition to ``ca_file``); a
    mismatch raises ssl.SSLCertVerificationError from do_handshake.
    """
    ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.pin = _normalize_pin(pin_fingerprint) if pin_fingerprint else ""
    if ca_data is not None:
        _trust(ctx, ca_data, "the CA certificate given")
    elif ca_file is not None:
        _trust(ctx, _read_ca(Path(ca_file)), f"CA certificate {ca_file}")
    elif ctx.pin:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_default_certs()
    if (client_cert is None) != (client_key is None):
        raise TLSFailure("pass both a client certificate and its key, or neither")
    if client_cert is not None:
        try:
            ctx.load_cert_chain(client_cert, client_key)
        except OSError as exc:
            raise TLSFailure(
                f"cannot load client certificate {client_cert} with key {client_key}: {exc}. "
                "Pass the pair issued by the broker's CA"
            ) from exc
    return ctx


def issue_client_cert(
    files: TLSFiles, name: str, out_dir: Path, *, now: datetime | None = None
) -> tuple[Path, Path]:
    """Issue ``out_dir/NAME.pem`` + ``NAME.key`` (clientAuth, CN=name) from the broker's CA.

    Both files are written 0600: they identify this client to the broker.
    """
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-@" for c in name):
        raise ConfigError(f"client name {name!r}: use letters, digits, '.', '_', '-' or '@'")
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert, ca_key = _load_cert(files.ca_cert), _load_key(files.ca_key)
    key, cert = _make_cert(name, _utc(now), (ca_key, ca_cert), ExtendedKeyUsageOID.CLIENT_AUTH)
    cert_path, key_path = Path(out_dir) / f"{name}.pem", Path(out_dir) / f"{name}.key"
    try:
        Path(out_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_pair(cert_path, key_path, key, cert, cert_mode=0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the client certificate to {out_dir}: {exc.strerror or exc}. "
            "Choose a writable directory"
        ) from exc
    return cert_path, key_path


# (needles in the lowercased error text, message); the first match wins, so order matters:
# a hostname mismatch is also a "certificate verify failed".
_EXPLANATIONS = [
    (
        "fingerprint mismatch",
        "the broker at {host} presented a certificate that does not match the pinned "
        "fingerprint: check the pin against the fingerprint the broker prints at start",
    ),
    (
        "hostname mismatch|ip address mismatch",
        "the broker's certificate is not valid for {name}: connect with a name it lists, "
        "or restart the broker with `tq broker --tls-san {name}`",
    ),
    (
        "certificate has expired|not yet valid",
        "the broker's certificate is outside its validity period: check this machine's "
        "clock, then restart the broker to re-issue it",
    ),
    (
        "certificate verify failed",
        "the broker's certificate is not signed by {ca}: pass the broker's ca.pem with --ca "
        "(wrong CA?)",
    ),
    (
        "wrong version number|http request|packet length too long|record layer",
        "the broker at {host} did not speak TLS (is it running with --insecure?)",
    ),
    (
        "alert unknown ca|alert bad certificate|certificate required",
        "the broker at {host} rejected this client's certificate: mutual TLS needs a "
        "client certificate issued by the broker's CA",
    ),
    (
        "unsupported protocol|alert protocol version|no protocols available",
        "the broker at {host} and this client share no TLS version (tq needs TLS 1.2+)",
    ),
    (
        "eof occurred|unexpected eof|connection reset",
        "the broker at {host} closed the connection during the TLS handshake "
        "(is it running with --insecure, does it require a client certificate, "
        "or is it at its connection limit?)",
    ),
]


def describe_tls_error(exc: ssl.SSLError | OSError, host: str, ca_file: Path | str | None) -> str:
    """One line for an operator about a failed TLS connection to ``host``.

    ``ca_file`` is the trusted CA's path, or a description of it (a str).
    """
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing is listening at {host} (is the broker running, on this port?)"
    parts = (getattr(exc, "reason", None), getattr(exc, "verify_message", None), str(exc))
    text = " ".join(str(p) for p in parts if p).lower()
    name = host[1:].split("]")[0] if host.startswith("[") else host
    if name.count(":") == 1:
        name = name.split(":")[0]
    ca = "any CA this machine trusts" if ca_file is None else f"CA {ca_file}"
    if isinstance(ca_file, str):
        ca = ca_file
    for needles, template in _EXPLANATIONS:
        if any(n in text for n in needles.split("|")):
            return template.format(host=host, name=name, ca=ca)
    return f"TLS with the broker at {host} failed: {exc}"


# -- pinning: checked inside do_handshake, so it also works under trio.SSLStream


def _check_pin(ctx: ssl.SSLContext, der: bytes | None) -> None:
    pin = getattr(ctx, "pin", "")
    got = fingerprint_der(der) if der else "no certificate"
    if pin and got.replace(":", "") != pin:
        raise ssl.SSLCertVerificationError(
            f"certificate fingerprint mismatch: the broker presented {got}"
        )


class _PinnedObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _check_pin(self.context, self.getpeercert(binary_form=True))


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_pin(self.context, self.getpeercert(binary_form=True))


class _ClientContext(ssl.SSLContext):
    sslobject_class = _PinnedObject
    sslsocket_class = _PinnedSocket
    pin = ""  # server certificate SHA-256, hex without colons; "" = no pin


def _normalize_pin(pin: str) -> str:
    hexpin = pin.rsplit("=", 1)[-1].replace(":", "").replace(" ", "").upper()
    if len(hexpin) != 64 or not all(c in "0123456789ABCDEF" for c in hexpin):
        raise TLSFailure(
            f"pin {pin!r} is not a SHA-256 fingerprint: pass the 64 hex digits "
            "(colons allowed) of the broker's certificate fingerprint"
        )
    return hexpin


# -- files and certificates


def _utc(now: datetime | None) -> datetime:
    now = now or datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


_CA_HINT = "pass --ca with the broker's ca.pem (the broker prints its path at start)"


def _read_ca(path: Path) -> str:
    """The certificates of a PEM file, re-encoded (text around them dropped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSFailure(f"CA certificate {path} not found: {_CA_HINT}") from None
    except OSError as exc:
        raise TLSFailure(
            f"CA certificate {path} cannot be read ({exc.strerror}): {_CA_HINT}"
        ) from exc
    blocks = _PEM_BLOCK.findall(data)
    try:
        ders = [base64.b64decode(b"".join(block.split()), validate=True) for block in blocks]
    except (binascii.Error, ValueError):
        ders = []
    if not ders or not all(ders):
        raise TLSFailure(f"CA certificate {path} is not a PEM certificate: {_CA_HINT}")
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in ders)


def _trust(ctx: ssl.SSLContext, pem: str, what: str) -> None:
    """Trust the certificates in ``pem``; OpenSSL parses them (a damaged one fails here)."""
    try:
        ctx.load_verify_locations(cadata=pem)
    except ssl.SSLError as exc:
        raise TLSFailure(f"{what} is not a PEM certificate ({exc.reason}): {_CA_HINT}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    return _parse_cert(_read(path), str(path))


def _parse_cert(data: bytes, where: str) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(
            f"{where} is not a PEM certificate ({exc}): it must start with -----BEGIN CERTIFICATE"
        ) from exc


def _load_key(path: Path) -> _IssuerKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{path}: tq signs with EC or RSA CA keys only")
    return key


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have cleared bits (0644 certs)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _server_needs(
    files: TLSFiles, ca_cert: x509.Certificate, wanted: list[x509.GeneralName], now: datetime
) -> list[x509.GeneralName] | None:
    """The SANs for a re-issued server certificate, or None if the current one is fine."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    if not (files.server_cert.exists() and files.server_key.exists()):
        return wanted
    cert = _load_cert(files.server_cert)
    try:
        have = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        cert.verify_directly_issued_by(ca_cert)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        return wanted
    if set(wanted) <= set(have) and cert.not_valid_after_utc - RENEW_BEFORE > now:
        return None
    return list(dict.fromkeys([*have, *wanted]))


def _sans(entries: Sequence[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    out: list[x509.GeneralName] = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(entry.strip("[]"))))
        except ValueError:
            if not entry.isascii():
                raise ConfigError(f"host name {entry!r}: use its ASCII (xn--) form") from None
            out.append(x509.DNSName(entry.lower()))
    return list(dict.fromkeys(out))


def _make_cert(
    cn: str,
    now: datetime,
    issuer: tuple[_IssuerKey, x509.Certificate] | None = None,
    eku: x509.ObjectIdentifier | None = None,  # None: serverAuth
    sans: Sequence[x509.GeneralName] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new P-256 key and its certificate: a self-signed CA if ``issuer`` is None, else a leaf."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    eku = eku or ExtendedKeyUsageOID.SERVER_AUTH
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca = issuer is None
    signer, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    # KeyUsage: digitalSignature for leaves; keyCertSign + cRLSign for the CA
    usage = x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=CA_DAYS if ca else LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not ca:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
        builder = builder.add_extension(aki, critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(signer, hashes.SHA256())


def _write_pair(
    cert_path: Path,
    key_path: Path,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    cert_mode: int = 0o644,
) -> None:
    from cryptography.hazmat.primitives import serialization

    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    _write(key_path, key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    _write(cert_path, cert.public_bytes(pem), cert_mode)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temporary file + rename)."""
    _write(Path(path), data, 0o600)
