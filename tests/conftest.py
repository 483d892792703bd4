from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tq.testing import BrokerProcess


@pytest.fixture
def broker_proc(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker in its own process (TLS on, short leases), stopped after the test."""
    with BrokerProcess(tmp_path / "broker", "--lease-ttl", "2") as broker:
        yield broker
