from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tq.testing import BrokerProcess

# Shared 2-core machines: judge hypothesis tests by what they find, not how fast
# inputs are generated or examples run.
settings.register_profile(
    "tq", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("tq")


@pytest.fixture
def broker_proc(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker in its own process (TLS on, short leases), stopped after the test."""
    with BrokerProcess(tmp_path / "broker", "--lease-ttl", "2") as broker:
        yield broker
