"""Issue 4: API keys and roles, mutual TLS, join tokens, limits, audit.

In-process brokers (``running_broker``) for the protocol behaviour; broker
and worker processes (``BrokerProcess``) where the CLI is the subject.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import stat
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import apsw
import msgspec
import pytest
import trio

from tq.broker.auth import Auth, key_info
from tq.client.aio import open_stream
from tq.core.errors import (
    ConfigError,
    Forbidden,
    FrameTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    Timeout,
    TLSFailure,
    Unauthorized,
    Unavailable,
)
from tq.protocol import Connection
from tq.security.keys import new_key, parse_key, verify_secret
from tq.security.limits import RateLimiter, TokenBucket
from tq.security.tls import TLSFiles, ensure_broker_tls, issue_client_cert
from tq.security.tokens import decode_join_token, encode_join_token
from tq.store.sqlite import open_sqlite_store
from tq.testing import (
    BrokerProcess,
    RunningBroker,
    running_broker,
    running_worker,
    tq_command,
    tq_env,
)

NOW = 1_800_000_000.0


async def make_key(broker: RunningBroker, role: str, **fields: Any) -> str:
    async with broker.client() as admin:
        reply = await admin.request({"t": "keys", "op": "create", "role": role, **fields})
    return str(reply["key"])


async def read_until_closed(stream: trio.abc.Stream, seconds: float = 10) -> bytes:
    data = b""
    with trio.fail_after(seconds):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


def first_message(data: bytes) -> dict[str, Any] | None:
    conn = Connection()
    conn.receive_data(data)
    return conn.next_message()


# -- pure pieces -----------------------------------------------------------------------


def test_key_text_parses_and_only_its_secret_verifies() -> None:
    text, record = new_key("ci", "producer", now=NOW, queues=("a",))
    key_id, secret = parse_key(text)
    assert key_id == record.id and text.startswith(f"tq_{key_id}_")
    assert verify_secret(secret, record) and not verify_secret(secret + "x", record)
    public = msgspec.to_builtins(key_info(record, NOW))
    assert public["state"] == "active" and not {"hash", "salt", "kdf"} & public.keys()
    for bad in ("", "tq_x_y", "tq_0123456789ab_", "xx_0123456789ab_secret", 42):
        with pytest.raises(Unauthorized):
            parse_key(bad)
    with pytest.raises(InvalidRequest, match="role"):
        new_key("x", "superuser", now=NOW)


def test_token_bucket_refills_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=10.0, burst=20.0, tokens=20.0, stamp=NOW)
    assert bucket.take(20, NOW) == 0.0
    assert bucket.take(5, NOW) == pytest.approx(0.5)
    assert bucket.take(5, NOW + 0.5) == 0.0
    limiter = RateLimiter(rate=10.0, burst=20.0)
    with pytest.raises(InvalidRequest, match="smaller batches"):
        limiter.take("k", 21, NOW)
    limiter.take("k", 20, NOW)
    with pytest.raises(RateLimited) as info:
        limiter.take("k", 1, NOW)
    assert info.value.retry_after == pytest.approx(0.1)
    limiter.take("other", 20, NOW)  # buckets are per key


def test_join_token_round_trip_and_damage(tmp_path: Path) -> None:
    files, _ = ensure_broker_tls(tmp_path / "tls")
    key, _ = new_key("join", "worker", now=NOW)
    text = encode_join_token(["h1:7470", "[::1]:7470"], files.ca_cert.read_bytes(), key)
    token = decode_join_token(text)
    assert token.addresses == ("h1:7470", "[::1]:7470") and token.key == key
    assert token.broker == "h1:7470,[::1]:7470" and token.ca_pem.startswith("-----BEGIN")
    assert len(text) < 1000  # a few hundred bytes: fits a command line
    for bad in ("nope", "tqj1_!!!", "tqj1_" + base64.urlsafe_b64encode(b"\x91\x01").decode()):
        with pytest.raises(ConfigError, match="join token"):
            decode_join_token(bad)


# -- keys ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.trio
async def test_first_start_creates_an_admin_key_once(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        assert broker.info.admin_key_created and broker.key is not None
        assert stat.S_IMODE((tmp_path / "admin.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "join.key").stat().st_mode) == 0o600
        first = broker.key
    async with running_broker(tmp_path) as broker:
        assert not broker.info.admin_key_created and broker.key == first
        async with broker.client() as client:
            assert client.server["role"] == "admin"


@pytest.mark.trio
async def test_a_revoked_key_is_refused_on_its_next_request(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as admin:
        key = await make_key(broker, "producer", name="ci")
        async with broker.client(key=key) as producer:
            await producer.submit("echo", 1)
            key_id = parse_key(key)[0]
            await admin.request({"t": "keys", "op": "revoke", "key_id": key_id})
            with pytest.raises(Unauthorized, match="revoked"):
                await producer.submit("echo", 2)
            with pytest.raises(Unauthorized):  # and the connection is closed
                await producer.submit("echo", 3)
        with pytest.raises(Unauthorized, match="revoked"):
            async with broker.client(key=key):
                pass
        assert len((await admin.list()).tasks) == 1


@pytest.mark.trio
async def test_an_expired_key_is_refused(tmp_path: Path) -> None:
    now = [NOW]
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        auth = Auth(store, clock=lambda: now[0])
        text, _ = await auth.create_key(None, role="reader", expires_at=NOW + 60)
        principal = await auth.authenticate(text)
        auth.check(principal)
        now[0] += 60  # time is an argument: no sleeping
        with pytest.raises(Unauthorized, match="expired"):
            auth.check(principal)  # the check before every request
        with pytest.raises(Unauthorized, match="expired"):
            await auth.authenticate(text)  # and at hello


@pytest.mark.trio
async def test_create_key_reads_queues_as_parse_queues_does(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        auth = Auth(store, clock=lambda: NOW)
        _, listed = await auth.create_key(None, role="producer", queues=["a", "b", "a"])
        _, text = await auth.create_key(None, role="producer", queues="a, b")
        assert listed.queues == text.queues == ("a", "b")  # a string is not its characters
        with pytest.raises(InvalidRequest, match="queues"):
            await auth.create_key(None, role="producer", queues=[])


@pytest.mark.slow
@pytest.mark.trio
async def test_a_reload_racing_a_revocation_keeps_the_key_revoked(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "tq.db") as store:
        auth = Auth(store)
        text, key = await auth.create_key(None, role="producer")
        principal = await auth.authenticate(text)
        stale = store.list_keys

        async def revoke_during_read() -> list[Any]:
            keys = await stale()  # the snapshot is taken, then the revocation commits
            await auth.revoke_key(None, key.id)
            return keys

        store.list_keys = revoke_during_read  # type: ignore[method-assign]
        await auth.load()
        with pytest.raises(Unauthorized, match="revoked"):
            auth.check(principal)


@pytest.mark.slow
@pytest.mark.trio
async def test_the_stored_key_table_holds_no_secret_that_validates(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        keys = [await make_key(broker, "producer"), str(broker.key)]
        conn = apsw.Connection(str(tmp_path / "tq.db"), flags=apsw.SQLITE_OPEN_READONLY)
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
        conn.close()
        assert len(rows) == 3  # + the join token's worker key
        stored = (tmp_path / "tq.db").read_bytes() + (tmp_path / "tq.db-wal").read_bytes()
        for key in keys:
            assert parse_key(key)[1].encode() not in stored  # no secret, anywhere in the file
        tried = refused = 0

        async def attempt(key: str) -> None:
            nonlocal refused
            try:
                async with broker.client(key=key):
                    pass
            except Unauthorized:
                refused += 1

        async with trio.open_nursery() as nursery:  # refusals take a while: all at once
            for row in rows:  # every stored value, as the secret of its own key id
                candidates: set[str] = set()
                for cell in row:
                    if isinstance(cell, bytes):
                        candidates |= {
                            cell.hex(),
                            base64.urlsafe_b64encode(cell).decode().rstrip("="),
                        }
                    elif isinstance(cell, str):
                        candidates.add(cell)
                for candidate in candidates:
                    tried += 1
                    nursery.start_soon(attempt, f"tq_{row[0]}_{candidate}")
        assert tried == refused > 3 * 6


@pytest.mark.trio
async def test_queue_limited_keys_stay_in_their_queues(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as admin:
        other = await admin.submit("echo", queue="b")
        key = await make_key(broker, "producer", queues=["a"])
        async with broker.client(key=key) as producer:
            mine = await producer.submit("echo", queue="a")
            with pytest.raises(Forbidden, match="limited to queue"):
                await producer.submit("echo", queue="b")
            with pytest.raises(Forbidden):
                await producer.get(other)
            with pytest.raises(Forbidden):
                await producer.cancel(other)
            assert [t.id for t in (await producer.list()).tasks] == [mine]
            assert set((await producer.stats())["queues"]) == {"a"}
            assert (await producer.cancel(mine)).state == "cancelled"
        async with broker.client(key=key) as producer:
            with pytest.raises(Forbidden, match="every queue"):
                await producer.request({"t": "subscribe", "topics": ["tasks"]})
        worker_key = await make_key(broker, "worker", queues=["a"])
        async with broker.client(key=worker_key, kind="worker") as worker:
            with pytest.raises(Forbidden):
                await worker.request({"t": "claim", "n": 1, "queues": ["b"], "wait": 0.01})


@pytest.mark.trio
async def test_audit_records_who_did_what(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as admin:
        key = await make_key(broker, "producer", name="ci")
        key_id = parse_key(key)[0]
        async with broker.client(key=key) as producer:
            task = await producer.submit("echo")
            await producer.cancel(task)
        await admin.retry(task)
        await admin.request({"t": "keys", "op": "revoke", "key_id": key_id})
        entries = (await admin.request({"t": "audit", "limit": 10}))["entries"]
        admin_id = parse_key(str(broker.key))[0]
        got = [(e["actor"], e["action"], e["target"]) for e in entries[:4]]
        assert got == [
            (admin_id, "key.revoke", key_id),
            (admin_id, "task.retry", task),
            (key_id, "task.cancel", task),
            (admin_id, "key.create", key_id),
        ]
        assert entries[0]["at"] <= time.time() and entries[-1]["action"] == "key.create"


@pytest.mark.trio
async def test_no_auth_broker_needs_no_key(tmp_path: Path) -> None:
    async with running_broker(tmp_path, auth=False) as broker:
        assert not broker.info.auth and broker.key is None
        assert not (tmp_path / "admin.key").exists()
        async with broker.client(key=None) as client:
            assert (await client.get(await client.submit("echo"))).state == "pending"
            assert client.server["role"] is None


# -- limits ----------------------------------------------------------------------------


@pytest.mark.trio
async def test_rate_limit_nacks_one_producer_and_not_another(tmp_path: Path) -> None:
    async with running_broker(tmp_path, submit_rate=5.0, submit_burst=10.0) as broker:
        first, second = await make_key(broker, "producer"), await make_key(broker, "producer")
        async with broker.client(key=first) as a, broker.client(key=second) as b:
            await a.submit_many([{"type": "echo"}] * 10)
            with pytest.raises(RateLimited) as info:
                await a.submit("echo")
            assert 0 < (info.value.retry_after or 0) <= 0.2 + 1e-6
            assert "retry after" in info.value.message
            assert len(await b.submit_many([{"type": "echo"}] * 10)) == 10  # unaffected
            await trio.sleep(info.value.retry_after or 0)
            await a.submit("echo")  # refilled
        async with broker.client() as admin:  # admin keys are not limited
            await admin.submit_many([{"type": "echo"}] * 10)
            await admin.submit_many([{"type": "echo"}] * 10)


@pytest.mark.trio
async def test_a_worker_whose_key_is_revoked_stops(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as admin:
        key = await make_key(broker, "worker")
        with pytest.RaisesGroup(
            pytest.RaisesExc(Unauthorized, match="revoked"), flatten_subgroups=True
        ):
            async with running_worker(broker, key=key):
                await admin.request({"t": "keys", "op": "revoke", "key_id": parse_key(key)[0]})
                await trio.sleep(30)  # the worker's next claim (within ~1 s) is refused


@pytest.mark.trio
async def test_payload_limit_is_a_setting(tmp_path: Path) -> None:
    async with running_broker(tmp_path, max_payload=100) as broker, broker.client() as client:
        await client.submit("echo", "x" * 50)
        with pytest.raises(PayloadTooLarge, match="limit is 100 bytes"):
            await client.submit("echo", "x" * 200)
    too_big = pytest.RaisesExc(ConfigError, match="max_payload")
    with pytest.RaisesGroup(too_big, flatten_subgroups=True):
        async with running_broker(tmp_path, max_payload=11 * 1024 * 1024):
            pass


@pytest.mark.trio
async def test_frames_before_hello_are_small(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
        await stream.send_all(struct.pack(">I", 1 << 20))  # a 1 MiB frame, unauthenticated
        nack = first_message(await read_until_closed(stream))
        assert nack is not None and nack["code"] == FrameTooLarge.code
        await stream.aclose()


@pytest.mark.slow
@pytest.mark.trio
async def test_idle_connections_are_closed_with_a_reason(tmp_path: Path) -> None:
    async with running_broker(tmp_path, idle_timeout=0.3) as broker:
        async with broker.client() as client:
            await client.stats()
            await trio.sleep(0.8)
            with pytest.raises(Timeout, match="idle"):
                await client.stats()
            async with broker.client() as busy:  # a long wait in flight is not idleness
                task = await busy.submit("echo")
                assert (await busy.request({"t": "wait", "task": task, "timeout": 0.8}))[
                    "timed_out"
                ]
                await busy.stats()


@pytest.mark.trio
async def test_connection_limit_refuses_with_a_reason(tmp_path: Path) -> None:
    async with running_broker(tmp_path, max_connections=1) as broker, broker.client() as first:
        with pytest.raises(Unavailable, match="connection limit"):
            async with broker.client():
                pass
        await first.stats()


@pytest.mark.trio
async def test_slow_loris_and_plaintext_clients_do_not_stop_a_worker(tmp_path: Path) -> None:
    async with running_broker(tmp_path, handshake_timeout=0.5, hello_timeout=0.5) as broker:
        host, port = broker.info.address.rsplit(":", 1)
        silent = await trio.open_tcp_stream(host, int(port))  # never starts TLS
        no_hello = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
        trickle = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
        plain = await trio.open_tcp_stream(host, int(port))
        await plain.send_all(Connection().send({"t": "hello", "id": 1, "v": 1, "kind": "x"}))
        async with running_worker(broker), broker.client() as client:
            async with trio.open_nursery() as nursery:

                async def drip() -> None:
                    hello = Connection().send({"t": "hello", "id": 1, "v": 1, "kind": "client"})
                    try:
                        for byte in hello:
                            await trickle.send_all(bytes([byte]))
                            await trio.sleep(0.1)
                    except trio.BrokenResourceError:
                        pass  # dropped by the broker: the point of the test

                nursery.start_soon(drip)
                ids = [await client.submit("echo", n) for n in range(20)]
                results = [(await client.wait(i, timeout=20)).result for i in ids]
                assert results == list(range(20))
                nack = first_message(await read_until_closed(plain))
                assert nack is not None and nack["code"] == "tls"
                assert "speaks TLS" in nack["message"]
                assert await read_until_closed(silent, 5) == b""
                closed = first_message(await read_until_closed(no_hello, 5))
                assert closed is not None and "no accepted hello" in closed["message"]
                assert first_message(await read_until_closed(trickle, 5)) is not None
                nursery.cancel_scope.cancel()
        for stream in (silent, no_hello, trickle, plain):
            await trio.aclose_forcefully(stream)


# -- mutual TLS ------------------------------------------------------------------------


@pytest.mark.trio
async def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    async with running_broker(tmp_path, require_client_cert=True) as broker:
        with pytest.raises(TLSFailure, match="certificate"):
            async with broker.client() as client:
                await client.stats()
        cert, key = issue_client_cert(TLSFiles.in_dir(tmp_path / "tls"), "ops", tmp_path / "c")
        assert stat.S_IMODE(cert.stat().st_mode) == stat.S_IMODE(key.stat().st_mode) == 0o600
        async with broker.client(client_cert=cert, client_key=key) as client:
            assert (await client.stats())["queues"] == {}
        other, _ = ensure_broker_tls(tmp_path / "elsewhere")  # a certificate from another CA
        stranger = issue_client_cert(other, "stranger", tmp_path / "strangers")
        with pytest.raises(TLSFailure):
            async with broker.client(client_cert=stranger[0], client_key=stranger[1]) as client:
                await client.stats()


# -- join tokens -----------------------------------------------------------------------


@pytest.mark.trio
async def test_a_worker_with_only_a_join_token_runs_tasks(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.client() as client:
        token = broker.info.join_token
        assert token is not None and broker.info.address in decode_join_token(token).addresses
        elsewhere = tmp_path / "other-machine"  # no CA file, no admin key there
        async with running_worker(broker, join=token, data=elsewhere, ca=None, key=None):
            task = await client.wait(await client.submit("echo", "joined"), timeout=20)
        assert task.result == "joined"


@pytest.mark.trio
async def test_a_join_token_for_another_ca_is_refused(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        token = decode_join_token(str(broker.info.join_token))
        other, _ = ensure_broker_tls(tmp_path / "other-ca")
        forged = encode_join_token(token.addresses, other.ca_cert.read_bytes(), token.key)
        settings = dataclasses.replace(broker.settings, join=forged, ca=None, key=None)
        from tq.client import Client

        with pytest.raises(TLSFailure, match="CA in the join token"):
            async with Client.from_settings(settings):
                pass


# -- the command line ------------------------------------------------------------------


def tq(
    broker: BrokerProcess, *args: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    conn = ["--broker", broker.address, "--ca", str(broker.ca), "--key", key or str(broker.key)]
    return subprocess.run(tq_command(*args, *conn), capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_keys_audit_and_exit_statuses_from_the_cli(broker_proc: BrokerProcess) -> None:
    made = tq(broker_proc, "keys", "create", "--role", "producer", "--name", "ci", "-q", "a,b")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("tq_") and "shown only now" in made.stderr
    listed = tq(broker_proc, "keys", "list", "--json")
    assert listed.returncode == 0 and parse_key(key)[0] in listed.stdout
    assert key not in listed.stdout
    forbidden = tq(broker_proc, "keys", "list", key=key)
    assert forbidden.returncode == 7 and "may not keys list" in forbidden.stderr
    submitted = tq(broker_proc, "submit", "echo", "--queue", "a", key=key)
    assert submitted.returncode == 0, submitted.stderr
    assert tq(broker_proc, "keys", "revoke", key).returncode == 0
    refused = tq(broker_proc, "submit", "echo", "--queue", "a", key=key)
    assert refused.returncode == 7 and "revoked" in refused.stderr
    audit = tq(broker_proc, "audit", "--output", "jsonl")
    assert audit.returncode == 0
    assert [line for line in audit.stdout.splitlines() if "key.revoke" in line]
    offline = subprocess.run(
        tq_command("keys", "create", "--role", "reader", "--data", str(broker_proc.data)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert offline.returncode == 0, offline.stderr  # a running broker accepts it at once
    assert tq(broker_proc, "stats", key=offline.stdout.strip()).returncode == 0
    log = broker_proc.log.read_text()
    assert "refused (unauthorized)" in log and "refused (forbidden)" in log


@pytest.mark.slow
def test_worker_on_another_machine_joins_with_the_printed_token(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        match = re.search(r"tq worker --join (tqj1_\S+)", broker.log.read_text())
        assert match, broker.log.read_text()
        with tq_env(tmp_path / "remote-home") as env:  # a new user: no CA, no key, no config
            worker = subprocess.Popen(
                tq_command("worker", "--join", match.group(1)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            broker.workers.append(worker)
            with broker.client() as client:
                assert client.wait(client.submit("echo", 7), timeout=30).result == 7
            other, _ = ensure_broker_tls(tmp_path / "another-broker")
            real = decode_join_token(match.group(1))
            forged = encode_join_token(real.addresses, other.ca_cert.read_bytes(), real.key)
            refused = subprocess.run(
                tq_command("worker", "--join", forged),
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
        assert refused.returncode == 4 and "CA in the join token" in refused.stderr


@pytest.mark.slow
def test_ca_issue_writes_private_files(tmp_path: Path, broker_proc: BrokerProcess) -> None:
    out = subprocess.run(
        tq_command(
            "ca",
            "issue",
            "ops-laptop",
            "--data",
            str(broker_proc.data),
            "--out",
            str(tmp_path / "certs"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for name in ("ops-laptop.pem", "ops-laptop.key"):
        assert stat.S_IMODE((tmp_path / "certs" / name).stat().st_mode) == 0o600
    audit = tq(broker_proc, "audit", "--output", "jsonl")
    assert "cert.issue" in audit.stdout
