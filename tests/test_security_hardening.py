"""Attacks from outside testing, each with the behaviour that defeats it.

Mutual TLS on both ports, logins that failed attempts cannot slow down,
refusals that tell an attacker nothing, keys that see only their queues,
worker ids bound to their key, and the careless-operator defaults (file
modes, the open-file limit, refusals in the log). docs/SECURITY.md's
"Tested attacks" table points here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tq.broker.auth import FAIL_DELAY, Auth
from tq.client import BlockingClient
from tq.core.auth import ApiKey
from tq.core.errors import Forbidden, TLSFailure, TQError, Unauthorized
from tq.security.keys import KDF, LEGACY_KDF, hash_secret, new_key, parse_key, verify_secret
from tq.security.tls import TLSFiles, issue_client_cert
from tq.store.sqlite import open_sqlite_store
from tq.testing import BrokerProcess, RunningBroker, running_broker, running_worker, tq_command

REJECTED = "rejected this client's certificate"


async def make_key(broker: RunningBroker, role: str, **fields: Any) -> str:
    async with broker.client() as admin:
        reply = await admin.request({"t": "keys", "op": "create", "role": role, **fields})
    return str(reply["key"])


# -- mutual TLS ------------------------------------------------------------------------


def _https(ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


@pytest.mark.trio
async def test_rest_requires_a_client_certificate_when_the_wire_does(tmp_path: Path) -> None:
    async with running_broker(tmp_path, require_client_cert=True) as broker:
        ca, url, key = broker.info.ca_file, broker.info.http, broker.key
        assert ca is not None and url is not None
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(verify=_https(ca), headers=headers) as anonymous:
            with pytest.raises(httpx.TransportError):
                await anonymous.get(f"{url}/api/v1/stats")
        pair = issue_client_cert(TLSFiles.in_dir(tmp_path / "tls"), "ops", tmp_path / "certs")
        async with httpx.AsyncClient(verify=_https(ca, pair), headers=headers) as known:
            reply = await known.get(f"{url}/api/v1/stats")
        assert reply.status_code == 200 and reply.json()["queues"] == {}


@pytest.mark.trio
async def test_clients_without_a_certificate_are_told_the_broker_rejected_it(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path, require_client_cert=True) as broker:
        with pytest.raises(TLSFailure, match=REJECTED):
            async with broker.client() as client:
                await client.stats()

        def blocking() -> None:
            with BlockingClient.from_settings(broker.settings) as client:
                client.stats()

        with pytest.raises(TLSFailure, match=REJECTED):
            await trio.to_thread.run_sync(blocking)


@pytest.mark.slow
def test_the_cli_says_the_broker_rejected_its_certificate(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker", "--require-client-cert") as broker:
        done = subprocess.run(
            tq_command("stats", *broker.client_args()), capture_output=True, text=True, timeout=60
        )
    assert done.returncode != 0
    assert REJECTED in done.stderr and "connection" not in done.stderr, done.stderr


# -- logins: cheap, uniform, and not slowed down by failed attempts --------------------


async def _attempt(client_of: Any, key: str, outcomes: list[str]) -> None:
    try:
        async with client_of(key=key):
            outcomes.append("accepted")
    except Unauthorized as exc:
        outcomes.append(str(exc))


@pytest.mark.trio
async def test_wrong_secrets_do_not_delay_a_correct_hello(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The clock stands still: a refused hello is never answered, so anything that
    queued the correct hello behind the wrong ones would hang this test."""
    async with running_broker(tmp_path) as broker:
        good = await make_key(broker, "producer")  # never verified since the broker started
        key_id = parse_key(good)[0]
        refused: list[str] = []
        async with trio.open_nursery() as nursery:
            for n in range(30):
                nursery.start_soon(_attempt, broker.client, f"tq_{key_id}_wrong{n}", refused)
                nursery.start_soon(_attempt, broker.client, f"tq_{n:012x}_{'A' * 43}", refused)
            await trio.testing.wait_all_tasks_blocked()
            async with broker.client(key=good) as client:
                assert client.server["key_id"] == key_id and refused == []
            mock_clock.jump(FAIL_DELAY)  # now the refusals are answered, all alike
        assert len(refused) == 60
        templates = {re.sub(r"[0-9a-f]{12}", "ID", text) for text in refused}
        assert templates == {
            "API key ID was refused: there is no such key, or the secret is wrong; "
            "check the whole key, or ask an admin for one"
        }


