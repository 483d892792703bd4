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
from tq.client.asyncio_client import AsyncioClient
from tq.config import Settings
from tq.worker.executable import ExecHandler
from tq.worker.handlers import HandlerRegistry, builtin_registry
from tq.worker.runner import serve_worker


@dataclass
class RunningBroker:
    info: BrokerInfo
    settings: Settings  # client-side settings: broker address, CA and admin key filled in
    shutdown: trio.Event

    @property
    def key(self) -> str | None:
        """The admin key the broker created on first start (None with ``auth=False``)."""
        return self.settings.key

    def client(self, **kwargs: Any) -> Any:
        return Client.from_settings(self.settings, **kwargs)

    def http_client(self, **kwargs: Any) -> Any:
        """An ``httpx.AsyncClient`` for the broker's REST API (CA and admin key set)."""
        return _http_client(self.info.http, self.info.ca_file, self.key, True, **kwargs)

    def blocking_client(self, **kwargs: Any) -> BlockingClient:
        return BlockingClient.from_settings(self.settings, **kwargs)


def test_settings(data: Path, **overrides: Any) -> Settings:
    base = Settings(
        data=data, listen="127.0.0.1:0", http="127.0.0.1:0", lease_ttl=5.0, shutdown_grace=5.0
    )
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
        client_settings = dataclasses.replace(
            settings, broker=info.address, ca=info.ca_file, key=_admin_key(info.admin_key_file)
        )
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


def _admin_key(path: Path | None) -> str | None:
    if path is None or not path.exists():
        return None
    return path.read_text(encoding="utf-8").strip() or None


# -- separate processes ----------------------------------------------------

_LISTENING = re.compile(r"tq broker listening on (\S+)")
_HTTP = re.compile(r"  HTTP API: (\S+)")


def _http_client(
    url: str | None, ca: Path | None, key: str | None, asynchronous: bool, **kwargs: Any
) -> Any:
    import ssl

    import httpx  # a test dependency (the dev extra), not a runtime one

    if url is None:
        raise RuntimeError("this broker serves no HTTP (--http off)")
    verify = ssl.create_default_context(cafile=str(ca)) if ca is not None else False
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kwargs.pop("headers", {})}
    cls = httpx.AsyncClient if asynchronous else httpx.Client
    return cls(base_url=url, verify=verify, headers=headers, timeout=30.0, **kwargs)


def tq_command(*args: str) -> list[str]:
    """The command line that runs this tq: ``python -P -m tq``, or the frozen executable
    itself when this code runs inside it (PyInstaller's sys.executable is the tq binary).

    ``-P``: ``python -m`` would put the working directory first on ``sys.path``, so a
    stray script there named like a module tq imports would replace that module in
    every broker, worker and probe ``tq bench`` starts (a ``timeit.py`` calling
    ``trio.run`` at import: the broker failed with "run() inside run()" as it
    started its HTTP side, whose prometheus_client imports timeit). PYTHONPATH
    still applies."""
    if getattr(sys, "frozen", False):
        return [sys.executable, *args]
    return [sys.executable, "-P", "-m", "tq", *args]


class BrokerProcess:
    """``python -m tq broker`` in its own process, logging to a file.

    ``executable`` runs another tq instead (e.g. the PyInstaller build dist/tq),
    for the broker and the workers it starts.
    """

    def __init__(
        self,
        data: Path,
        *args: str,
        env: dict[str, str] | None = None,
        executable: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data = data
        self.args = args
        self.command = [os.fspath(executable)] if executable else tq_command()
        self.frozen = executable is not None or bool(getattr(sys, "frozen", False))
        self.env = {**os.environ, **(env or {})}
        self.log = data / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.http = ""  # the REST API's URL once started ("" with --http off)
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def ca(self) -> Path:
        return self.data / "tls" / "ca.pem"

    def start(self, listen: str = "127.0.0.1:0", timeout: float = 20.0) -> BrokerProcess:
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the broker would
        offset = self.log.stat().st_size if self.log.exists() else 0
        http = [] if "--http" in self.args else ["--http", "127.0.0.1:0"]  # never a fixed port
        args = ["--data", str(self.data), "--listen", listen, *http, *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "broker", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            match = _LISTENING.search(text)
            web = _HTTP.search(text)
            if match and (web or "--http" in self.args):
                self.address = match.group(1)
                self.http = web.group(1) if web else ""
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"broker did not start within {timeout}s:\n{self.log.read_text()}")

    @property
    def key(self) -> str | None:
        """The admin key the broker wrote on first start (None if it runs --no-auth)."""
        return _admin_key(self.data / "admin.key")

    def client_args(self) -> list[str]:
        key = self.key
        return ["--broker", self.address, "--ca", str(self.ca), *(["--key", key] if key else [])]

    def client_kwargs(self) -> dict[str, Any]:
        """Credentials for ``Client.connect``/``BlockingClient`` besides address and CA."""
        key = self.key
        return {"key": key} if key else {}

    def client(self) -> BlockingClient:
        return BlockingClient(self.address, ca=self.ca, **self.client_kwargs())

    async def asyncio_client(self, **kwargs: Any) -> AsyncioClient:
        """An ``AsyncioClient`` connected to this broker (close it with ``aclose``)."""
        return await AsyncioClient.open(self.address, ca=self.ca, **self.client_kwargs(), **kwargs)

    def http_client(self, **kwargs: Any) -> Any:
        """An ``httpx.Client`` for the broker's REST API (CA and admin key set)."""
        ca = None if "--insecure" in self.args else self.ca
        return _http_client(self.http or None, ca, self.key, False, **kwargs)

    def start_worker(self, *args: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
        log_path = self.data / (log_name or f"worker{len(self.workers)}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*self.command, "worker", *self.client_args(), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, count: int = 1, timeout: float = 30.0) -> None:
        """Block until ``count`` workers are connected to this broker."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while sum(w["connected"] for w in client.workers()) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} worker(s) did not connect within {timeout}s")
                time.sleep(0.05)

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
            if proc.poll() is None and self.frozen:
                # a one-file executable is a bootloader and a child: SIGKILL to the
                # bootloader would orphan the child, SIGTERM is forwarded to it
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(20)
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
