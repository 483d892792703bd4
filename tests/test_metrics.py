"""GET /metrics: counters, gauges and histograms from a real broker; promtool's lint.

promtool comes from Debian's ``prometheus`` package, which .ci/run installs:
in CI (CI=true) a missing promtool fails the test; elsewhere it is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import tq
from tq.broker.activity import (
    MAX_QUEUES,
    MAX_SERIES,
    MAX_TYPES,
    OTHER,
    WINDOW,
    Activity,
    Histogram,
    Labels,
)
from tq.http import metrics as metrics_module
from tq.store.base import OutcomeResult
from tq.testing import running_broker, running_worker

API = "/api/v1"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(http: Any) -> str:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return str(response.text)


async def settle(http: Any, state: str, n: int) -> None:
    with trio.fail_after(20):
        while True:
            page = (await http.get(f"{API}/tasks", params={"state": state})).json()
            if len(page["tasks"]) >= n:
                return
            await trio.sleep(0.05)


@pytest.mark.trio
async def test_metrics_count_what_happened(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        tasks = [{"type": "echo", "queue": "mail"}] * 3 + [
            {"type": "fail", "max_retries": 0, "payload": "boom"},
            {"type": "fail", "max_retries": 1, "retry_base": 0, "payload": "boom"},
        ]
        assert (await http.post(f"{API}/tasks", json=tasks)).status_code == 201
        await http.post(f"{API}/tasks", json={"type": "sleep", "payload": 30, "queue": "slow"})
        async with broker.client(kind="worker") as holder:  # leases the slow task, runs nothing
            claim = {"t": "claim", "n": 1, "queues": ["slow"], "wait": 1.0}
            assert len((await holder.request(claim))["tasks"]) == 1
            async with running_worker(broker, concurrency=4, queues=("default", "mail")):
                await settle(http, "succeeded", 3)
                await settle(http, "dead", 2)
                got = samples(await scrape(http))
        mail = (("queue", "mail"), ("type", "echo"))
        fail = (("queue", "default"), ("type", "fail"))
        assert got[("tq_tasks_submitted_total", mail)] == 3
        assert got[("tq_tasks_succeeded_total", mail)] == 3
        assert got[("tq_tasks_failed_total", fail)] == 3  # 1 + 2 attempts
        assert got[("tq_tasks_retried_total", fail)] == 1
        assert got[("tq_tasks_dead_total", fail)] == 2
        assert got[("tq_task_run_seconds_count", mail)] == 3
        assert got[("tq_task_run_seconds_bucket", (("le", "+Inf"), *mail))] == 3
        assert got[("tq_submit_latency_seconds_count", ())] == 2  # two submit requests
        assert got[("tq_queue_depth", (("queue", "slow"), ("state", "running")))] == 1
        assert got[("tq_tasks_running", ())] == 1
        assert got[("tq_workers_connected", ())] == 2
        assert got[("tq_store_size_bytes", ())] > 0
        assert got[("tq_broker_info", (("broker", "tq"), ("version", tq.__version__)))] == 1
        assert ("tq_lease_expiries_total", ()) in got


@pytest.mark.trio
async def test_each_broker_has_its_own_registry(tmp_path: Path) -> None:
    async with (
        running_broker(tmp_path / "a") as a,
        running_broker(tmp_path / "b") as b,
        a.http_client() as http_a,
        b.http_client() as http_b,
    ):
        await http_a.post(f"{API}/tasks", json=[{"type": "echo"}] * 2)
        await http_b.post(f"{API}/tasks", json={"type": "echo"})
        key = ("tq_tasks_submitted_total", (("queue", "default"), ("type", "echo")))
        assert samples(await scrape(http_a))[key] == 2
        assert samples(await scrape(http_b))[key] == 1


@pytest.mark.trio
async def test_the_store_commit_counters_move_with_writes(tmp_path: Path) -> None:
    names = ("commits", "committed_operations", "grouped_submits")
    keys = [(f"tq_store_{name}_total", ()) for name in names]

    async def counters(http: Any) -> list[float]:
        got = samples(await scrape(http))
        return [got[key] for key in keys]

    async with (
        running_broker(tmp_path) as broker,
        broker.http_client() as http,
        broker.client() as client,
    ):
        commits, ops, grouped = await counters(http)
        for n in range(5):  # one at a time: each its own committed operation
            await client.submit("echo", n)
        now_commits, now_ops, now_grouped = await counters(http)
        assert now_ops >= ops + 5
        assert commits < now_commits <= commits + (now_ops - ops)
        assert now_grouped == grouped  # nothing ran concurrently

        async def submit_at_once() -> None:  # pipelined on one connection
            async with trio.open_nursery() as nursery:
                for n in range(40):
                    nursery.start_soon(client.submit, "echo", n)

        with trio.fail_after(30):  # submits that arrive during a batch share the next one
            while (await counters(http))[2] == now_grouped:
                await submit_at_once()
        last_commits, last_ops, last_grouped = await counters(http)
        assert last_ops >= now_ops + 40
        assert last_commits < now_commits + (last_ops - now_ops)  # some shared a commit
        assert last_grouped > now_grouped


def promtool_or_skip() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return promtool


def promtool_lint(promtool: str, page: str) -> None:
    out = subprocess.run(
        [promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


@pytest.mark.trio
async def test_promtool_accepts_the_page(tmp_path: Path) -> None:
    promtool = promtool_or_skip()
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        async with running_worker(broker):
            await http.post(f"{API}/tasks", json=[{"type": "echo"}, {"type": "fail"}])
            await settle(http, "succeeded", 1)
            page = await scrape(http)
    promtool_lint(promtool, page)


def label_values(got: dict[Any, float], name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in got if sample == name}


@pytest.mark.trio
async def test_label_values_are_capped_and_the_rest_is_other(tmp_path: Path) -> None:
    # 1000 distinct (queue, type) pairs over 70 queues and 150 types: more than every cap
    queues, types, n = MAX_QUEUES + 20, MAX_TYPES + 50, 1000
    assert n > MAX_SERIES
    tasks = [{"type": f"t{i % types}", "queue": f"q{i % queues}"} for i in range(n)]
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        for start in range(0, n, 250):
            answer = await http.post(f"{API}/tasks", json=tasks[start : start + 250])
            assert answer.status_code == 201, answer.text
        page = await scrape(http)
    got = samples(page)
    submitted = "tq_tasks_submitted_total"
    series = [labels for sample, labels in got if sample == submitted]
    assert len(label_values(got, submitted, "queue")) <= MAX_QUEUES + 1
    assert len(label_values(got, submitted, "type")) <= MAX_TYPES + 1
    assert len(series) <= MAX_SERIES + MAX_QUEUES + MAX_TYPES + 1
    assert OTHER in label_values(got, submitted, "queue")
    assert OTHER in label_values(got, submitted, "type")
    # nothing is lost: the "(other)" series hold the rest
    assert sum(v for (sample, _), v in got.items() if sample == submitted) == n
    named = {labels: v for (s, labels), v in got.items() if s == submitted}
    assert sum(v for labels, v in named.items() if OTHER in dict(labels).values()) > 0
    # queue depth too: at most MAX_QUEUES queues by name, every pending task counted
    depth_queues = label_values(got, "tq_queue_depth", "queue")
    assert len(depth_queues) <= MAX_QUEUES + 1 and OTHER in depth_queues
    assert sum(v for (s, _), v in got.items() if s == "tq_queue_depth") == n
    assert len(page.encode()) < 1_000_000  # was ~1,000 series per family
    if shutil.which("promtool") or os.environ.get("CI"):
        promtool_lint(promtool_or_skip(), page)


@pytest.mark.trio
async def test_the_page_is_rendered_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    collect = metrics_module._TQCollector.collect

    def spy(self: Any) -> Any:
        threads.append(threading.get_ident())
        return collect(self)

    monkeypatch.setattr(metrics_module._TQCollector, "collect", spy)
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        await http.post(f"{API}/tasks", json={"type": "echo"})
        got = samples(await scrape(http))
    assert got[("tq_tasks_submitted_total", (("queue", "default"), ("type", "echo")))] == 1
    assert threads and threading.get_ident() not in threads  # the loop runs in this thread


# -- the recorder behind the page -------------------------------------------------------


def test_activity_window_throughput_and_failure_rate() -> None:
    activity = Activity()
    ok = OutcomeResult("a", True, "succeeded", "", "q", "t", 90.0)
    retry = OutcomeResult("b", True, "failed", "", "q", "t", 95.0)
    refused = OutcomeResult("c", False, "running", "stale", "q", "t", 95.0)
    activity.reported([ok, ok, ok, retry, refused], now=100.0)
    recent = activity.last_minute(100.0)
    assert recent.total == {"submitted": 0, "succeeded": 3, "failed": 1, "retried": 1, "dead": 0}
    assert recent.throughput == 4 / WINDOW and recent.failure_rate == 0.25
    assert activity.run_time[("q", "t")].count == 4
    assert activity.last_minute(100.0, visible=lambda q: q != "q").total["succeeded"] == 0
    later = activity.last_minute(100.0 + WINDOW)  # a minute on: the window is empty
    assert later.total["succeeded"] == 0 and later.failure_rate is None
    assert activity.totals[("q", "t")]["succeeded"] == 3  # totals are forever


def test_labels_keep_the_first_names_and_fold_the_rest() -> None:
    labels = Labels(max_queues=2, max_types=2, max_series=2)
    assert labels.pair("a", "x") == ("a", "x")
    assert labels.pair("a", "y") == ("a", "y")
    assert labels.pair("b", "x") == ("b", OTHER)  # kept names, but the pair cap is reached
    assert labels.pair("c", "x") == (OTHER, "x")  # a third queue
    assert labels.pair("a", "z") == ("a", OTHER)  # a third type
    assert labels.pair(OTHER, "x") == (OTHER, "x")  # a real name "(other)" is folded too
    assert labels.pair("a", "x") == ("a", "x")  # kept for good
    assert list(labels.queues) == ["a", "b"] and list(labels.types) == ["x", "y"]


def test_activity_memory_is_bounded_by_the_caps() -> None:
    activity = Activity(Labels(max_queues=3, max_types=4, max_series=5))
    pairs = [(f"q{i}", f"t{i}") for i in range(1000)]
    activity.submitted(pairs, now=10.0)
    outcomes = [
        OutcomeResult(str(i), True, "succeeded", "", q, t, 5.0) for i, (q, t) in enumerate(pairs)
    ]
    activity.reported(outcomes, now=10.0)
    assert len(activity.totals) <= 5 + 3 + 4 + 1 and len(activity.run_time) <= 5 + 3 + 4 + 1
    assert sum(c["submitted"] for c in activity.totals.values()) == 1000
    assert sum(h.count for h in activity.run_time.values()) == 1000
    recent = activity.last_minute(10.0)
    assert len(recent.queues) <= 3 + 1 and recent.total["succeeded"] == 1000
    # q0..q2 with t0..t2 by name, q3 (a fourth queue) with t3 (a kept type), then the rest
    assert activity.totals[(OTHER, "t3")]["submitted"] == 1
    assert activity.totals[(OTHER, OTHER)]["submitted"] == 996


def test_histogram_buckets_are_cumulative() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    assert hist.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert hist.count == 4 and hist.total == pytest.approx(3.65)
