"""Attacks from outside testing, each with the behaviour that defeats it.

Mutual TLS on both ports, logins that failed attempts cannot slow down,
refusals that tell an attacker nothing, keys that see only their queues,
worker ids bound to their key, and the careless-operator defaults (file
modes, the open-file limit, refusals in the log). docs/SECURITY.md's
"Tested attacks" table points here.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from tq.client import BlockingClient
from tq.core.errors import TLSFailure
from tq.security.tls import TLSFiles, issue_client_cert
from tq.testing import BrokerProcess, running_broker, tq_command

REJECTED = "rejected this client's certificate"


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
