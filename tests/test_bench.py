"""`tq bench` runs every scenario end to end (tiny sizes: behaviour, not speed)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import psutil
import pytest

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
    assert set(results) == {"submit", "e2e", "latency", "backlog"}
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


def test_bench_refuses_an_unknown_scenario() -> None:
    done = subprocess.run(
        tq_command("bench", "-s", "e2e,warp"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "warp" in done.stderr and "Traceback" not in done.stderr
