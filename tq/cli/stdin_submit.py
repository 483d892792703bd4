"""`tq submit -`: task maps from stdin, pipelined to the broker in batches.

Contract:

- Lines are sent in batches of up to ``STDIN_BATCH`` tasks, and a batch is
  also sent ``FLUSH_SECONDS`` after its first line arrived, so a slow
  producer (``tail -f log | tq submit -``) never waits for 250 lines.
- One JSON line out per input line, in input order, on a terminal and in a
  pipe alike: ``{"line": 3, "id": "..."}`` for a stored task, ``{"line": 4,
  "error": "..."}`` (also on stderr) for a refused one. Nothing is printed for
  a task before the broker has stored it.
- Ctrl-C (SIGINT) or SIGTERM stops reading; requests already sent are
  awaited, never abandoned, so every stored task's id is printed; lines read
  but not sent are dropped. The last stderr line says how many tasks went in
  and after which input line it stopped; exit status 130. A second signal
  while requests are in flight stops at once and says how many answers were
  not awaited.
- A line may name ``depends_on`` ids (of tasks already stored, e.g. ids this
  command printed); a batch refused because one of them does not exist is
  sent again line by line, so only that line is refused. ``"#N"`` references
  are refused: batches are cut by time.
- ``--from-list``: lines may be tasks as `tq list --output jsonl` prints them;
  the fields a submission cannot carry (id, state, attempts, times, result,
  error, worker...) are dropped, so ``tq list ... | tq submit - --from-list``
  re-submits them as new tasks.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from typing import Any

import trio

from tq.cli.common import dumps
from tq.config import ClientSettings
from tq.core.text import inert

STDIN_BATCH = 250  # tasks per request: one request is one transaction (see OPERATIONS.md)
STDIN_IN_FLIGHT = 8  # requests pipelined at once
FLUSH_SECONDS = 0.2  # a batch goes out at most this long after its first line arrived
SUBMIT_FIELDS = frozenset(
    {
        "type",
        "payload",
        "queue",
        "priority",
        "max_retries",
        "timeout",
        "idempotency_key",
        "retry_base",
        "retry_cap",
    }
)


class Outcome:
    """What a run of `tq submit -` did, for the caller's summary and exit status."""

    def __init__(self) -> None:
        self.submitted = 0
        self.refused = 0
        self.last_line = 0  # every input line up to this one was sent (stored or refused)
        self.interrupted: str | None = None  # the signal's name
        self.abandoned = 0  # requests whose answers were not awaited (second signal)


def from_list(item: Any) -> Any:
    """A task as `tq list` prints it -> a submission map (read-only fields dropped)."""
    if not isinstance(item, dict):
        return item
    return {k: v for k, v in item.items() if k in SUBMIT_FIELDS and v is not None}


async def _chunks() -> AsyncIterator[bytes]:
    """stdin as it arrives: a regular file in large reads, a pipe or terminal via trio."""
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
        # a file or a device like /dev/null: reads never block for long, and epoll
        # (trio's wait for input) refuses them
        while chunk := os.read(fd, 1 << 20):
            yield chunk
            await trio.sleep(0)
        return
    stream = trio.lowlevel.FdStream(os.dup(fd))  # restores blocking mode when closed
    async with stream:
        while chunk := await stream.receive_some(1 << 16):
            yield chunk


async def _lines(send: trio.MemorySendChannel[list[tuple[int, Any]]], listed: bool) -> None:
    """Parse stdin lines; send lists of (line number, task map or error text) on ``send``,
    one list per chunk read (a channel send per line would cost more than the parsing)."""
    number, rest = 0, b""
    async with send:
        async for chunk in _chunks():
            rest += chunk
            *complete, rest = rest.split(b"\n")
            parsed = []
            for raw in complete:
                number += 1
                if raw.strip():
                    parsed.append((number, _parse(number, raw, listed)))
            if parsed:
                await send.send(parsed)
        if rest.strip():
            await send.send([(number + 1, _parse(number + 1, rest, listed))])


def _parse(number: int, raw: bytes, listed: bool) -> Any:
    """A line's task map, or a string saying why the line cannot be one: what JSON or
    msgpack cannot carry (a lone surrogate, 5000 digits or levels, an int beyond 64
    bits) fails that line only, never the batch."""
    from tq.core.errors import InvalidRequest, ProtocolError
    from tq.protocol.frames import pack

    try:
        item = json.loads(raw)
        item = from_list(item) if listed else item
        pack(item)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        return f"line {number} is not valid JSON: {reason}"
    except (ValueError, RecursionError) as exc:
        return f"line {number} is not valid JSON: {exc}"
    except (ProtocolError, InvalidRequest) as exc:  # InvalidRequest: an int beyond 64 bits
        return f"line {number}: {exc}"
    return item


async def _batches(
    lines: trio.MemoryReceiveChannel[list[tuple[int, Any]]],
    out: trio.MemorySendChannel[list[tuple[int, Any]]],
) -> None:
    """Group lines: a batch leaves at STDIN_BATCH lines or FLUSH_SECONDS after its first."""
    batch: list[tuple[int, Any]] = []
    deadline = float("inf")
    async with out:
        while True:
            items: list[tuple[int, Any]] | None = None
            with trio.move_on_at(deadline):  # only the receive: a send is never cut short
                try:
                    items = await lines.receive()
                except trio.EndOfChannel:
                    break
            if items is None:  # the timer: send what there is
                await out.send(batch)
                batch, deadline = [], float("inf")
                continue
            if not batch:
                deadline = trio.current_time() + FLUSH_SECONDS
            batch.extend(items)
            while len(batch) >= STDIN_BATCH:
                await out.send(batch[:STDIN_BATCH])
                batch = batch[STDIN_BATCH:]
                deadline = trio.current_time() + FLUSH_SECONDS if batch else float("inf")
        if batch:
            await out.send(batch)


