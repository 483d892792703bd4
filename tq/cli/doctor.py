"""The checks behind `tq doctor`: is this host set up to run tq, and what to fix.

Each check returns a ``Check``: a status (ok, warn, fail, skip), what was
found, and the remedy when it is not ok. Checks look, never change: the
store the settings name (an SQLite file or a PostgreSQL database, through
tq.store.inspect) is opened read-only, the data directory is probed with a temporary
file that is removed at once. Time is an argument (``now``) so expiry is
testable. Imported only by the `tq doctor` command.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tq.config import Settings

EXPIRY_WARNING = timedelta(days=30)  # a certificate expiring sooner than this fails the check
CLOCK_TOLERANCE = 5.0  # seconds of disagreement before the clock check fails
MIN_FREE_BYTES = 256 * 1024 * 1024  # less free space than this under the data dir fails
LOW_FREE_BYTES = 1024 * 1024 * 1024  # ... less than this warns


@dataclass
class Check:
    name: str
    status: str  # ok, warn (does not fail the run), fail, skip (not applicable here)
    detail: str
    fix: str = ""


def run_checks(
    flags: dict[str, Any], *, offline: bool = False, now: datetime | None = None
) -> list[Check]:
    """Every check, in order; ``now`` (UTC) is for tests."""
    now = now or datetime.now(UTC)
    conf, config_check = _check_config(flags)
    checks = [config_check]
    checks += _check_data_dir(conf.data)
    store_checks, newest, store_clock = _check_store(conf)
    checks += store_checks
    checks += _check_keys(conf)
    checks.append(_check_retention(conf))
    checks += _check_broker_tls(conf, now)
    checks.append(_check_client_ca(conf, now))
    broker_check, broker_time = _check_broker(conf, offline)
    checks.append(broker_check)
    checks.append(_check_clock(now, newest, broker_time, store_clock))
    return checks


def _check_config(flags: dict[str, Any]) -> tuple[Settings, Check]:
    from tq.config import Settings, default_config_file, load_settings
    from tq.core.errors import TQError

    path = default_config_file()
    try:
        conf = load_settings(flags)
    except TQError as exc:
        # go on without the file (or without anything), so the other checks still run
        try:
            fallback = load_settings(flags, config_file=Path(os.devnull))
        except TQError:
            fallback = Settings()
        return fallback, Check("config", "fail", exc.message, "fix the setting it names")
    if path.exists():
        return conf, Check("config", "ok", f"{path} is valid")
    return conf, Check("config", "ok", f"no config file at {path}: defaults, TQ_* and flags apply")


def _check_data_dir(data: Path) -> list[Check]:
    import shutil

    if data.exists() and not data.is_dir():
        return [
            Check(
                "data dir",
                "fail",
                f"{data} exists but is not a directory",
                "pass --data with a directory (or set TQ_DATA)",
            )
        ]
    if not data.exists():
        parent = _existing_ancestor(data)
        if parent is None or not parent.is_dir() or not _writable(parent):
            where = parent if parent is not None else data
            return [
                Check(
                    "data dir",
                    "fail",
                    f"{data} does not exist and cannot be created ({where} is not a writable "
                    "directory)",
                    f"create {data} writable by the user tq runs as, or pass --data DIR",
                )
            ]
        checks = [Check("data dir", "ok", f"{data} does not exist yet; the broker creates it")]
        probe = parent
    elif not _writable(data):
        return [
            Check(
                "data dir",
                "fail",
                f"{data} is not writable by this user",
                f"chown/chmod {data} for the user tq runs as, or pass --data DIR",
            )
        ]
    else:
        checks = [Check("data dir", "ok", f"{data} is writable")]
        probe = data
        if data.stat().st_mode & 0o077:
            checks.append(
                Check(
                    "data dir mode",
                    "warn",
                    f"{data} is open to other users (mode {data.stat().st_mode & 0o777:o}); "
                    "it holds tasks' payloads and key hashes",
                    f"chmod 700 {data}",
                )
            )
    free = shutil.disk_usage(probe).free
    text = f"{free / 2**30:.1f} GiB free under {probe}"
    if free < MIN_FREE_BYTES:
        checks.append(
            Check("disk", "fail", text, "free disk space: the store stops at a full disk")
        )
    elif free < LOW_FREE_BYTES:
        checks.append(Check("disk", "warn", text, "free some disk space soon"))
    else:
        checks.append(Check("disk", "ok", text))
    return checks


def _ttl(seconds: float) -> str:
    from tq.core.when import format_duration

    return format_duration(seconds) if seconds else "kept"


def _check_retention(conf: Settings) -> Check:
    """What the broker's retention deletes (a store without it grows forever)."""
    ttls = {
        "succeeded": conf.retention_succeeded,
        "dead": conf.retention_dead,
        "cancelled": conf.retention_cancelled,
    }
    detail = "finished tasks: " + ", ".join(f"{s} {_ttl(t)}" for s, t in ttls.items())
    if conf.retention_queues:
        overrides = ", ".join(f"{q}.{s} {_ttl(t)}" for q, s, t in conf.retention_queues)
        detail += f"; per queue: {overrides}"
    if not any(ttls.values()) and not any(t for *_, t in conf.retention_queues):
        return Check(
            "retention",
            "warn",
            detail + ": nothing is ever deleted, the store grows with every task",
            "set retention_succeeded / retention_dead / retention_cancelled (e.g. 7d), "
            "or run `tq purge` now and then",
        )
    return Check("retention", "ok", detail)


