"""Starting a broker or a worker through its serve function (not only the CLI)
freezes the start-up heap (gc.freeze), once per process."""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tq.config import Settings
from tq.core import heap
from tq.testing import running_broker
from tq.worker.handlers import builtin_registry
from tq.worker.runner import serve_worker


@pytest.fixture
def unsettled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As in a fresh process: nothing frozen yet; unfrozen again afterwards."""
    monkeypatch.setattr(heap, "_settled", False)
    gc.unfreeze()
    yield
    gc.unfreeze()  # this test's objects go back to the collector


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.trio
async def test_serve_worker_freezes_the_heap(tmp_path: Path, unsettled: None) -> None:
    assert gc.get_freeze_count() == 0
    settings = Settings(data=tmp_path, broker=f"127.0.0.1:{_closed_port()}", insecure=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_worker(settings, builtin_registry()))
        await trio.testing.wait_all_tasks_blocked()  # starting; no broker there to answer
        assert gc.get_freeze_count() > 0
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_serve_broker_freezes_the_heap_once(
    tmp_path: Path, unsettled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gc.get_freeze_count() == 0
    async with running_broker(tmp_path, http="off"):
        assert gc.get_freeze_count() > 0
    freezes: list[None] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(None))
    async with running_broker(tmp_path, http="off"):
        pass
    assert freezes == []  # a second start in the same process freezes nothing more
