"""`tq bench` runs every scenario end to end (tiny sizes: behaviour, not speed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tq.bench.runner import BenchError, _watch_processes
from tq.testing import tq_command

pytestmark = pytest.mark.slow

SMALL = [
    "bench", "--tasks", "2000", "--single", "100", "--workers", "1", "--concurrency", "8",
    "--batch", "100", "--backlogs", "1000,2000", "--latency-samples", "30", "--json",
]  # fmt: skip


def test_bench_runs_every_scenario_and_cleans_up() -> None:
    done = subprocess.run(tq_command(*SMALL), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["setup"]["tls"] is True and report["setup"]["config"]["synchronous"] == "full"
    results = report["results"]
    assert set(results) == {"submit", "e2e", "latency", "backlog", "single"}
    single = results["single"]
    for call in ("get", "depth", "submit"):
        figures = single[call]
        assert figures["per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"], figures
        assert figures["broker_cpu_us"] > 0
    assert single["end_to_end"]["tasks"] == 100 and single["end_to_end"]["tasks_per_s"] > 0
    producers = single["producers"]
    assert producers["tasks"] == 100 and producers["x_one_producer"] > 0
    # 50 producers spread over processes of at most 10, each process's CPU measured
    assert producers["producers"] == 50 and producers["processes"] == 5
    assert len(producers["generator_cpu_percent"]) == 5
    assert producers["generator_saturated"] is (max(producers["generator_cpu_percent"]) >= 90)
    assert producers["one_producer_per_s"] > 0 and producers["broker_cpu_percent"] > 0
    assert 0 < producers["p50_ms"] <= producers["p99_ms"]
    # the summary line states the idle round trips and the ratio it reports
    summary = re.search(
        r"idle submit p50 ([\d.]+) ms, p99 ([\d.]+) ms; idle get p50 ([\d.]+) ms, "
        r"p99 ([\d.]+) ms; 50 producers [\d,]+ tasks/s = ([\d.]+)x one producer",
        done.stderr,
    )
    assert summary, done.stderr
    shown = [float(x) for x in summary.groups()]
    assert shown == [
        single["submit"]["p50_ms"], single["submit"]["p99_ms"],
        single["get"]["p50_ms"], single["get"]["p99_ms"], producers["x_one_producer"],
    ]  # fmt: skip
    assert results["submit"]["single"]["tasks_per_s"] > 0
    assert results["submit"]["stdin"]["tasks"] == 2000
    assert results["e2e"]["tasks"] == 2000 and results["e2e"]["tasks_per_s"] > 0
    latency = results["latency"]
    assert latency["idle"]["samples"] == 30
    loaded = latency["under_load"]
    # the probe (its own process) submitted throughout the load, and each figure is ordered
    assert loaded["samples"] > 0
    assert loaded["p50_ms"] <= loaded["p99_ms"] <= loaded["p999_ms"] <= loaded["max_ms"]
    phases = latency["under_load_phases"]
    assert sum(p["samples"] for p in phases.values() if p) == loaded["samples"]
    backlog = results["backlog"]
    assert list(backlog) == ["1000", "2000"]
    assert all(b["claim_per_s"] > 0 and b["broker_rss_mb"] > 0 for b in backlog.values())
    # the temporary data directory is gone, and no broker, worker or probe outlives the run
    root = Path(re.search(r"data under (\S+)", done.stderr).group(1))  # type: ignore[union-attr]
    assert not root.exists()
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(str(root) in part for part in p.info["cmdline"] or [])
    ]
    assert leftovers == []


def test_bench_runs_on_postgresql_in_fresh_schemas_and_drops_them(pg_url: str) -> None:
    import psycopg

    args = ["-s", "e2e,backlog", "--store", pg_url]
    done = subprocess.run(tq_command(*SMALL, *args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["setup"]["store"] == "postgresql"
    assert report["results"]["e2e"]["tasks_per_s"] > 0
    assert all(b["claim_per_s"] > 0 for b in report["results"]["backlog"].values())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tq_bench_%'"
        ).fetchone()
    assert left == (0,)
    refused = subprocess.run(
        tq_command("bench", "--store", "sqlite:///x.db"), capture_output=True, text=True
    )
    assert refused.returncode == 2 and "postgresql://" in refused.stderr


def test_bench_refuses_an_unknown_scenario() -> None:
    done = subprocess.run(
        tq_command("bench", "-s", "e2e,warp"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "warp" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.trio
async def test_bench_stops_with_a_clear_error_when_a_worker_dies(tmp_path: Path) -> None:
    """Without the watch, the end-to-end run waited forever for tasks no one ran."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        procs = SimpleNamespace(workers=[alive, dead], proc=alive, data=tmp_path, log="b.log")
        with pytest.raises(BenchError, match=r"worker 1 exited with 3; see .*worker1\.log"):
            await _watch_processes(procs)  # type: ignore[arg-type]
    finally:
        alive.kill()
        alive.wait()
        dead.wait()
