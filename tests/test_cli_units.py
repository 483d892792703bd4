"""Pure parts of the CLI, unit-tested: `tq submit -` batching under trio's fake clock,
the services' signal rule, settings sources."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from tq.cli import stdin_submit


@pytest.mark.trio
async def test_batches_leave_at_size_or_after_the_flush_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lines_send, lines_recv = trio.open_memory_channel[Any](10)
    out_send, out_recv = trio.open_memory_channel[Any](10)
    got: list[tuple[float, list[int]]] = []

    async def collect() -> None:
        async for batch in out_recv:
            got.append((trio.current_time(), [number for number, _ in batch]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stdin_submit._batches, lines_recv, out_send)
        nursery.start_soon(collect)
        start = trio.current_time()
        await lines_send.send([(n, {}) for n in range(1, 601)])  # 2 full batches and 100
        await trio.sleep(0.05)
        assert [len(b) for _, b in got] == [250, 250]
        await trio.sleep(1)
        assert [len(b) for _, b in got] == [250, 250, 100]
        assert got[2][0] - start == pytest.approx(stdin_submit.FLUSH_SECONDS)
        await lines_send.send([(601, {})])
        await lines_send.send([(602, {})])
        await trio.sleep(10)  # no more input, stdin open: the two lines still leave
        assert got[3][1] == [601, 602]
        await lines_send.aclose()
    assert len(got) == 4


def test_from_list_keeps_only_what_a_submission_carries() -> None:
    listed = {
        "id": "x", "type": "echo", "queue": "q", "state": "dead", "priority": 200,
        "attempts": 3, "max_retries": 2, "payload": {"a": 1}, "result": None,
        "error": {"type": "E"}, "created_at": 1.0, "worker": "w", "timeout": 5.0,
    }  # fmt: skip
    assert stdin_submit.from_list(listed) == {
        "type": "echo", "queue": "q", "priority": 200, "max_retries": 2,
        "payload": {"a": 1}, "timeout": 5.0,
    }  # fmt: skip


# -- settings: one table, every source named on a bad value ------------------------------


def test_settings_table_matches_every_command_and_the_docs() -> None:
    from pathlib import Path

    from tq.cli import settings_table

    assert settings_table.problems() == []
    docs = (Path(__file__).parent.parent / "docs" / "OPERATIONS.md").read_text()
    assert settings_table.markdown() in docs, "run: python -m tq.cli.settings_table"


def test_a_bad_value_names_its_source(tmp_path: Any) -> None:
    from tq.config import load_settings
    from tq.core.errors import ConfigError

    none = tmp_path / "none.toml"
    with pytest.raises(ConfigError, match=r"^TQ_GRACE=abc: not a number of seconds$"):
        load_settings(env={"TQ_GRACE": "abc"}, config_file=none)
    assert load_settings(env={"TQ_GRACE": "7"}, config_file=none).shutdown_grace == 7.0
    assert load_settings(env={"TQ_SHUTDOWN_GRACE": "8"}, config_file=none).shutdown_grace == 8.0
    with pytest.raises(ConfigError, match=r"^--log-format xml: expected human or json$"):
        load_settings({"log_format": "xml"}, env={}, config_file=none)
    config = tmp_path / "config.toml"
    config.write_text('log_format = "json"\ngrace = 5\nlease_ttl = -1\n')
    with pytest.raises(
        ConfigError, match=r"config file .*config.toml: lease_ttl = -1: must be > 0"
    ):
        load_settings(env={}, config_file=config)
    config.write_text('log_format = "json"\ngrace = 5\n')
    loaded = load_settings(env={}, config_file=config)
    assert (loaded.log_format, loaded.shutdown_grace) == ("json", 5.0)
    with pytest.raises(ConfigError, match=r"^TQ_CONCURRENCY=2.5: not a whole number$"):
        load_settings(env={"TQ_CONCURRENCY": "2.5"}, config_file=none)


def test_one_keypress_delivered_twice_is_one_graceful_stop() -> None:
    from tq.cli.services import DUPLICATE_WINDOW, SignalRule

    rule = SignalRule()
    assert rule.on_signal(100.0) == "graceful"
    assert rule.on_signal(100.0 + 0.01) == "duplicate"  # bootloader + terminal
    assert rule.on_signal(100.0 + DUPLICATE_WINDOW - 0.01) == "duplicate"
    assert rule.on_signal(100.0 + DUPLICATE_WINDOW + 0.5) == "now"  # a real second Ctrl-C
