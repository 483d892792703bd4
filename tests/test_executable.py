"""Executable handlers: the stdin/env/stdout/exit-status contract, process groups, limits."""

from __future__ import annotations

import base64
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tq.core.errors import ConfigError
from tq.worker import executable
from tq.worker.executable import (
    EXIT_RETRY,
    ExecHandler,
    ExecOutcome,
    parse_exec_spec,
    run_executable,
)

FIXTURES = Path(__file__).parent / "fixtures"
PROG = str(FIXTURES / "prog.py")


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    # An unreaped subprocess.Popen warns (ResourceWarning) when collected;
    # collect here so such a warning fails the test that caused it.
    yield
    gc.collect()


def prog(*args: str) -> ExecHandler:
    return ExecHandler("t", (sys.executable, PROG, *args))


async def run(handler: ExecHandler, payload: Any = None, timeout: float = 10.0) -> ExecOutcome:
    return await run_executable(
        handler, task_id="T1", attempt=1, token=7, payload=payload, timeout=timeout
    )


def alive(pid: int) -> bool:
    """Is ``pid`` running? A zombie (an orphan not reaped yet) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def assert_dies(*pids: int, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.02)


async def wait_for_pids(path: Path) -> list[int]:
    with trio.fail_after(5):
        while not path.exists():
            await trio.sleep(0.02)
    return [int(p) for p in path.read_text().split()]


# --------------------------------------------------------------------------- success


@pytest.mark.trio
async def test_echo_returns_the_payload() -> None:
    payload = {"a": [1, 2.5, "é"], "b": None, "c": {"d": True}}
    out = await run(prog("echo"), payload)
    assert out == ExecOutcome("ok", result=payload)


@pytest.mark.trio
async def test_environment_and_stdin() -> None:
    out = await run_executable(
        prog("env"),
        task_id="01HXYZ",
        attempt=3,
        token=42,
        payload={"bin": b"\x00\xff"},
        timeout=10,
        extra_env={"TQ_EXTRA": "x", "TQ_TASK_ID": "not this"},
    )
    assert out.status == "ok", out
    assert out.result == {
        "TQ_TASK_ID": "01HXYZ",
        "TQ_TASK_TYPE": "t",
        "TQ_ATTEMPT": "3",
        "TQ_LEASE_TOKEN": "42",
        "TQ_EXTRA": "x",
        "stdin": '{"bin":"' + base64.b64encode(b"\x00\xff").decode() + '"}\n',
    }


@pytest.mark.trio
async def test_tq_secrets_are_not_passed_to_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQ_KEY", "tq_0123456789ab_secret")
    monkeypatch.setenv("TQ_JOIN", "tqjoin1.secret")
    monkeypatch.setenv("TQ_BROKER", "queue.example.com:7470")
    monkeypatch.setenv("APP_SETTING", "kept")
    out = await run(prog("environ"))
    assert out.status == "ok", out
    env = out.result
    assert "TQ_KEY" not in env and "TQ_JOIN" not in env
    secrets = ("tq_0123456789ab_secret", "tqjoin1.secret")
    assert not any(secret in value for value in env.values() for secret in secrets)
    assert env["TQ_BROKER"] == "queue.example.com:7470" and env["APP_SETTING"] == "kept"
    assert env["TQ_TASK_ID"] == "T1"
    assert os.environ["TQ_KEY"] == "tq_0123456789ab_secret"  # the worker keeps its own


@pytest.mark.trio
async def test_empty_stdout_is_a_null_result() -> None:
    assert await run(prog("print", " \n")) == ExecOutcome("ok", result=None)


@pytest.mark.trio
async def test_large_stdin_stdout_and_stderr_do_not_deadlock() -> None:
    payload = {"blob": "p" * (1024 * 1024)}
    out = await run(prog("both"), payload)
    assert out == ExecOutcome("ok", result=payload)


# --------------------------------------------------------------------------- failures


@pytest.mark.trio
async def test_exit_75_asks_for_a_retry() -> None:
    out = await run(prog("exit", str(EXIT_RETRY), "0", "disk busy"))
    assert out.status == "retry"
    assert out.error is not None
    assert (out.error.type, out.error.traceback) == ("RetryLater", "disk busy")
    assert "exit 75" in out.error.message


@pytest.mark.trio
async def test_other_exit_status_is_an_ordinary_retried_failure_with_the_stderr_tail() -> None:
    out = await run(prog("exit", "3", "100", "THE END"))
    assert out.status == "retry"
    assert out.error is not None
    assert out.error.type == "ExitStatus"
    assert out.error.message == "program exited with status 3"
    assert out.error.traceback.endswith("xxTHE END")
    assert len(out.error.traceback) == executable.STDERR_TAIL_BYTES


@pytest.mark.trio
async def test_death_by_signal_is_an_ordinary_retried_failure() -> None:
    out = await run(prog("signal", "SIGUSR1"))
    assert out.status == "retry"
    assert out.error is not None
    assert out.error.message == "killed by signal SIGUSR1"


@pytest.mark.trio
async def test_exit_65_means_do_not_retry() -> None:
    out = await run(prog("exit", str(executable.EXIT_NO_RETRY), "0", "no such image"))
    assert out.status == "reject"
    assert out.error is not None
    assert (out.error.type, out.error.traceback) == ("DoNotRetry", "no such image")
    assert "do not retry" in out.error.message


@pytest.mark.trio
async def test_stdout_that_is_not_json_rejects() -> None:
    out = await run(prog("print", "hello " * 100))
    assert out.status == "reject"
    assert out.error is not None
    assert out.error.type == "BadOutput"
    assert out.error.message.startswith("program exited 0 but stdout was not JSON: 'hello hello")
    assert len(out.error.message) < 300


@pytest.mark.trio
async def test_too_much_stdout_stops_the_program_and_rejects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(executable, "MAX_STDOUT_BYTES", 1000)
    out = await run(prog("flood", str(1024 * 1024)))
    assert out.status == "reject"
    assert out.error is not None
    assert out.error.type == "OutputTooLarge"


@pytest.mark.trio
async def test_payload_that_is_not_json_rejects_without_starting() -> None:
    out = await run(prog("echo"), {"x": float("nan")})
    assert out.status == "reject"
    assert out.error is not None
    assert out.error.type == "BadPayload"


@pytest.mark.trio
async def test_missing_program_rejects() -> None:
    out = await run(ExecHandler("t", ("/nonexistent/tq-handler",)))
    assert out.status == "reject"
    assert out.error is not None
    assert out.error.type == "StartFailed"
    assert "/nonexistent/tq-handler" in out.error.message


@pytest.mark.trio
async def test_program_that_is_not_executable_rejects(tmp_path: Path) -> None:
    script = tmp_path / "handler.sh"
    script.write_text("#!/bin/sh\necho 1\n")
    out = await run(ExecHandler("t", (str(script),)))
    assert out.status == "reject"
    assert out.error is not None
    assert out.error.type == "StartFailed"
    assert "ermission denied" in out.error.message


# --------------------------------------------------------------------------- process group


@pytest.mark.trio
async def test_timeout_kills_the_program_and_its_children(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    start = trio.current_time()
    out = await run(prog("hang", str(pids_file)), timeout=1.5)
    assert trio.current_time() - start < 4
    assert out.status == "retry"
    assert out.error is not None
    assert out.error.type == "Timeout"
    assert out.error.message == "program exceeded the task timeout of 1.5s"
    assert_dies(*await wait_for_pids(pids_file))


@pytest.mark.trio
async def test_sigkill_when_the_group_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executable, "KILL_GRACE", 0.3)
    pids_file = tmp_path / "pids"
    out = await run(prog("hang", str(pids_file), "ignore-term"), timeout=1.5)
    assert out.status == "retry"
    assert out.error is not None
    assert out.error.type == "Timeout"
    assert_dies(*await wait_for_pids(pids_file))


@pytest.mark.trio
async def test_outer_cancel_kills_the_group_and_propagates(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    reached = False

    async def cancel_when_started(scope: trio.CancelScope) -> None:
        await wait_for_pids(pids_file)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(cancel_when_started, scope)
            await run(prog("hang", str(pids_file)), timeout=30)
            reached = True
    assert scope.cancelled_caught
    assert not reached
    assert_dies(*await wait_for_pids(pids_file))


@pytest.mark.trio
async def test_move_on_after_cancels_the_run(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    with trio.move_on_after(1.0) as scope:
        await run(prog("hang", str(pids_file)), timeout=30)
        pytest.fail("the cancellation was swallowed")
    assert scope.cancelled_caught
    assert_dies(*await wait_for_pids(pids_file))


@pytest.mark.trio
async def test_background_processes_are_stopped_when_the_program_exits(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    start = trio.current_time()
    out = await run(ExecHandler("t", (str(FIXTURES / "straggler.sh"), str(pid_file))))
    # Not blocked by the straggler holding stdout, nor waiting out DRAIN_GRACE.
    assert trio.current_time() - start < executable.DRAIN_GRACE * 0.75
    assert out == ExecOutcome("ok", result={"done": True})
    assert_dies(int(pid_file.read_text()))


@pytest.mark.trio
async def test_no_file_descriptors_leak(tmp_path: Path) -> None:
    await run(prog("echo"), 1)  # warm up anything trio opens once
    before = len(os.listdir("/proc/self/fd"))
    await run(prog("echo"), 1)
    await run(prog("exit", "3", "1", "x"))
    with trio.move_on_after(0.5):
        await run(prog("hang", str(tmp_path / "pids")))
    assert len(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------------- spec


def test_parse_spec_resolves_the_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "resize.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    handler = parse_exec_spec("resize=./resize.sh --fast 'two words'")
    assert handler == ExecHandler("resize", (str(script), "--fast", "two words"))
    sh = shutil.which("sh")
    assert sh is not None
    assert parse_exec_spec("x=sh -c true").argv == (os.path.abspath(sh), "-c", "true")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("resize", "expected TYPE=COMMAND"),
        ("=x", "task type before '=' is empty"),
        ("re size=sh", "without spaces or commas"),
        ("resize=", "command after '=' is empty"),
        ("resize=  ", "command after '=' is empty"),
        ("resize=sh 'unbalanced", "cannot split the command"),
        ("resize=./no-such-handler.sh", "does not exist"),
        ("resize=no-such-handler-tq", "not found on PATH"),
        ("resize=/", "is a directory"),
        ("resize=./plain.sh", "chmod +x ./plain.sh"),
    ],
)
def test_parse_spec_errors(
    spec: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.sh").write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match="--exec") as info:
        parse_exec_spec(spec)
    assert needle in str(info.value)


def test_payload_encoding_is_strict_json_with_base64_bytes() -> None:
    encoded = executable.encode_payload({"b": b"hi", "n": [1, None]})
    assert encoded.endswith(b"\n")
    assert json.loads(encoded) == {"b": base64.b64encode(b"hi").decode(), "n": [1, None]}
    with pytest.raises(TypeError):
        executable.encode_payload({"s": {1, 2}})