def _check(batch: list[tuple[int, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows with errors for bad lines; indexes of the good ones."""
    from tq.core.errors import InvalidRequest, TQError
    from tq.core.task import TaskSpec

    rows: list[dict[str, Any]] = [{} for _ in batch]
    good: list[int] = []
    for i, (number, item) in enumerate(batch):
        if isinstance(item, str):
            rows[i] = {"line": number, "error": item}
            continue
        try:
            spec = TaskSpec.from_mapping(item)  # name the bad line instead of failing the batch
            if any(dep.startswith("#") for dep in spec.depends_on or ()):
                raise InvalidRequest(
                    'depends_on "#N" names a task of the same request, and tq submit - '
                    "cuts its requests by time: name task ids (each line's id is printed "
                    "once stored), or submit a workflow (tq submit --workflow)"
                )
        except TQError as exc:
            rows[i] = {"line": number, "error": f"line {number}: {exc.message}"}
            continue
        good.append(i)
    return rows, good


def submit_stdin(conf: ClientSettings, listed: bool = False) -> Outcome:
    """Run `tq submit -`. A request that fails (connection lost, refused key) stops the
    reading; the answers of the others are still printed, then its error is raised."""
    from tq.client import Client
    from tq.core.errors import NotFound, TQError

    outcome = Outcome()
    warned: set[str] = set()
    failed: list[TQError] = []

    def emit(batch: list[tuple[int, Any]], rows: list[dict[str, Any]] | TQError) -> None:
        if isinstance(rows, TQError):
            failed.append(rows)
            first, last = batch[0][0], batch[-1][0]
            print(
                f"tq: error: lines {first}-{last} were not submitted: {inert(rows.message)}",
                file=sys.stderr,
            )
            return
        for row in rows:
            if "error" in row:
                outcome.refused += 1
                print(f"tq: error: {inert(row['error'])}", file=sys.stderr)
            else:
                outcome.submitted += 1
            sys.stdout.write(dumps(row) + "\n")
        if not failed:  # every line up to here is accounted for
            outcome.last_line = batch[-1][0]
        sys.stdout.flush()

    def accepted(rows: list[dict[str, Any]], line: int, index: int, answer: Any) -> None:
        rows[index] = {"line": line, "id": answer["id"]}
        warning = answer.get("warning")
        if warning and warning not in warned:  # once per task type, on stderr
            warned.add(warning)
            print(f"tq: warning: {inert(warning)}", file=sys.stderr)

    async def send(client: Client, batch: list[tuple[int, Any]]) -> list[dict[str, Any]]:
        rows, good = _check(batch)
        if not good:
            return rows
        items = [batch[i][1] for i in good]
        try:
            answers = await client.submit_items(items)
        except NotFound:
            if not any(isinstance(item, dict) and item.get("depends_on") for item in items):
                raise
            # a line depends on a task that does not exist, and the request stored
            # nothing: send the lines one by one, so only that line is refused
            for i in good:
                line, item = batch[i]
                try:
                    [answer] = await client.submit_items([item])
                except NotFound as exc:
                    rows[i] = {"line": line, "error": f"line {line}: {exc.message}"}
                    continue
                accepted(rows, line, i, answer)
            return rows
        for i, answer in zip(good, answers, strict=True):
            accepted(rows, batch[i][0], i, answer)
        return rows

    requests = trio.CancelScope()  # the requests in flight: cancelled by a second signal only
    reading = trio.CancelScope()  # stdin and batching: cancelled by the first signal
    in_flight: list[Any] = []

    async def signals() -> None:
        from tq.cli.services import SignalRule  # one keypress may arrive twice

        rule = SignalRule()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            async for signum in received:
                verdict = rule.on_signal(trio.current_time())
                if verdict == "graceful":
                    outcome.interrupted = signal.Signals(signum).name
                    reading.cancel()
                elif verdict == "now":  # a second signal: give up on the answers
                    outcome.abandoned = len(in_flight)
                    requests.cancel()
                    return

    async def run(client: Client) -> None:
        limit = trio.Semaphore(STDIN_IN_FLIGHT)
        order_send, order_recv = trio.open_memory_channel[Any](float("inf"))

        async def one(batch: list[tuple[int, Any]], done: Any) -> None:
            try:
                result: list[dict[str, Any]] | TQError = await send(client, batch)
            except TQError as exc:
                result = exc
                reading.cancel()  # stop reading; the other answers are still printed
            finally:
                limit.release()
            done.send_nowait(result)

        async def printer() -> None:
            async for batch, channel in order_recv:
                rows = await channel.receive()
                in_flight.remove(channel)
                emit(batch, rows)

        async with trio.open_nursery() as work:
            work.start_soon(printer)
            async with order_send:
                with reading:
                    lines_send, lines_recv = trio.open_memory_channel[Any](4)
                    batch_send, batch_recv = trio.open_memory_channel[Any](0)
                    async with trio.open_nursery() as feeders:
                        feeders.start_soon(_lines, lines_send, listed)
                        feeders.start_soon(_batches, lines_recv, batch_send)
                        async with batch_recv:
                            async for batch in batch_recv:
                                await limit.acquire()
                                done_send, done_recv = trio.open_memory_channel[Any](1)
                                in_flight.append(done_recv)
                                order_send.send_nowait((batch, done_recv))
                                work.start_soon(one, batch, done_send)

    async def main() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(signals)
            with requests:
                async with Client.from_settings(conf) as client:
                    await run(client)
            outer.cancel_scope.cancel()

    trio.run(main)
    if failed:
        raise failed[0]
    return outcome
