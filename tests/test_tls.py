"""tq.security.tls: the broker's CA, certificates, contexts and error messages."""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tq.core.errors import ConfigError, TLSFailure
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


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    """Drive a TLS handshake between two in-memory endpoints; raise what either side raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for key, side in (("c", c), ("s", s)):
            if not done[key]:
                try:
                    side.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def broker(tmp_path: Path) -> TLSFiles:
    files, created = ensure_broker_tls(tmp_path / "tls", ["broker.example", "10.1.2.3"])
    assert created
    return files


def test_creates_files_with_modes_then_loads(tmp_path: Path, broker: TLSFiles) -> None:
    assert mode(tmp_path / "tls") == 0o700
    assert {p.name for p in (tmp_path / "tls").iterdir()} == {
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
    }
    assert mode(broker.ca_key) == mode(broker.server_key) == 0o600
    assert mode(broker.ca_cert) == mode(broker.server_cert) == 0o644
    before = fingerprint(broker.ca_cert), fingerprint(broker.server_cert)

    files, created = ensure_broker_tls(tmp_path / "tls", ["broker.example", "10.1.2.3"])
    assert (files, created) == (broker, False)
    assert (fingerprint(files.ca_cert), fingerprint(files.server_cert)) == before


def test_fingerprint_matches_cryptography_and_openssl(broker: TLSFiles) -> None:
    expected = ":".join(f"{b:02X}" for b in load(broker.ca_cert).fingerprint(hashes.SHA256()))
    assert fingerprint(broker.ca_cert) == expected
    assert fingerprint(str(broker.ca_cert)) == expected
    assert fingerprint(broker.ca_cert.read_bytes()) == expected
    assert fingerprint(broker.ca_cert.read_text()) == expected
    assert fingerprint_der(load(broker.ca_cert).public_bytes(Encoding.DER)) == expected
    if shutil.which("openssl"):
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(broker.ca_cert)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip().split("=", 1)[1] == expected


def test_certificate_profile(broker: TLSFiles) -> None:
    ca, server = load(broker.ca_cert), load(broker.server_cert)
    assert str(ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value).startswith("tq CA ")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > timedelta(days=3649)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.not_valid_after_utc - server.not_valid_before_utc <= timedelta(days=826)
    server.verify_directly_issued_by(ca)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "broker.example", "10.1.2.3"])
def test_server_cert_verifies_for_its_names(broker: TLSFiles, host: str) -> None:
    handshake(client_ssl_context(broker.ca_cert), server_ssl_context(broker), host)


def test_wrong_name_fails_and_suggests_tls_san(broker: TLSFiles) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(client_ssl_context(broker.ca_cert), server_ssl_context(broker), "other.example")
    msg = describe_tls_error(info.value, "other.example:7000", broker.ca_cert)
    assert "other.example" in msg
    assert "tq broker --tls-san other.example`" in msg


def test_new_hostname_reissues_server_cert_only(tmp_path: Path, broker: TLSFiles) -> None:
    ca_fp, server_fp = fingerprint(broker.ca_cert), fingerprint(broker.server_cert)
    files, created = ensure_broker_tls(tmp_path / "tls", ["new.example"])
    assert not created
    assert fingerprint(files.ca_cert) == ca_fp
    assert fingerprint(files.server_cert) != server_fp
    assert mode(files.server_key) == 0o600
    for host in ("new.example", "broker.example", "localhost"):  # old names are kept
        handshake(client_ssl_context(files.ca_cert), server_ssl_context(files), host)


def test_expiring_server_cert_is_reissued(tmp_path: Path) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    files, _ = ensure_broker_tls(tmp_path, now=start)
    assert cert_not_after(files.server_cert) == start + timedelta(days=825)
    ca_fp = fingerprint(files.ca_cert)
    later = start + timedelta(days=810)
    files, created = ensure_broker_tls(tmp_path, now=later)
    assert not created and fingerprint(files.ca_cert) == ca_fp
    assert cert_not_after(files.server_cert) == later + timedelta(days=825)


def test_handshake_fails_with_another_brokers_ca(tmp_path: Path, broker: TLSFiles) -> None:
    other, _ = ensure_broker_tls(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(client_ssl_context(other.ca_cert), server_ssl_context(broker), "localhost")
    msg = describe_tls_error(info.value, "localhost:7000", other.ca_cert)
    assert msg == (
        f"the broker's certificate is not signed by CA {other.ca_cert}: "
        "pass the broker's ca.pem with --ca (wrong CA?)"
    )


def test_plaintext_peer_is_described() -> None:
    ctx = client_ssl_context(None)
    incoming = ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    incoming.write(b"\x00\x00\x00\x10not a TLS record at all")
    with pytest.raises(ssl.SSLError) as info:
        client.do_handshake()
    msg = describe_tls_error(info.value, "h:7000", None)
    assert msg == "the broker at h:7000 did not speak TLS (is it running with --insecure?)"


def test_refused_connection_is_described() -> None:
    assert "is the broker running" in describe_tls_error(ConnectionRefusedError(), "h:1", None)


def test_pin_alone_authenticates_and_mismatch_fails(tmp_path: Path, broker: TLSFiles) -> None:
    pin = fingerprint(broker.server_cert)
    pinned = client_ssl_context(None, pin_fingerprint=pin.lower())
    handshake(pinned, server_ssl_context(broker), "any-name")
    other, _ = ensure_broker_tls(tmp_path / "other")
    wrong = client_ssl_context(broker.ca_cert, pin_fingerprint=fingerprint(other.server_cert))
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(wrong, server_ssl_context(broker), "localhost")
    assert "pinned fingerprint" in describe_tls_error(info.value, "localhost", broker.ca_cert)
    with pytest.raises(TLSFailure, match="not a SHA-256 fingerprint"):
        client_ssl_context(None, pin_fingerprint="abc")


def test_missing_ca_file_is_a_clear_tls_failure(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ca.pem"
    with pytest.raises(TLSFailure) as info:
        client_ssl_context(missing)
    assert str(info.value) == (
        f"CA certificate {missing} not found: pass --ca with the broker's ca.pem "
        "(the broker prints its path at start)"
    )
    garbage = tmp_path / "ca.pem"
    garbage.write_text("hello")
    with pytest.raises(TLSFailure, match="is not a PEM certificate: pass --ca"):
        client_ssl_context(garbage)
    with pytest.raises(TLSFailure, match="cannot be read"):
        client_ssl_context(tmp_path)


def test_unwritable_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    target = tmp_path / "afile" / "tls"
    with pytest.raises(ConfigError) as info:
        ensure_broker_tls(target)
    assert str(target) in str(info.value)
    assert "--data DIR" in str(info.value)
    assert isinstance(info.value.__cause__, NotADirectoryError)


def test_client_cert_and_mutual_tls(tmp_path: Path, broker: TLSFiles) -> None:
    cert_path, key_path = issue_client_cert(broker, "worker-1", tmp_path / "clients")
    assert mode(key_path) == mode(cert_path) == 0o600  # both private
    cert = load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "worker-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    server = server_ssl_context(broker, client_ca=broker.ca_cert, require_client_cert=True)
    ok = client_ssl_context(broker.ca_cert, client_cert=cert_path, client_key=key_path)
    handshake(ok, server, "localhost")
    with pytest.raises(ssl.SSLError):
        handshake(client_ssl_context(broker.ca_cert), server, "localhost")
    with pytest.raises(ConfigError):
        issue_client_cert(broker, "../evil", tmp_path)


def test_modes_do_not_depend_on_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files, _ = ensure_broker_tls(tmp_path / "tls")
    finally:
        os.umask(old)
    assert mode(files.server_cert) == 0o644 and mode(files.server_key) == 0o600
    assert not list((tmp_path / "tls").glob(".*.tmp"))