@pytest.mark.trio
async def test_failed_logins_are_answered_late_and_alike(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        auth = Auth(store)
        text, key = await auth.create_key(None, name="billing", role="producer")
        secret = parse_key(text)[1]
        answers: dict[str, str] = {}

        async def login(label: str, attempt: str) -> None:
            try:
                await auth.authenticate(attempt)
                answers[label] = "accepted"
            except TQError as exc:
                answers[label] = str(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(login, "unknown id", f"tq_{'0' * 12}_{secret}")
            nursery.start_soon(login, "wrong secret", f"tq_{key.id}_{'B' * 43}")
            await trio.testing.wait_all_tasks_blocked()
            assert answers == {}  # neither is answered before FAIL_DELAY
            mock_clock.jump(FAIL_DELAY)
        assert answers["unknown id"].replace("0" * 12, key.id) == answers["wrong secret"]
        assert "billing" not in answers["wrong secret"]

        await auth.revoke_key(None, key.id)
        async with trio.open_nursery() as nursery:  # a revoked key: its name only to its holder
            nursery.start_soon(login, "revoked, wrong secret", f"tq_{key.id}_{'C' * 43}")
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(FAIL_DELAY)
        assert answers["revoked, wrong secret"] == answers["wrong secret"]
        with pytest.raises(Unauthorized, match=r"billing.*revoked"):
            await auth.authenticate(text)


def _legacy(name: str, role: str = "producer") -> tuple[str, ApiKey]:
    """A key as older brokers made it: a salted scrypt hash."""
    text, record = new_key(name, role, now=time.time())
    salt = os.urandom(16)
    secret = parse_key(text)[1]
    return text, dataclasses.replace(
        record, kdf=LEGACY_KDF, salt=salt, hash=hash_secret(secret, salt, LEGACY_KDF)
    )


@pytest.mark.trio
async def test_keys_of_older_brokers_are_rehashed_at_their_first_login(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        flooded_text, flooded = _legacy("flooded")
        other_text, other = _legacy("other")
        modern_text, modern = new_key("modern", "reader", now=time.time())
        for record in (flooded, other, modern):
            await store.create_key(record)
        auth = Auth(store)
        await auth.load()
        failures: list[str] = []

        async def wrong(n: int) -> None:
            with pytest.raises(Unauthorized) as info:
                await auth.authenticate(f"tq_{flooded.id}_wrong{n}")
            failures.append(str(info.value))

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(wrong, n)
            await trio.testing.wait_all_tasks_blocked()
            assert (await auth.authenticate(modern_text)) is not None  # never near scrypt
            # another legacy key waits for at most one of the flood's scrypt runs
            assert (await auth.authenticate(other_text)) is not None
            waiting = auth._legacy_locks[flooded.id].statistics().tasks_waiting
            assert waiting >= 17, waiting
            assert (await store.get_key(other.id)).kdf == KDF  # rehashed in the store
            assert (await auth.authenticate(flooded_text)) is not None
            mock_clock.jump(FAIL_DELAY)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(FAIL_DELAY)
        assert len(failures) == 20
        stored = await store.get_key(flooded.id)
        assert stored.kdf == KDF and verify_secret(parse_key(flooded_text)[1], stored)
        assert not verify_secret("wrong", stored)


# -- what a key may see, and which worker ids it may use -------------------------------


@pytest.mark.trio
async def test_a_queue_limited_key_sees_only_its_queues(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with (
            running_worker(broker, queues=("a",), name="worker-a"),
            running_worker(broker, queues=("b", "a"), name="worker-ab"),
            running_worker(broker, queues=("secret",), name="worker-secret"),
            broker.client() as admin,
        ):
            await admin.submit_many([{"type": "echo", "queue": "a"}] * 2)
            await admin.submit_many([{"type": "echo", "queue": "secret"}] * 5)
            limited = await make_key(broker, "reader", queues=["a"])
            async with broker.client(key=limited) as reader:
                workers = await reader.workers()
                stats = await reader.stats()
                health = await reader.cluster_status()
            async with broker.http_client(headers={"Authorization": f"Bearer {limited}"}) as web:
                rest = {
                    name: (await web.get(f"/api/v1/{name}")).json()
                    for name in ("workers", "stats", "cluster")
                }
                metrics = (await web.get("/metrics")).text
            everything = await admin.stats()
        assert everything["workers"] == 3 and everything["counters"]["submitted"] == 7
        for seen in (workers, rest["workers"]["workers"]):
            assert sorted(w["name"] for w in seen) == ["worker-a", "worker-ab"]
            assert all(w["queues"] == ["a"] for w in seen)
        for view in (stats, rest["stats"]):
            assert set(view["queues"]) == {"a"} and view["workers"] == 2
            assert view["store"] is None and view["counters"]["submitted"] == 2
            assert "lease_expired" not in view["counters"]
        for view in (health, rest["cluster"]):
            assert view["workers"]["known"] == 2 and view["store"] is None
        # /metrics: the same view (its queues' workers), no broker-wide families
        assert "tq_workers_known 2.0" in metrics, metrics
        for family in ("tq_lease_expiries", "tq_refused_results", "tq_store_size_bytes"):
            assert family not in metrics
        assert 'queue="secret"' not in metrics


@pytest.mark.trio
async def test_a_worker_key_cannot_take_over_another_workers_id(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        first, second = await make_key(broker, "worker"), await make_key(broker, "worker")
        hello = {"worker_id": "w-1", "queues": ["a"]}
        async with broker.client(key=first, kind="worker", hello=hello):
            pass  # registered, then disconnected: the broker still knows w-1
        with pytest.raises(Forbidden, match="worker id 'w-1' is in use by a worker with another"):
            async with broker.client(key=second, kind="worker", hello=hello):
                pass
        async with broker.client(key=first, kind="worker", hello=hello) as again:
            assert again.server["worker_id"] == "w-1"  # its own key: welcome back
        async with broker.client(key=second, kind="worker", hello={"queues": ["a"]}) as fresh:
            assert fresh.server["worker_id"] != "w-1"  # no id asked for: one is assigned
        async with broker.client() as admin:  # key rotation: once the old key is revoked...
            await admin.request({"t": "keys", "op": "revoke", "key_id": parse_key(first)[0]})
        async with broker.client(key=second, kind="worker", hello=hello) as successor:
            assert successor.server["worker_id"] == "w-1"  # ...its worker id is free


# -- careless-operator defaults --------------------------------------------------------


@pytest.mark.trio
async def test_rest_refusals_are_logged_like_wire_refusals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_broker(tmp_path) as broker:
        reader = await make_key(broker, "reader", queues=["a"])
        async with broker.http_client(headers={"Authorization": "Bearer tq_0123456789ab_x"}) as bad:
            assert (await bad.get("/api/v1/stats")).status_code == 401
        async with broker.http_client(headers={"Authorization": f"Bearer {reader}"}) as web:
            assert (await web.post("/api/v1/tasks", json={"type": "x"})).status_code == 403
            assert (await web.get("/api/v1/tasks", params={"queue": "b"})).status_code == 403
        async with broker.client(key=reader) as client:
            with pytest.raises(Forbidden):
                await client.list(queue="b")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    peer = r"127\.0\.0\.1:\d+: "
    for what in (
        r"GET /api/v1/stats refused \(unauthorized\): API key 0123456789ab was refused",
        r"POST /api/v1/tasks refused \(forbidden\): key \w+ \(reader\) may not submit",
        r"GET /api/v1/tasks refused \(forbidden\): key \w+ is limited to queue\(s\) a",
        r"query refused \(forbidden\): key \w+ is limited to queue\(s\) a",  # the wire's
    ):
        assert any(re.match(peer + what, line) for line in lines), (what, lines)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.trio
@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_data_directory_and_files_are_private_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    data = tmp_path / "fresh" / "data"
    old = os.umask(umask)
    try:
        async with running_broker(data) as broker, broker.client() as client:
            await client.submit("echo", "x")  # the WAL has content
            files = [data / name for name in ("tq.db", "tq.db-wal", "tq.db-shm")]
            files += [data / "admin.key", data / "join.key", data / "tls" / "ca.key"]
            assert {str(p.relative_to(data)): _mode(p) for p in files} == {
                str(p.relative_to(data)): 0o600 for p in files
            }
            assert _mode(data) == 0o700 and _mode(data / "tls") == 0o700
    finally:
        os.umask(old)


@pytest.mark.trio
async def test_an_existing_store_open_to_others_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_broker(tmp_path):
        pass
    tmp_path.chmod(0o755)
    (tmp_path / "tq.db").chmod(0o644)
    async with running_broker(tmp_path):
        assert _mode(tmp_path / "tq.db") == 0o600
    assert f"data directory {tmp_path} is open to other users (mode 755)" in caplog.text


def _limited_tq(tmp_path: Path, ulimit: str) -> Path:
    """An executable that runs this tq under ``ulimit`` (a bash ulimit argument list)."""
    script = tmp_path / "tq-limited"
    command = " ".join(f"'{part}'" for part in tq_command())
    script.write_text(f'#!/bin/bash\nulimit {ulimit} || exit 99\nexec {command} "$@"\n')
    script.chmod(0o755)
    return script


@pytest.mark.slow
def test_a_low_open_file_limit_is_raised_or_warned_about(tmp_path: Path) -> None:
    low = _limited_tq(tmp_path, "-n 256")  # soft and hard: the broker cannot raise it
    with BrokerProcess(tmp_path / "low", executable=low) as broker:
        log = broker.log.read_text()
    assert "the open-file limit is 256, below max_connections 1024 + 128" in log, log
    assert "ulimit -n 1152" in log
    soft_only = _limited_tq(tmp_path, "-S -n 256")  # the hard limit leaves room
    with BrokerProcess(tmp_path / "soft", executable=soft_only) as broker:
        assert broker.proc is not None
        limits = Path(f"/proc/{broker.proc.pid}/limits").read_text()
        log = broker.log.read_text()
    assert "open-file limit" not in log
    soft = next(line.split()[3] for line in limits.splitlines() if "open files" in line)
    assert soft == "1152", limits
