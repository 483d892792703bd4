"""Executable handlers: run an external program as the handler of a task type.

``tq worker --exec resize=./resize.sh`` makes the worker run ``./resize.sh``
for every task of type ``resize``. The contract between the worker and the
program (POSIX only):

Command
    The text after ``=`` is split like a shell would split it (``shlex``),
    without running a shell: ``resize=./resize.sh --fast`` runs
    ``./resize.sh`` with the single argument ``--fast``. The program is
    checked when the worker starts: a path containing ``/`` must name an
    existing executable file (relative paths are resolved against the
    worker's working directory), a bare name is looked up on ``PATH``. The
    resolved absolute path is what runs.

Standard input
    The task payload as one JSON document followed by a newline; then
    standard input is closed, so the program reads until end of file.
    Byte strings in the payload (msgpack ``bin`` values) are sent as base64
    text. A payload that cannot be written as strict JSON (NaN or infinite
    numbers, map keys that are not strings, numbers, booleans or null) fails
    the task without retry (error type ``BadPayload``); the program is not
    started.

Environment
    The worker's environment without tq's own secrets (``TQ_KEY``, the API
    key, and ``TQ_JOIN``, the join token, that the worker connects with: a
    task's program gets no credential to the broker), plus:

    - ``TQ_TASK_ID``     the task id
    - ``TQ_TASK_TYPE``   the task type (``resize``)
    - ``TQ_ATTEMPT``     the attempt number: 1 for the first run, 2 for the
      first retry, ...
    - ``TQ_LEASE_TOKEN`` the fencing token of this run of the task (of the
      lease it started under: if that lease expires while the broker is
      away and the broker leases the task to this same worker again, the run
      goes on under the new lease and is reported with it)

    and any variables the worker adds for its handlers; the four ``TQ_``
    variables above always win over a variable of the same name.

Progress
    A line on standard error of the form ``tq-progress FRACTION [MESSAGE]``
    reports progress: FRACTION is a number 0..1 (``0.4``) or a percentage
    (``40%``), MESSAGE the rest of the line (at most 200 characters are kept),
    e.g. ``echo "tq-progress 0.4 page 4/10" >&2``. Only a whole line that
    starts with exactly ``tq-progress `` (at most 1 KiB, a valid number) counts;
    it is left out of the stderr tail. Any other line, a malformed
    ``tq-progress`` line included, is ordinary stderr output. Only the latest
    value counts: it goes to the broker with the worker's next heartbeat
    (at most one a second), however many lines the program writes.

Standard output
    The result of the task, as one JSON document (at most 10 MiB). Empty
    output (or only whitespace) is a null result. Write logs and progress to
    standard error: the last 8 KiB of it are kept and stored with the task's
    error when the run fails.

Exit status
    - ``0``: success; standard output is the result. Output that is not JSON
      fails the task without retry (``BadOutput``).
    - ``65`` (``EX_DATAERR``): "do not retry": the input is wrong and another
      attempt cannot help; the task goes dead at once, whatever its retries
      (``DoNotRetry``).
    - ``75`` (``EX_TEMPFAIL``): a temporary failure; the task is retried with
      backoff while it has retries left (``RetryLater``).
    - any other non-zero status, or death by a signal: an ordinary failure,
      retried with backoff while the task has retries left, like a Python
      handler's exception (``ExitStatus``: "program exited with status 3",
      "killed by signal SIGSEGV").
    - more than 10 MiB on standard output: the program is stopped and the
      task fails without retry (``OutputTooLarge``).
    - the program cannot be started (removed, not executable, bad ``#!``
      line): the task fails without retry (``StartFailed``); the worker goes
      on.

Process group, timeout and cancellation
    The program runs in a new session and so in its own process group; every
    process it starts belongs to that group unless it moves itself out
    (``setsid``, ``setpgid``). The group is stopped with ``SIGTERM`` to the
    whole group, then ``SIGKILL`` to the whole group if any process of it is
    still running 2 seconds later. This happens:

    - when the task's timeout, counted from the program's start, expires: the
      task is retried with backoff while it has retries left (``Timeout``);
    - when the run is cancelled: the task is cancelled, or the worker shuts
      down and the program is still running when its grace period ends (the
      worker then hands the task back to the broker);
    - when the program exits: processes it left running in its group (for
      example ``sleep 60 &``) are stopped the same way, so background
      processes never outlive the task. Run daemons with ``setsid`` if they
      must survive, and redirect their output away from the task's pipes.

    The worker always reaps the program before it reports the outcome.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import trio

from tq.config import SECRET_SETTINGS
from tq.core.errors import ConfigError
from tq.core.progress import Progress, clean
from tq.core.task import MAX_NAME_LENGTH, TaskError

__all__ = [
    "EXIT_RETRY",
    "ExecHandler",
    "ExecOutcome",
    "parse_exec_spec",
    "run_executable",
]

log = logging.getLogger(__name__)

EXIT_RETRY = 75  # EX_TEMPFAIL from sysexits.h: "retry later"
SECRET_ENV = frozenset(f"TQ_{name.upper()}" for name in SECRET_SETTINGS)  # never passed on
EXIT_NO_RETRY = 65  # EX_DATAERR from sysexits.h: bad input, "do not retry"

MAX_STDOUT_BYTES = 10 * 1024 * 1024  # a larger result is rejected
STDERR_TAIL_BYTES = 8 * 1024  # the end of stderr kept for the task's error
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to the process group
DRAIN_GRACE = 2.0  # seconds to finish reading the pipes once the program has exited
REAP_LIMIT = 5.0  # seconds to wait for the kernel to reap a SIGKILLed program
_POLL_INTERVAL = 0.02
_READ_SIZE = 64 * 1024
_PREVIEW_CHARS = 200


@dataclass(frozen=True)
class ExecHandler:
    """A task type served by an external program."""

    type: str
    argv: tuple[str, ...]  # program and its fixed arguments (shlex-split of the spec)


@dataclass(frozen=True)
class ExecOutcome:
    """How one run ended; ``status`` means what ``tq.core.task.Outcome.status`` means."""

    status: str  # "ok" | "retry" | "reject"
    result: Any = None
    error: TaskError | None = None


# --------------------------------------------------------------------------- spec


def parse_exec_spec(spec: str) -> ExecHandler:
    """``"resize=./resize.sh --fast"`` -> ``ExecHandler("resize", ("/abs/resize.sh", "--fast"))``.

    Raises ConfigError, naming the spec and what to do, when the spec has no
    ``=``, an invalid task type, no command, unbalanced quotes, or a program
    that does not exist or is not executable.
    """
    example = 'e.g. --exec "resize=./resize.sh --fast"'
    type_, sep, command = spec.partition("=")
    type_ = type_.strip()
    if not sep:
        raise ConfigError(f"--exec {spec!r}: expected TYPE=COMMAND, {example}")
    if not type_:
        raise ConfigError(f"--exec {spec!r}: the task type before '=' is empty, {example}")
    if len(type_) > MAX_NAME_LENGTH or any(c.isspace() or c == "," for c in type_):
        raise ConfigError(
            f"--exec {spec!r}: task type {type_!r} must be at most {MAX_NAME_LENGTH} "
            "characters without spaces or commas"
        )
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"--exec {spec!r}: cannot split the command: {exc}") from None
    if not argv:
        raise ConfigError(f"--exec {spec!r}: the command after '=' is empty, {example}")
    program = _resolve_program(spec, argv[0])
    return ExecHandler(type=type_, argv=(program, *argv[1:]))


def _resolve_program(spec: str, program: str) -> str:
    if "/" not in program:
        found = shutil.which(program)
        if found is None:
            raise ConfigError(
                f"--exec {spec!r}: program {program!r} was not found on PATH; "
                f"give its path (./{program} or /full/path/{program}) or install it"
            )
        return os.path.abspath(found)
    path = os.path.abspath(program)
    if not os.path.exists(path):
        raise ConfigError(
            f"--exec {spec!r}: program {program!r} does not exist "
            f"(relative paths are resolved against the working directory {os.getcwd()})"
        )
    if os.path.isdir(path):
        raise ConfigError(f"--exec {spec!r}: {program!r} is a directory, not a program")
    if not os.access(path, os.X_OK):
        raise ConfigError(
            f"--exec {spec!r}: {program!r} is not executable; run 'chmod +x {program}' "
            f"or name its interpreter first, e.g. 'sh {program}'"
        )
    return path


# --------------------------------------------------------------------------- run


def _json_default(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"a {type(value).__name__} value cannot be written as JSON")


def encode_payload(payload: Any) -> bytes:
    """The payload as strict JSON plus a newline; bytes become base64 text.

    Raises TypeError or ValueError when the payload cannot be written as JSON.
    """
    text = json.dumps(
        payload, default=_json_default, allow_nan=False, ensure_ascii=False, separators=(",", ":")
    )
    return text.encode("utf-8") + b"\n"


PROGRESS_PREFIX = b"tq-progress "  # a stderr line starting so reports progress
MAX_PROGRESS_LINE = 1024  # bytes: a longer line is ordinary stderr output


def parse_progress_line(line: bytes) -> Progress | None:
    """``tq-progress FRACTION [MESSAGE]`` (FRACTION 0..1, or a percentage such as
    ``40%``) as (fraction, message); None if the line is anything else."""
    if not line.startswith(PROGRESS_PREFIX) or len(line) > MAX_PROGRESS_LINE:
        return None
    text = line[len(PROGRESS_PREFIX) :].rstrip(b"\r\n").decode("utf-8", errors="replace")
    number, _, message = text.strip(" ").partition(" ")
    scale = 1.0
    if number.endswith("%"):
        number, scale = number[:-1], 100.0
    try:
        value = float(number) / scale
    except ValueError:
        return None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        return None
    return clean(value, message.strip() or None)


class StderrLines:
    """Splits a program's stderr into progress lines and everything else (sans-IO).

    A line is held back only while it may still become a progress line (it starts
    like ``tq-progress `` and is at most MAX_PROGRESS_LINE bytes); anything else
    passes through at once, byte for byte. A flood of progress lines costs one parse
    each and keeps only the latest value."""

    def __init__(self) -> None:
        self._held = bytearray()
        self._line_start = True  # the next byte begins a line

    def feed(self, chunk: bytes | bytearray) -> tuple[bytes, Progress | None]:
        out = bytearray()
        latest: Progress | None = None
        pos = 0
        while pos < len(chunk):
            newline = chunk.find(b"\n", pos)
            end = len(chunk) if newline < 0 else newline + 1
            piece = chunk[pos:end]
            pos = end
            if not self._line_start:
                out += piece
                self._line_start = newline >= 0
                continue
            self._held += piece
            if newline >= 0:
                found = parse_progress_line(bytes(self._held))
                if found is None:
                    out += self._held
                else:
                    latest = found
                self._held.clear()
            elif not _may_be_progress(self._held):
                out += self._held
                self._held.clear()
                self._line_start = False
        return bytes(out), latest

    def close(self) -> tuple[bytes, Progress | None]:
        """The end of the stream: a last line without a newline."""
        held, self._held = bytes(self._held), bytearray()
        found = parse_progress_line(held) if held else None
        return (b"", found) if found is not None else (held, None)


def _may_be_progress(held: bytearray) -> bool:
    if len(held) > MAX_PROGRESS_LINE:
        return False
    size = min(len(held), len(PROGRESS_PREFIX))
    return held[:size] == PROGRESS_PREFIX[:size]


@dataclass
class _Capture:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stdout_done: trio.Event = field(default_factory=trio.Event)
    stderr_done: trio.Event = field(default_factory=trio.Event)
    overflow: bool = False
    timed_out: bool = False
    progress: Callable[[Progress], None] | None = None  # where progress lines go

    def stderr_tail(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


async def run_executable(
    handler: ExecHandler,
    *,
    task_id: str,
    attempt: int,
    token: int,
    payload: Any,
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> ExecOutcome:
    """Run ``handler``'s program for one task and say how it ended.

    See the module docstring for the contract. Never raises for anything the
    program does; if the enclosing trio scope is cancelled, the program's
    process group is stopped and reaped, then ``trio.Cancelled`` propagates.
    """
    try:
        data = encode_payload(payload)
    except (TypeError, ValueError) as exc:
        return ExecOutcome(
            "reject", error=TaskError("BadPayload", f"the payload cannot be sent as JSON: {exc}")
        )

    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    if extra_env:
        env.update(extra_env)
    env.update(
        TQ_TASK_ID=task_id,
        TQ_TASK_TYPE=handler.type,
        TQ_ATTEMPT=str(attempt),
        TQ_LEASE_TOKEN=str(token),
    )

    try:
        proc = await trio.lowlevel.open_process(
            list(handler.argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL in an argument or env value
        reason = getattr(exc, "strerror", None) or str(exc)
        return ExecOutcome(
            "reject",
            error=TaskError("StartFailed", f"could not start {handler.argv[0]!r}: {reason}"),
        )

    capture = _Capture(progress=progress)
    try:
        await _supervise(proc, data, capture, timeout)
    finally:
        # Runs on every path, cancellation included: nothing of the group
        # outlives the run, the program is reaped and the pipes are closed.
        with trio.CancelScope(shield=True):
            await _stop_group(proc)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
    return _outcome(proc.returncode, capture, timeout)


async def _supervise(proc: trio.Process, data: bytes, capture: _Capture, timeout: float) -> None:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    with trio.move_on_after(max(0.0, timeout)) as deadline:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, proc.stdin, data)
            nursery.start_soon(_read_stdout, proc.stdout, capture, nursery.cancel_scope)
            nursery.start_soon(_read_stderr, proc.stderr, capture)
            await proc.wait()
            # The program is done: stop what it left behind in its group
            # (which may hold our pipes open), then read what is left.
            await _stop_group(proc)
            with trio.move_on_after(DRAIN_GRACE):
                await capture.stdout_done.wait()
                await capture.stderr_done.wait()
            nursery.cancel_scope.cancel()
    capture.timed_out = deadline.cancelled_caught and proc.returncode is None


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    async with stream:
        # The program may exit or close stdin without reading it all.
        with suppress(trio.BrokenResourceError):
            await stream.send_all(data)


async def _read_stdout(
    stream: trio.abc.ReceiveStream, capture: _Capture, scope: trio.CancelScope
) -> None:
    limit = MAX_STDOUT_BYTES
    while chunk := await stream.receive_some(_READ_SIZE):
        capture.stdout += chunk
        if len(capture.stdout) > limit:
            capture.overflow = True
            scope.cancel()
            return
    capture.stdout_done.set()


async def _read_stderr(stream: trio.abc.ReceiveStream, capture: _Capture) -> None:
    lines = StderrLines() if capture.progress is not None else None
    while chunk := await stream.receive_some(_READ_SIZE):
        if lines is None:
            _keep_stderr(capture, chunk)
            continue
        text, found = lines.feed(chunk)
        _keep_stderr(capture, text)
        if found is not None and capture.progress is not None:
            capture.progress(found)
    if lines is not None:
        text, found = lines.close()
        _keep_stderr(capture, text)
        if found is not None and capture.progress is not None:
            capture.progress(found)
    capture.stderr_done.set()


def _keep_stderr(capture: _Capture, data: bytes | bytearray) -> None:
    capture.stderr += data
    if len(capture.stderr) > STDERR_TAIL_BYTES:
        del capture.stderr[:-STDERR_TAIL_BYTES]


def _signal_group(proc: trio.Process, sig: signal.Signals) -> None:
    # The group id is the program's pid (start_new_session). While the program
    # is unreaped, or any process of the group lives, that id cannot be reused.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    if proc.returncode is None:  # it may have left its group
        with suppress(ProcessLookupError):
            proc.send_signal(sig)


def _group_alive(pgid: int) -> bool:
    """Does any process of group ``pgid`` still run? Zombies do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # kill() also succeeds for zombies, and orphans of the group may stay
    # zombies a long time when PID 1 does not reap (containers): on Linux,
    # look at the members' states.
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


