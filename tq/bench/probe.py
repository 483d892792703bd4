"""The latency probe: an independent client that submits single tasks and times each ACK.

It runs in a process of its own (``tq bench-probe``, a hidden command, so that
the frozen executable can start it too): what it measures is the broker's
answer time, not the stalls of a load generator that would share its event
loop. It writes one line per acknowledged submit to the
output file: ``<monotonic time sent> <seconds to the ACK>``. CLOCK_MONOTONIC is
system-wide on Linux, so the parent can place each sample in its load phases.
SIGTERM (or SIGINT) ends it after the submit in flight is acknowledged.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
