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
from tq.core.errors import TLSFailure, TQError, Unauthorized
from tq.security.keys import KDF, LEGACY_KDF, hash_secret, new_key, parse_key, verify_secret
from tq.security.tls import TLSFiles, issue_client_cert
from tq.store.sqlite import open_sqlite_store
from tq.testing import BrokerProcess, RunningBroker, running_broker, tq_command

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