async def _stop_group(proc: trio.Process) -> None:
    """SIGTERM the program's group, SIGKILL it after KILL_GRACE, reap the program."""
    if proc.returncode is not None and not _group_alive(proc.pid):
        return
    _signal_group(proc, signal.SIGTERM)
    with trio.move_on_after(KILL_GRACE):
        await proc.wait()
        while _group_alive(proc.pid):
            await trio.sleep(_POLL_INTERVAL)
        return
    _signal_group(proc, signal.SIGKILL)
    with trio.move_on_after(REAP_LIMIT):
        await proc.wait()
    if proc.returncode is None:
        log.warning("program %r (pid %d) survived SIGKILL; not reaped", proc.args, proc.pid)


def _outcome(returncode: int | None, capture: _Capture, timeout: float) -> ExecOutcome:
    tail = capture.stderr_tail()
    if capture.overflow:
        limit_mib = MAX_STDOUT_BYTES / (1024 * 1024)
        return ExecOutcome(
            "reject",
            error=TaskError(
                "OutputTooLarge",
                f"program wrote more than {limit_mib:g} MiB to stdout; store large results "
                "elsewhere and return a reference",
                tail,
            ),
        )
    if capture.timed_out or returncode is None:
        return ExecOutcome(
            "retry",
            error=TaskError("Timeout", f"program exceeded the task timeout of {timeout:g}s", tail),
        )
    if returncode == 0:
        text = bytes(capture.stdout)
        if not text.strip():
            return ExecOutcome("ok", result=None)
        try:
            return ExecOutcome("ok", result=json.loads(text))
        except ValueError:
            preview = text[: _PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
            preview = preview[:_PREVIEW_CHARS]
            return ExecOutcome(
                "reject",
                error=TaskError(
                    "BadOutput", f"program exited 0 but stdout was not JSON: {preview!r}", tail
                ),
            )
    if returncode == EXIT_RETRY:
        return ExecOutcome(
            "retry",
            error=TaskError(
                "RetryLater", f"program asked to retry later (exit {EXIT_RETRY})", tail
            ),
        )
    return exit_status_outcome(returncode, tail)


def exit_status_outcome(returncode: int, tail: str) -> ExecOutcome:
    """A failed run's outcome by its exit status (not 0, not 75): 65 (EX_DATAERR) means
    "do not retry"; any other status or a signal is an ordinary, retried failure."""
    if returncode == EXIT_NO_RETRY:
        message = f"program exited with status {EXIT_NO_RETRY}: bad input, do not retry"
        return ExecOutcome("reject", error=TaskError("DoNotRetry", message, tail))
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        message = f"killed by signal {name}"
    else:
        message = f"program exited with status {returncode}"
    return ExecOutcome("retry", error=TaskError("ExitStatus", message, tail))
