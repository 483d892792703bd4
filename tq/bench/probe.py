"""The latency probe: an independent client that submits single tasks and times each ACK.

It runs in a process of its own (``tq bench-probe``, a hidden command, so that
the frozen executable can start it too): what it measures is the broker's
answer time, not the stalls of a load generator that would share its event
loop. It writes one line per acknowledged submit to the
output file: ``<monotonic time sent> <seconds to the ACK>``. CLOCK_MONOTONIC is
system-wide on Linux, so the parent can place each sample in its load phases.
SIGTERM (or SIGINT) ends it after the submit in flight is acknowledged.

With ``--producers K`` it is instead a group of one-at-a-time producers (the
``single`` scenario's concurrent producers, spread over several such processes
so that no one load generator's core caps them): K connections, each submits
``--limit`` tasks one at a time, waiting for each ACK. It prints ``ready`` once
every connection has had its hello ACK, starts on a line read from stdin, and
writes one JSON object to the output file: when it started and ended
(monotonic), its own CPU seconds, and every submit's round trip in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from types import FrameType

from tq.client.sync import BlockingClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tq bench-probe", description=__doc__)
    parser.add_argument("--broker", required=True, help="host:port of the broker")
    parser.add_argument("--ca", required=True, type=Path, help="the broker's CA certificate")
    parser.add_argument("--key", default=None, help="API key (omit for a --no-auth broker)")
    parser.add_argument("--out", required=True, type=Path, help="file for the samples")
    parser.add_argument("--interval", type=float, default=0.001, help="pause between submits")
    parser.add_argument("--payload-bytes", type=int, default=16)
    parser.add_argument("--limit", type=int, default=1_000_000, help="stop after this many")
    parser.add_argument("--producers", type=int, default=0, help="concurrent producers mode")
    args = parser.parse_args(argv)
    if args.producers > 0:
        return _producers(args)

    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    payload = {"n": -1, "pad": "x" * max(0, args.payload_bytes - 16)}
    client = BlockingClient(args.broker, ca=args.ca, key=args.key)
    try:
        with open(args.out, "w", buffering=1) as out:  # line-buffered: the parent polls it
            for _ in range(args.limit):
                if stopping:
                    break
                sent = time.monotonic()
                client.submit("echo", payload)
                out.write(f"{sent:.6f} {time.monotonic() - sent:.6f}\n")
                time.sleep(args.interval)
    finally:
        client.close()
    return 0


def _producers(args: argparse.Namespace) -> int:
    """``--producers K``: K connections, ``--limit`` one-at-a-time submits each."""
    import trio

    from tq.client import Client

    payload = {"n": -1, "pad": "x" * max(0, args.payload_bytes - 16)}
    samples: list[float] = []
    window: dict[str, float] = {}

    async def producer(client: Client) -> None:
        for _ in range(args.limit):
            begun = time.perf_counter()
            await client.submit("echo", payload)
            samples.append(time.perf_counter() - begun)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    Client.connect(args.broker, ca=args.ca, key=args.key)
                )
                for _ in range(args.producers)
            ]
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the parent's go
            cpu = sum(os.times()[:2])
            window["started"] = time.monotonic()
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(producer, client)
            window["ended"] = time.monotonic()
            window["cpu_s"] = sum(os.times()[:2]) - cpu

    trio.run(main)
    args.out.write_text(json.dumps({**window, "samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
