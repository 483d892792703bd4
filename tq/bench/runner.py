"""The benchmark scenarios. Each returns a dict of figures; see ``run_bench``."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trio

from tq import __version__
from tq.client import Client
from tq.testing import BrokerProcess, tq_command

SCENARIOS = ("submit", "e2e", "latency", "backlog", "single")


class BenchError(RuntimeError):
    """A benchmark could not run (a process it started failed); the message says which."""


CLAIM_ROUNDS = 3  # claim-rate measurements per backlog level (the median is reported)
PRODUCERS_PER_PROCESS = 10  # concurrent producers per load-generating process
GENERATOR_SATURATED = 90  # % of a core: a load generator this busy may cap what it measures


@dataclass(frozen=True)
class BenchConfig:
    tasks: int = 100_000  # end-to-end and batched-submit task count
    single: int = 5_000  # tasks submitted one request at a time
    workers: int = 2  # worker processes for end-to-end
    concurrency: int = 64  # per worker
    payload_bytes: int = 16
    batch: int = 250  # tasks per submit_many: what tq's own bulk paths send
    in_flight: int = 4  # submit_many requests in flight at once
    latency_samples: int = 2000
    backlogs: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    claim_batch: int = 100
    claims: int = 20_000  # tasks claimed per backlog level
    synchronous: str = "full"
    store: str = ""  # a PostgreSQL URL: each broker gets a fresh schema in it; "": SQLite
    scenarios: tuple[str, ...] = SCENARIOS
    keep: bool = False  # keep the temporary data directories
    producers: int = 50  # concurrent one-at-a-time producers (the web-app pattern)


@dataclass
class Report:
    setup: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)


def _payload(cfg: BenchConfig, n: int) -> dict[str, Any]:
    return {"n": n, "pad": "x" * max(0, cfg.payload_bytes - 16)}


def _specs(cfg: BenchConfig, start: int, count: int) -> list[dict[str, Any]]:
    return [{"type": "echo", "payload": _payload(cfg, n)} for n in range(start, start + count)]


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "samples": len(ordered),
        "p50_ms": round(pick(0.50), 3),
        "p99_ms": round(pick(0.99), 3),
        "p999_ms": round(pick(0.999), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


class Bench:
    def __init__(self, cfg: BenchConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log
        self.root = Path(tempfile.mkdtemp(prefix="tq-bench-"))
        self._count = 0
        self.schemas: list[str] = []  # PostgreSQL schemas made for the brokers (dropped)

    def broker(self) -> BrokerProcess:
        self._count += 1
        data = self.root / f"broker{self._count}"
        store = ["--store", self._fresh_schema()] if self.cfg.store else []
        return BrokerProcess(data, "--synchronous", self.cfg.synchronous, *store).start()

    def _fresh_schema(self) -> str:
        """An empty schema in the --store database for the next broker: its URL."""
        import psycopg

        name = f"tq_bench_{os.getpid()}_{self._count}"
        with psycopg.connect(self.cfg.store, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
            conn.execute(f"CREATE SCHEMA {name}")
        self.schemas.append(name)
        sep = "&" if "?" in self.cfg.store else "?"
        return f"{self.cfg.store}{sep}options=-csearch_path%3D{name}"

    def drop_schemas(self) -> None:
        if not self.schemas:
            return
        import psycopg

        with psycopg.connect(self.cfg.store, autocommit=True) as conn:
            for name in self.schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

    # -- helpers -----------------------------------------------------------
    async def submit_batched(self, client: Client, total: int, start: int = 0) -> str:
        """Submit ``total`` tasks, ``in_flight`` batches at a time; the last task's id."""
        cfg = self.cfg
        limit = trio.Semaphore(cfg.in_flight)
        last = ""

        async def one(first: int, count: int) -> None:
            nonlocal last
            try:
                ids = await client.submit_many(_specs(cfg, first, count))
                if first + count == start + total:
                    last = ids[-1]
            finally:
                limit.release()

        async with trio.open_nursery() as nursery:
            for first in range(start, start + total, cfg.batch):
                await limit.acquire()
                nursery.start_soon(one, first, min(cfg.batch, start + total - first))
        return last

    # -- scenarios -----------------------------------------------------------
    async def submit(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {}
        broker = self.broker()
        try:
            async with _client(broker) as client:
                started = time.perf_counter()
                for n in range(cfg.single):
                    await client.submit("echo", _payload(cfg, n))
                elapsed = time.perf_counter() - started
                out["single"] = {"tasks": cfg.single, "tasks_per_s": round(cfg.single / elapsed)}
                self.log(f"submit, one at a time: {cfg.single / elapsed:,.0f} tasks/s")
                started = time.perf_counter()
                await self.submit_batched(client, cfg.tasks)
                elapsed = time.perf_counter() - started
                out["batched"] = {
                    "tasks": cfg.tasks,
                    "batch": cfg.batch,
                    "in_flight": cfg.in_flight,
                    "tasks_per_s": round(cfg.tasks / elapsed),
                }
                self.log(f"submit_many, batches of {cfg.batch}: {cfg.tasks / elapsed:,.0f} tasks/s")
            out["stdin"] = self._submit_stdin(broker)
        finally:
            broker.close()
        return out

    def _submit_stdin(self, broker: BrokerProcess) -> dict[str, Any]:
        cfg = self.cfg
        path = self.root / "tasks.jsonl"
        with open(path, "w") as f:
            for spec in _specs(cfg, 0, cfg.tasks):
                f.write(json.dumps(spec) + "\n")
        started = time.perf_counter()
        with open(path, "rb") as stdin:
            proc = subprocess.run(
                tq_command("submit", "-", *broker.client_args()),
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=broker.env,
                check=False,
            )
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise BenchError(f"tq submit - failed: {proc.stderr.decode()[-2000:]}")
        self.log(
            f"tq submit - of {cfg.tasks:,} JSON lines: {cfg.tasks / elapsed:,.0f} tasks/s "
            "(process start included)"
        )
        return {"tasks": cfg.tasks, "tasks_per_s": round(cfg.tasks / elapsed)}

    async def e2e(self, measure_latency: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        broker = self.broker()
        probe = None
        try:
            for _ in range(cfg.workers):
                broker.start_worker("--concurrency", str(cfg.concurrency))
            async with _client(broker) as client:
                with trio.fail_after(60):
                    while len(await client.workers()) < cfg.workers:
                        await trio.sleep(0.05)
                broker_proc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
                probe = self._start_probe(broker) if measure_latency else None
                broker_proc.cpu_percent(None)
                started = time.monotonic()
                async with trio.open_nursery() as watch:
                    watch.start_soon(_watch_processes, broker)  # a crash fails the run
                    last = await self.submit_batched(client, cfg.tasks)
                    submitted_at = time.monotonic()
                    submitted = submitted_at - started
                    # tasks finish roughly in submission order: wait for the last one
                    # server-side, then confirm with (table-scanning) stats, sparingly
                    await client.wait(last)
                    samples = self._stop_probe(probe) if probe else []
                    while True:
                        counts = (await client.stats())["queues"].get("default", {})
                        if counts.get("succeeded", 0) >= cfg.tasks + len(samples):
                            break
                        await trio.sleep(0.1)
                    watch.cancel_scope.cancel()
                elapsed = time.monotonic() - started
                cpu = broker_proc.cpu_percent(None)
        finally:
            if probe and probe[0].poll() is None:
                probe[0].kill()
                probe[0].wait()
            broker.close()
        rate = cfg.tasks / elapsed
        self.log(
            f"end to end, {cfg.tasks:,} no-op tasks, {cfg.workers} worker(s) x "
            f"{cfg.concurrency}: {rate:,.0f} tasks/s (all submitted after {submitted:.2f}s; "
            f"broker CPU {cpu:.0f}%)"
        )
        out: dict[str, Any] = {
            "tasks": cfg.tasks,
            "workers": cfg.workers,
            "concurrency": cfg.concurrency,
            "seconds": round(elapsed, 3),
            "tasks_per_s": round(rate),
            "broker_cpu_percent": round(cpu),
        }
        if measure_latency:
            loaded = [(t, d) for t, d in samples if t >= started]  # not the idle warm-up
            whole = _percentiles([d for _, d in loaded])
            bulk = [d for t, d in loaded if t < submitted_at]
            drain = [d for t, d in loaded if t >= submitted_at]
            out["submit_latency_under_load"] = whole
            out["phases"] = {
                "bulk_submit": _percentiles(bulk) if bulk else None,
                "drain": _percentiles(drain) if drain else None,
            }
            self.log(f"submit latency under load: {_fmt_latency(whole)}")
            for name, part in (("bulk submits flowing", bulk), ("workers draining", drain)):
                if part:
                    self.log(f"  while {name}: {_fmt_latency(_percentiles(part))}")
        return out

    def _start_probe(self, broker: BrokerProcess) -> tuple[subprocess.Popen[bytes], Path]:
        """The latency probe, in a process of its own (see tq.bench.probe), once it has
        had an ACK, so that connecting is not part of the load."""
        out = Path(tempfile.mkstemp(prefix="probe-", suffix=".txt", dir=self.root)[1])
        key = broker.key
        proc = subprocess.Popen(
            tq_command(
                "bench-probe", "--broker", broker.address,
                "--ca", str(broker.ca), *(["--key", key] if key else []), "--out", str(out),
                "--payload-bytes", str(self.cfg.payload_bytes),
                "--limit", str(self.cfg.tasks),
            ),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise BenchError(f"the latency probe did not start (exit {proc.poll()})")
            time.sleep(0.02)
        return proc, out

    @staticmethod
    def _stop_probe(probe: tuple[subprocess.Popen[bytes], Path]) -> list[tuple[float, float]]:
        """Stop the probe; every submit it made, as (monotonic time sent, seconds)."""
        proc, out = probe
        proc.terminate()
        if proc.wait(timeout=30) != 0:
            raise BenchError(f"the latency probe failed (exit {proc.returncode})")
        return [
            (float(sent), float(took))
            for sent, took in (line.split() for line in out.read_text().splitlines())
        ]

    async def latency(self) -> dict[str, Any]:
        broker = self.broker()
        try:
            async with _client(broker) as client:
                samples = []
                for _ in range(self.cfg.latency_samples):
                    started = time.perf_counter()
                    await client.submit("echo", _payload(self.cfg, 0))
                    samples.append(time.perf_counter() - started)
        finally:
            broker.close()
        idle = _percentiles(samples)
        self.log(f"submit latency at an idle broker: {_fmt_latency(idle)}")
        loaded = await self.e2e(measure_latency=True)
        return {
            "idle": idle,
            "under_load": loaded["submit_latency_under_load"],
            "under_load_phases": loaded["phases"],
            "load": {
                k: v for k, v in loaded.items() if k not in ("submit_latency_under_load", "phases")
            },
        }

    async def single(self) -> dict[str, Any]:
        """One call per task, as most applications make them: the blocking client's
        round trip for trivial reads and durable submits (with the broker's CPU per
        call), many concurrent one-at-a-time producers against one (no workers
        running), then one producer with two workers running the tasks (end to end)."""
        cfg = self.cfg
        out: dict[str, Any] = {}
        broker = self.broker()
        try:
            proc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
            calls = await trio.to_thread.run_sync(self._blocking_calls, broker, proc)
            out.update(calls)
            out["producers"] = await trio.to_thread.run_sync(self._producers, broker)
            for _ in range(cfg.workers):
                broker.start_worker("--concurrency", str(cfg.concurrency))
            async with _client(broker) as client:
                with trio.fail_after(60):
                    while len(await client.workers()) < cfg.workers:
                        await trio.sleep(0.05)
                async with trio.open_nursery() as watch:
                    watch.start_soon(_watch_processes, broker)
                    out["end_to_end"] = await self._single_e2e(broker, client)
                    watch.cancel_scope.cancel()
        finally:
            broker.close()
        get, submit, many = out["get"], out["submit"], out["producers"]
        self.log(
            f"one call per task, summary: idle submit p50 {submit['p50_ms']:.3f} ms, "
            f"p99 {submit['p99_ms']:.3f} ms; idle get p50 {get['p50_ms']:.3f} ms, "
            f"p99 {get['p99_ms']:.3f} ms; {many['producers']} producers "
            f"{many['tasks_per_s']:,} tasks/s = {many['x_one_producer']}x one producer "
            f"({many['one_producer_per_s']:,} tasks/s)"
        )
        return out

    def _blocking_calls(self, broker: BrokerProcess, proc: psutil.Process) -> dict[str, Any]:
        """In a thread: get, depth and submit, one at a time, from a BlockingClient."""
        n = self.cfg.single
        out: dict[str, Any] = {}
        with broker.client() as client:
            task_id = client.submit("echo", _payload(self.cfg, 0))
            calls: dict[str, Callable[[], object]] = {
                "get": lambda: client.get(task_id),
                "depth": client.queue_depth,
                "submit": lambda: client.submit("echo", _payload(self.cfg, 0)),
            }
            for name, call in calls.items():
                for _ in range(200):  # warm up
                    call()
                samples = []
                cpu = sum(proc.cpu_times()[:2])
                started = time.perf_counter()
                for _ in range(n):
                    begun = time.perf_counter()
                    call()
                    samples.append(time.perf_counter() - begun)
                elapsed = time.perf_counter() - started
                cpu = sum(proc.cpu_times()[:2]) - cpu
                figures = _percentiles(samples)
                out[name] = {
                    "per_s": round(n / elapsed),
                    "p50_ms": figures["p50_ms"],
                    "p99_ms": figures["p99_ms"],
                    "broker_cpu_us": round(cpu / n * 1e6),
                }
                self.log(
                    f"one at a time, blocking client: {name} {n / elapsed:,.0f}/s, "
                    f"p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms, "
                    f"broker CPU {cpu / n * 1e6:,.0f} us per call"
                )
        return out

    async def _single_e2e(self, broker: BrokerProcess, client: Client) -> dict[str, Any]:
        """One producer submitting one task per call while two workers run them: from
        the first submit until the last task succeeded."""
        n = self.cfg.single

        def produce() -> str:
            with broker.client() as producer:
                last = ""
                for i in range(n):
                    last = producer.submit("echo", _payload(self.cfg, i))
                return last

        started = time.perf_counter()
        last = await trio.to_thread.run_sync(produce)
        submitted = time.perf_counter() - started
        await client.wait(last)
        with trio.fail_after(120):
            while (await client.queue_depth())["queues"]:
                await trio.sleep(0.02)
        elapsed = time.perf_counter() - started
        self.log(
            f"one call per task, end to end ({n:,} tasks, {self.cfg.workers} workers): "
            f"{n / elapsed:,.0f} tasks/s (enqueue alone {n / submitted:,.0f} tasks/s)"
        )
        return {
            "tasks": n,
            "enqueue_per_s": round(n / submitted),
            "tasks_per_s": round(n / elapsed),
        }

    def _producers(self, broker: BrokerProcess) -> dict[str, Any]:
        """``producers`` connections, each submitting one task and awaiting its ACK
        before the next, against one such producer: do they share group commits?"""
        cfg = self.cfg
        one = self._producer_group(broker, 1, cfg.single)
        many = self._producer_group(broker, cfg.producers, max(1, cfg.single // cfg.producers))
        ratio = many["tasks_per_s"] / one["tasks_per_s"]
        capped = max(many["generator_cpu_percent"]) >= GENERATOR_SATURATED
        self.log(
            f"{cfg.producers} concurrent producers, one task per call, in "
            f"{len(many['generator_cpu_percent'])} processes: {many['tasks_per_s']:,} tasks/s "
            f"= {ratio:.1f}x one producer ({one['tasks_per_s']:,} tasks/s), "
            f"p50 {many['p50_ms']:.2f} ms, p99 {many['p99_ms']:.2f} ms; broker CPU "
            f"{many['broker_cpu_percent']}% of a core, the busiest load "
            f"generator used {max(many['generator_cpu_percent'])}% of a core"
            + (" (saturated: the figure is a floor)" if capped else "")
        )
        return {
            "producers": cfg.producers,
            "processes": len(many["generator_cpu_percent"]),
            "tasks": many["tasks"],
            "tasks_per_s": many["tasks_per_s"],
            "one_producer_per_s": one["tasks_per_s"],
            "x_one_producer": round(ratio, 1),
            "p50_ms": many["p50_ms"],
            "p99_ms": many["p99_ms"],
            "broker_cpu_percent": many["broker_cpu_percent"],
            "generator_cpu_percent": many["generator_cpu_percent"],
            "generator_saturated": capped,
        }

    def _producer_group(self, broker: BrokerProcess, producers: int, each: int) -> dict[str, Any]:
        """``producers`` one-at-a-time producers, ``each`` submits apiece, spread over
        processes of at most PRODUCERS_PER_PROCESS (``tq bench-probe --producers``),
        started together once all are connected."""
        self._count += 1
        sizes = [
            min(PRODUCERS_PER_PROCESS, producers - first)
            for first in range(0, producers, PRODUCERS_PER_PROCESS)
        ]
        outs = [self.root / f"producers{self._count}-{i}.json" for i in range(len(sizes))]
        key = broker.key
        procs: list[subprocess.Popen[bytes]] = []
        for size, out in zip(sizes, outs, strict=True):
            command = tq_command(
                "bench-probe", "--broker", broker.address, "--ca", str(broker.ca),
                *(["--key", key] if key else []), "--out", str(out),
                "--payload-bytes", str(self.cfg.payload_bytes),
                "--producers", str(size), "--limit", str(each),
            )  # fmt: skip
            procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        broker_proc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
        try:
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != b"ready":
                    raise BenchError(f"a producer process did not connect (exit {proc.wait()})")
            broker_cpu = sum(broker_proc.cpu_times()[:2])
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
            for proc in procs:
                if proc.wait(timeout=600) != 0:
                    raise BenchError(f"a producer process failed (exit {proc.returncode})")
            broker_cpu = sum(broker_proc.cpu_times()[:2]) - broker_cpu
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        runs = [json.loads(out.read_text()) for out in outs]
        samples = [s for run in runs for s in run["samples"]]
        elapsed = max(r["ended"] for r in runs) - min(r["started"] for r in runs)
        figures = _percentiles(samples)
        return {
            "tasks": len(samples),
            "tasks_per_s": round(len(samples) / elapsed),
            "p50_ms": figures["p50_ms"],
            "p99_ms": figures["p99_ms"],
            "broker_cpu_percent": round(100 * broker_cpu / elapsed),
            "generator_cpu_percent": [
                round(100 * r["cpu_s"] / max(r["ended"] - r["started"], 1e-9)) for r in runs
            ],
        }

    async def backlog(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {}
        broker = self.broker()
        try:
            proc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
            async with (
                _client(broker) as client,
                _client(
                    broker, kind="worker", hello={"worker_id": "bench", "queues": ["default"]}
                ) as worker,
            ):
                pending = 0
                for level in sorted(cfg.backlogs):
                    await self.submit_batched(client, level - pending, start=pending)
                    pending = level
                    rates = []
                    for _ in range(CLAIM_ROUNDS):  # this VM's noise: report the median
                        await _settled(broker.data / "tq.db-wal")
                        rates.append(await self._claim_rate(worker))
                    rate = statistics.median(rates)
                    rss = proc.memory_info().rss
                    out[str(level)] = {
                        "claim_per_s": round(rate),
                        "broker_rss_mb": round(rss / 1e6, 1),
                    }
                    self.log(
                        f"backlog {level:>9,} pending: claim {rate:,.0f} tasks/s "
                        f"(batches of {cfg.claim_batch}, median of {CLAIM_ROUNDS}), "
                        f"broker RSS {rss / 1e6:,.1f} MB"
                    )
        finally:
            broker.close()
        return out

    async def _claim_rate(self, worker: Client) -> float:
        """Claim cfg.claims tasks in batches, then give them all back (release)."""
        cfg = self.cfg
        leases: list[dict[str, Any]] = []
        started = time.perf_counter()
        while len(leases) < cfg.claims:
            reply = await worker.request(
                {"t": "claim", "n": cfg.claim_batch, "queues": ["default"], "wait": 0}
            )
            if not reply["tasks"]:
                break
            leases += reply["tasks"]
        elapsed = time.perf_counter() - started
        for first in range(0, len(leases), 1000):
            batch = [
                {"id": lease["id"], "token": lease["token"], "status": "release"}
                for lease in leases[first : first + 1000]
            ]
            await worker.request({"t": "result", "results": batch})
        return len(leases) / elapsed


async def _watch_processes(broker: BrokerProcess) -> None:
    """Raise BenchError as soon as the broker or one of its workers exits."""
    while True:
        for index, proc in enumerate(broker.workers):
            if proc.poll() is not None:
                log = broker.data / f"worker{index}.log"
                raise BenchError(f"worker {index} exited with {proc.returncode}; see {log}")
        if broker.proc is not None and broker.proc.poll() is not None:
            raise BenchError(f"the broker exited with {broker.proc.returncode}; see {broker.log}")
        await trio.sleep(0.2)


async def _settled(wal: Path, timeout: float = 60.0) -> None:
    """Wait until the broker has checkpointed what was just written (it empties the
    WAL after ~1 s without writes), so the claims timed next do not share the disk
    and the writer with a checkpoint of up to a million fresh rows."""
    with trio.move_on_after(timeout):
        while wal.exists() and wal.stat().st_size > 0:
            await trio.sleep(0.1)


def _fmt_latency(p: dict[str, float]) -> str:
    return (
        f"p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, p99.9 {p['p999_ms']:.2f} ms "
        f"(max {p['max_ms']:.1f} ms, {p['samples']} samples)"
    )


def _client(broker: BrokerProcess, **kwargs: Any) -> Any:
    return Client.connect(broker.address, ca=broker.ca, **{**broker.client_kwargs(), **kwargs})


def setup(cfg: BenchConfig) -> dict[str, Any]:
    import apsw

    from tq.store import parse_store_url

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    if cfg.store:
        config["store"] = parse_store_url(cfg.store).shown  # never a password in a report
    return {
        "store": "sqlite" if not cfg.store else parse_store_url(cfg.store).backend,
        "tq": __version__,
        "config": config,
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "tls": True,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> Report:
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    report = Report(setup(cfg))
    bench = Bench(cfg, say)
    say(
        f"tq bench: {report.setup['cores']} cores, store {report.setup['store']}, "
        f"synchronous={cfg.synchronous}, "
        f"payload {cfg.payload_bytes} B, TLS on; data under {bench.root}"
    )

    async def main() -> None:
        for name in cfg.scenarios:
            report.results[name] = await getattr(bench, name)()

    keep = cfg.keep
    try:
        trio.run(main)
    except* BenchError:
        keep = True  # the message points at a log in there
        say(f"tq bench: kept {bench.root} (the logs of the failed run)")
        raise
    finally:
        if not keep:
            import shutil

            shutil.rmtree(bench.root, ignore_errors=True)
            bench.drop_schemas()
    return report