def _existing_ancestor(path: Path) -> Path | None:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return None


def _writable(directory: Path) -> bool:
    """Really create a file: os.access says yes to root even on a read-only mount."""
    try:
        fd, name = tempfile.mkstemp(prefix=".tq-doctor-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _check_store(conf: Settings) -> tuple[list[Check], float | None, float | None]:
    """The store the broker's settings name (SQLite file or PostgreSQL database): it
    opens, its schema version, and its own facts. Also the newest task's time and
    the database server's clock (as of now), for the clock check."""
    from tq.core.errors import TQError
    from tq.store.inspect import inspect_store

    try:
        report = inspect_store(conf.store_url)
    except TQError as exc:
        postgres = conf.store_url.split("://", 1)[0].lower() in ("postgresql", "postgres")
        fix = (
            "check that PostgreSQL runs and accepts this host, and the store URL's host, "
            "port, database and user (password: PGPASSWORD or ~/.pgpass)"
            if postgres
            else "check the file's permissions; if it is corrupt, restore the last backup"
        )
        return [Check("store", "fail", exc.message or str(exc), fix)], None, None
    clock = None
    if report.clock is not None:
        clock = report.clock - (report.measured_at - time.time())  # the server's, as of now
    if report.backend == "postgresql":
        return _postgres_checks(report), report.newest, clock
    if not report.exists:
        detail = f"no store at {report.location} (a broker creates it; workers need none)"
        return [Check("store", "skip", detail)], None, None
    mode = report.facts.get("journal_mode", "?")
    detail = (
        f"{report.location}: schema version {report.schema_version}, {mode} journal, "
        f"{report.size / 2**20:.1f} MiB"
    )
    return (
        [_version_check(report, detail, "take a backup first: tq backup FILE")],
        report.newest,
        clock,
    )


def _version_check(report: Any, detail: str, before_upgrade: str) -> Check:
    version, known = report.schema_version, report.known_version
    if version > known:
        return Check(
            "store",
            "fail",
            f"{detail}, newer than this tq understands ({known})",
            "upgrade tq on this host to the version that wrote it",
        )
    if version < known:
        return Check(
            "store",
            "warn",
            f"{detail}; the next broker start migrates it to {known}",
            before_upgrade,
        )
    return Check("store", "ok", detail)


PG_BUSY = 0.8  # warn when this share of max_connections is in use


def _postgres_checks(report: Any) -> list[Check]:
    """The database answers, its schema, and the server settings tq depends on."""
    facts = report.facts
    server = f"PostgreSQL {facts.get('server_version', '?')}"
    if not report.exists:
        detail = (
            f"{report.location} ({server}) answers; no tq tables yet (the first broker "
            "start creates them)"
        )
        checks = [Check("store", "ok", detail)]
    else:
        detail = (
            f"{report.location} ({server}): schema version {report.schema_version}, "
            f"{report.size / 2**20:.1f} MiB"
        )
        backup = "take a backup first (pg_dump, or a base backup)"
        checks = [_version_check(report, detail, backup)]
    used, limit = facts.get("connections", 0), facts.get("max_connections", 0)
    brokers = facts.get("broker_connections", 0)
    settings = (
        f"synchronous_commit {facts.get('synchronous_commit', '?')}, fsync "
        f"{facts.get('fsync', '?')}, max_connections {limit} ({used} in use, {brokers} by "
        f"tq brokers), shared_buffers {facts.get('shared_buffers', '?')}"
    )
    if facts.get("fsync") == "off":
        checks.append(
            Check(
                "pg settings",
                "fail",
                f"{settings}: with fsync off an operating-system crash or power cut can "
                "corrupt the database and lose acknowledged tasks",
                "set fsync = on in postgresql.conf and reload PostgreSQL",
            )
        )
    elif facts.get("synchronous_commit") == "off":
        checks.append(
            Check(
                "pg settings",
                "warn",
                f"{settings}: with synchronous_commit off a crash of the database server "
                "loses the last commits (acknowledged tasks)",
                "set synchronous_commit = on (tq's --synchronous normal does this per broker "
                "when you accept that loss)",
            )
        )
    elif isinstance(limit, int) and limit and used >= PG_BUSY * limit:
        checks.append(
            Check(
                "pg settings",
                "warn",
                f"{settings}: {used} of {limit} connections in use",
                "raise max_connections (each broker uses a few; see docs/OPERATIONS.md, "
                "cluster) or put a connection pooler in front for other clients",
            )
        )
    else:
        checks.append(Check("pg settings", "ok", settings))
    return checks


def _check_keys(conf: Settings) -> list[Check]:
    """Private keys and API key files must not be readable by group or others."""
    candidates = (
        [*conf.data.glob("*.key"), *conf.tls_dir.glob("*.key")] if conf.data.is_dir() else []
    )
    exposed = [p for p in sorted(candidates) if p.stat().st_mode & 0o077]
    if not candidates:
        return []
    if exposed:
        names = ", ".join(str(p) for p in exposed)
        return [
            Check(
                "key files",
                "fail",
                f"readable by other users: {names}",
                f"chmod 600 {' '.join(str(p) for p in exposed)}",
            )
        ]
    return [Check("key files", "ok", f"{len(candidates)} key file(s) readable by their owner only")]


def _check_broker_tls(conf: Settings, now: datetime) -> list[Check]:
    from tq.security.tls import TLSFiles

    files = TLSFiles.in_dir(conf.tls_dir)
    every = (files.ca_cert, files.ca_key, files.server_cert, files.server_key)
    if not any(p.exists() for p in every):
        why = (
            "TLS is off (--insecure)" if conf.insecure else "the broker creates them on first start"
        )
        return [Check("broker tls", "skip", f"no broker TLS files in {conf.tls_dir} ({why})")]
    missing = [p.name for p in every if not p.exists()]
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        return [
            Check(
                "tls ca",
                "fail",
                f"{conf.tls_dir} lacks {', '.join(missing)}",
                "restore ca.pem and ca.key from a backup; or move the directory aside and "
                "restart the broker to create a new CA (then give the new ca.pem to every client)",
            )
        ]
    ca_check, ca_cert = _cert_check(
        "tls ca",
        files.ca_cert,
        now,
        "create a new CA: move DATA/tls aside, restart the broker, give the new ca.pem to "
        "every worker and client",
    )
    renew = "restart the broker: it re-issues its server certificate from its CA"
    if missing:
        return [ca_check, Check("tls server", "fail", f"{conf.tls_dir} lacks {missing[0]}", renew)]
    server_check, server_cert = _cert_check("tls server", files.server_cert, now, renew)
    if server_check.status == "ok" and ca_cert is not None and not _signed_by(server_cert, ca_cert):
        server_check = Check(
            "tls server",
            "fail",
            f"{files.server_cert} is not signed by {files.ca_cert}",
            "delete server.pem and server.key and restart the broker to re-issue them",
        )
    return [ca_check, server_check]


def _cert_check(name: str, path: Path, now: datetime, renew: str) -> tuple[Check, Any]:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return Check(name, "fail", f"cannot read {path} as a PEM certificate ({exc})", renew), None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return Check(
            name,
            "fail",
            f"{path} is not valid before {start:%Y-%m-%d %H:%M} UTC",
            "this host's clock is behind: fix time sync (NTP)",
        ), cert
    if now >= end:
        return Check(name, "fail", f"{path} expired on {end:%Y-%m-%d} UTC", renew), cert
    left = end - now
    if left < EXPIRY_WARNING:
        return Check(
            name, "fail", f"{path} expires in {left.days} days ({end:%Y-%m-%d} UTC)", renew
        ), cert
    return Check(name, "ok", f"{path} valid until {end:%Y-%m-%d} UTC"), cert


def _signed_by(cert: Any, ca: Any) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_client_ca(conf: Settings, now: datetime) -> Check:
    """The CA this host's clients and workers verify the broker with."""
    if conf.insecure:
        return Check("client ca", "warn", "TLS is off (--insecure): traffic is plaintext")
    ca = conf.ca_file()
    if ca is None:
        return Check(
            "client ca",
            "warn",
            "no CA configured and no local broker CA: the system trust store will be used",
            "pass --ca with the broker's ca.pem (or set TQ_CA, or `ca` in the config file)",
        )
    check, cert = _cert_check(
        "client ca", ca, now, "get the broker's current ca.pem and pass it with --ca"
    )
    if check.status != "ok" or cert is None:
        return check
    server = conf.tls_dir / "server.pem"
    if server.exists() and ca != conf.tls_dir / "ca.pem":
        from cryptography import x509

        try:
            server_cert = x509.load_pem_x509_certificate(server.read_bytes())
        except (OSError, ValueError):
            return check  # reported by the broker tls check
        if not _signed_by(server_cert, cert):
            return Check(
                "client ca",
                "fail",
                f"{ca} did not sign this host's broker certificate {server}",
                f"use {conf.tls_dir / 'ca.pem'} (or drop --ca on this host)",
            )
    return check


def _check_broker(conf: Settings, offline: bool) -> tuple[Check, float | None]:
    if offline:
        return Check(
            "broker", "skip", f"not contacted (--offline); configured: {conf.broker}"
        ), None
    from tq.client.sync import BlockingClient
    from tq.core.errors import TQError

    sent = time.time()
    try:
        with BlockingClient.from_settings(conf, timeout=5.0) as client:
            server = dict(client.server)
    except TQError as exc:  # its message names the cause and the remedy
        return Check("broker", "fail", f"{conf.broker}: {exc.message or exc}"), None
    received = time.time()
    name = server.get("broker") or "?"
    text = f"{client.address} answered: {server.get('server', '?')} (broker {name}, protocol "
    text += f"{server.get('v', '?')}) in {1000 * (received - sent):.0f} ms"
    broker_time = server.get("time")
    if isinstance(broker_time, int | float):
        broker_time = float(broker_time) - (received - sent) / 2  # as of `sent`
    else:
        broker_time = None
    return Check("broker", "ok", text), broker_time


def _check_clock(
    now: datetime, newest: float | None, broker_time: float | None, store_time: float | None
) -> Check:
    """Evidence that the clock is wrong: a broker, a database server or a store ahead of it."""
    ts = now.timestamp()
    for whose, known in (("the broker's", broker_time), ("the database server's", store_time)):
        if known is not None and abs(known - ts) > CLOCK_TOLERANCE:
            skew = ts - known
            return Check(
                "clock",
                "fail",
                f"this host's clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} "
                f"{whose}",
                "enable time sync (NTP, e.g. systemd-timesyncd or chrony) on both hosts",
            )
    if newest is not None and newest - ts > CLOCK_TOLERANCE:
        return Check(
            "clock",
            "fail",
            f"the store's newest task was created {newest - ts:.0f} s in this host's future",
            "the clock went backwards: enable time sync (NTP) before starting the broker",
        )
    seen = [
        name
        for name, known in (
            ("the broker's clock", broker_time),
            ("the database server's clock", store_time),
            ("the store", newest),
        )
        if known is not None
    ]
    against = f"agrees with {' and '.join(seen)}" if seen else "no other clock to compare with"
    return Check("clock", "ok", f"{now:%Y-%m-%d %H:%M:%S} UTC: {against}")
