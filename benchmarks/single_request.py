"""One request at a time: REST ``GET /api/v1/tasks/ID`` against the wire's ``get``.

    python benchmarks/single_request.py [--requests 500] [--warmup 50]

Starts a broker as its own process (``python -m tq broker``, TLS on, a fresh data
directory in a temporary folder), submits one task, then in the same run times
``--requests`` sequential reads of that task, one after the other on one
connection each:

* REST: ``httpx.Client`` over HTTPS with keep-alive, HTTP/1.1 (and HTTP/2 when
  the broker's HTTP side offers it through ALPN);
* wire: ``BlockingClient.get`` (msgpack over TLS);
* when ``grpcio`` is importable, a trivial gRPC unary call (bytes in, bytes out,
  plaintext, loopback, no broker behind it): the least a gRPC gateway's own hop
  would add in front of a wire ``get``.

Prints p50, p90, p99 and max in milliseconds for each, and the machine. Figures
depend on the machine and its load: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from tq.testing import BrokerProcess


def measure(call: Callable[[], Any], requests: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def report(what: str, seconds: list[float]) -> None:
    ms = sorted(s * 1000 for s in seconds)
    print(
        f"{what:<40} p50 {quantile(ms, 0.5):6.2f}  p90 {quantile(ms, 0.9):6.2f}  "
        f"p99 {quantile(ms, 0.99):6.2f}  max {ms[-1]:6.2f}  mean {statistics.fmean(ms):6.2f} ms"
    )


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({model}), "
        f"Python {platform.python_version()}, load average {load:.2f}"
    )


def grpc_unary(requests: int, warmup: int, payload: bytes) -> list[float] | None:
    """A gRPC echo over loopback (no .proto: raw bytes), or None without grpcio."""
    try:
        import grpc
    except ImportError:
        return None

    def identity(value: bytes) -> bytes:
        return value

    handler = grpc.method_handlers_generic_handler(
        "tq.Bench",
        {
            "Get": grpc.unary_unary_rpc_method_handler(
                lambda request, context: payload,
                request_deserializer=identity,
                response_serializer=identity,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/tq.Bench/Get", request_serializer=identity, response_deserializer=identity
            )
            return measure(lambda: call(b"01a21f99-0000-7000-8000-000000000000"), requests, warmup)
    finally:
        server.stop(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()

    def timed(call: Callable[[], Any]) -> list[float]:
        return measure(call, args.requests, args.warmup)

    print(machine())
    with tempfile.TemporaryDirectory() as tmp, BrokerProcess(Path(tmp)) as broker:
        with broker.client() as wire:
            task_id = wire.submit("echo", {"image": "a.png", "size": [640, 480]})
            report("wire get (BlockingClient)", timed(lambda: wire.get(task_id)))
        path = f"/api/v1/tasks/{task_id}"
        with broker.http_client() as http:
            response = http.get(path)
            response.raise_for_status()
            body = response.content
            report("REST GET /api/v1/tasks/ID (HTTP/1.1)", timed(lambda: http.get(path)))
        try:
            import h2  # noqa: F401  # httpx's HTTP/2 needs it (hypercorn brings it)
        except ImportError:
            print("REST over HTTP/2: skipped (no h2 package)")
        else:
            with broker.http_client(http2=True) as http:
                version = http.get(path).http_version
                if version == "HTTP/2":
                    report("REST GET /api/v1/tasks/ID (HTTP/2)", timed(lambda: http.get(path)))
                else:
                    print(f"REST over HTTP/2: the broker answered {version} (no h2 in ALPN)")
        # the wire again, after the REST rows: both ends of the run see the same machine
        with broker.client() as wire:
            report("wire get (BlockingClient), again", timed(lambda: wire.get(task_id)))
    grpc_times = grpc_unary(args.requests, args.warmup, body)
    if grpc_times is None:
        print("gRPC unary echo: skipped (pip install grpcio to measure it)")
    else:
        report("gRPC unary echo, no broker (grpcio)", grpc_times)
    print(f"{args.requests} sequential requests each after {args.warmup} warm-up ones")


if __name__ == "__main__":
    sys.exit(main())
