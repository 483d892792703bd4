"""Helpers for tests (tq's own and users'): real brokers and workers on loopback.

In-process, under trio:

    async with running_broker(tmp_path) as broker:          # TLS on, port 0
        async with broker.client() as client:
            await client.submit("echo", {"x": 1})

As separate processes (for kill -9 tests and the CLI):

    with BrokerProcess(tmp_path) as broker:
        worker = broker.start_worker("--concurrency", "4")
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tq.broker.server import BrokerInfo, serve_broker
from tq.client import BlockingClient, Client
from tq.config import Settings
from tq.worker.executable import ExecHandler
from tq.worker.handlers import HandlerRegistry, builtin_registry
from tq.worker.runner import serve_worker


@dataclass
class RunningBroker:
    info: BrokerInfo
    settings: Settings  # client-side settings: broker address and CA filled in
    shutdown: trio.Event

    def client(self, **kwargs: Any) -> Any:
        return Client.from_settings(self.settings, **kwargs)

    def blocking_client(self, **kwargs: Any) -> BlockingClient:
        return BlockingClient.from_settings(self.settings, **kwargs)


def test_settings(data: Path, **overrides: Any) -> Settings:
    base = Settings(data=data, listen="127.0.0.1:0", lease_ttl=5.0, shutdown_grace=5.0)
    return dataclasses.replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@contextlib.asynccontextmanager
async def running_broker(data: Path, **overrides: Any) -> AsyncIterator[RunningBroker]:
    """A broker in this trio run, on 127.0.0.1:0 with TLS from a fresh CA in ``data``."""
    settings = test_settings(data, **overrides)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        info: BrokerInfo = await nursery.start(
            lambda task_status: serve_broker(settings, shutdown=shutdown, task_status=task_status)
        )
        client_settings = dataclasses.replace(settings, broker=info.address, ca=info.ca_file)
        yield RunningBroker(info, client_settings, shutdown)
        shutdown.set()


@contextlib.asynccontextmanager
async def running_worker(
    broker: RunningBroker,
    registry: HandlerRegistry | None = None,
    exec_handlers: dict[str, ExecHandler] | None = None,
    **overrides: Any,
) -> AsyncIterator[str]:
    """A worker in this trio run connected to ``broker``; yields its id."""
    settings = dataclasses.replace(broker.settings, **overrides)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        worker_id: str = await nursery.start(
            lambda task_status: serve_worker(
                settings,
                registry or builtin_registry(),
                exec_handlers,
                shutdown=stop,
                task_status=task_status,
            )
        )
        yield worker_id
        stop.set()


# -- separate processes ----------------------------------------------------

_LISTENING = re.compile(r"tq broker listening on (\S+)")


def tq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tq", *args]


class BrokerProcess:
    """``python -m tq broker`` in its own process, logging to a file."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log = data / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def ca(self) -> Path:
        return self.data / "tls" / "ca.pem"

    def start(self, listen: str = "127.0.0.1:0", timeout: float = 20.0) -> BrokerProcess:
        self.data.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                tq_command("broker", "--data", str(self.data), "--listen", listen, *self.args),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            match = _LISTENING.search(text)
            if match:
                self.address = match.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"broker did not start within {timeout}s:\n{self.log.read_text()}")

    def client_args(self) -> list[str]:
        return ["--broker", self.address, "--ca", str(self.ca)]

    def client_kwargs(self) -> dict[str, Any]:
        """Credentials for ``Client.connect``/``BlockingClient`` besides address and CA."""
        return {}

    def client(self) -> BlockingClient:
        return BlockingClient(self.address, ca=self.ca, **self.client_kwargs())

    def start_worker(self, *args: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
        log_path = self.data / (log_name or f"worker{len(self.workers)}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                tq_command("worker", *self.client_args(), *args),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.workers.append(proc)
        return proc

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        for proc in [*self.workers, *([self.proc] if self.proc else [])]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    def __enter__(self) -> BrokerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def tq_env(home: Path) -> Iterator[dict[str, str]]:
    """An environment where platformdirs paths live under ``home`` (a new user)."""
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
    }
    for key in list(env):
        if key.startswith("TQ_"):
            del env[key]
    yield env
