"""packaging/observability: the rules pass promtool, and every metric they and the dashboard
name is one a live broker's /metrics really serves.

promtool comes from Debian's ``prometheus`` package, which .ci/run installs: in CI
(CI set) a missing promtool fails these tests; elsewhere they are skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tq.testing import running_broker, running_worker

PACK = Path(__file__).resolve().parent.parent / "packaging" / "observability"
RULES = PACK / "tq-rules.yml"
RULE_TESTS = PACK / "tq-rules.test.yml"
DASHBOARD = PACK / "grafana-dashboard.json"
SCRAPE_CONFIGS = (PACK / "prometheus.yml", PACK / "prometheus-cluster.yml")
API = "/api/v1"

# Series Prometheus makes itself for every target, not found on any /metrics page.
PROMETHEUS_SERIES = {"up"}


# -- metric names out of PromQL ---------------------------------------------------------

_KEYWORDS = {
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring",
    "group_left", "group_right", "offset", "inf", "nan",
}  # fmt: skip
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+|@\s*[\w.()]+")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values(...)`` query) reads.

    An identifier is a metric name unless it is followed by ``(`` (a function or an
    aggregation), is a keyword, or sits inside a label matcher, a range, a grouping
    clause, a string or a Grafana variable, all of which are removed first.
    """
    if match := _LABEL_VALUES.match(expr):
        expr = match.group(1)
    text = _GRAFANA_VARIABLE.sub(" ", expr)
    text = _STRING.sub(" ", text)
    for pattern in (_MATCHERS, _RANGE, _GROUPING, _OFFSET):
        text = pattern.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_metric_names_finds_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, queue) (rate(tq_task_run_seconds_bucket{job="tq",'
        ' queue=~"$queue", type!="a{b}"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"tq_task_run_seconds_bucket"}
    assert metric_names(
        "tq_workers_connected == 0 and on (job, instance) sum by (job, instance)"
        ' (tq_queue_depth{state="pending"}) > 1e3'
    ) == {"tq_workers_connected", "tq_queue_depth"}
    assert metric_names("sum(rate(a_total[5m] offset 1h)) / ignoring(x) group_left b") == {
        "a_total",
        "b",
    }
    assert metric_names("up{job='tq'} == 0 unless bool c:recorded") == {"up", "c:recorded"}
    assert metric_names('label_values(tq_broker_info{job="tq"}, instance)') == {"tq_broker_info"}
    assert metric_names("max_over_time(deriv(x[15m:1m])[1h:]) * 60") == {"x"}
    assert metric_names("vector(1)") == set()


# -- the expressions of the pack --------------------------------------------------------


def rule_expressions() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in _panels(doc["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"variable ${variable['name']}", query.get("query", query)))
    return found


def test_the_pack_has_expressions_that_each_name_a_metric() -> None:
    rules, panels = rule_expressions(), dashboard_expressions()
    alerts = {name for name, _ in rules}
    assert {"TQBrokerDown", "TQBacklogGrowing", "TQQueueNotDraining", "TQDeadTasks"} <= alerts
    assert {"TQNoWorkers", "TQQueueNotProcessed", "TQLeaseExpiries", "TQStoreWALLarge"} <= alerts
    assert len(panels) >= 20
    for where, expr in rules + panels:
        assert metric_names(expr), f"{where}: no metric name found in {expr!r}"


def test_dashboard_panels_are_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = list(_panels(doc["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"] for variable in doc["templating"]["list"]}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, f"{panel['title']}: unknown variables {used - variables}"


def test_scrape_configs_use_https_the_ca_and_a_key_file() -> None:
    for path in SCRAPE_CONFIGS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["rule_files"] == [RULES.name]
        jobs = doc["scrape_configs"]
        assert jobs, path.name
        for job in jobs:
            assert job["scheme"] == "https", (path.name, job["job_name"])
            assert job["tls_config"]["ca_file"].endswith("ca.pem")
            assert job["authorization"]["credentials_file"].endswith(".key")
            assert job.get("metrics_path", "/metrics") == "/metrics"
        if len(jobs) > 1:  # a cluster: every broker's series land in job="tq"
            for job in jobs:
                assert {"target_label": "job", "replacement": "tq"} in job["relabel_configs"]


# -- promtool ---------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str | Path) -> str:
    out = subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=PACK
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", RULES)
    assert f"SUCCESS: {len(rule_expressions())} rules found" in out


def test_promtool_test_rules() -> None:
    """Each alert fires on the series meant to fire it and not on its neighbours."""
    doc = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    tested = {
        case["alertname"]
        for test in doc["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {name for name, _ in rule_expressions()}, "every alert has a firing test"
    assert "SUCCESS" in run_promtool("test", "rules", RULE_TESTS)


@pytest.mark.parametrize("config", SCRAPE_CONFIGS, ids=lambda p: p.name)
def test_promtool_check_scrape_config(config: Path) -> None:
    # --syntax-only: the CA and key files named in the config live on the Prometheus host
    assert "SUCCESS" in run_promtool("check", "config", "--syntax-only", config)


# -- against a live broker --------------------------------------------------------------


def page_names(text: str) -> set[str]:
    """Every sample name on an exposition page (``x_total``, ``h_bucket``, ...)."""
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def family_of(name: str, families: set[str]) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            return name.removesuffix(suffix)
    return name


async def settle(http: Any, state: str, n: int) -> None:
    with trio.fail_after(20):
        while len((await http.get(f"{API}/tasks", params={"state": state})).json()["tasks"]) < n:
            await trio.sleep(0.05)


@pytest.mark.trio
async def test_every_metric_the_pack_names_is_served(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        tasks = [
            {"type": "echo", "queue": "mail"},
            {"type": "echo"},
            {"type": "fail", "max_retries": 0, "payload": "boom"},
            {"type": "nobody-handles-this", "queue": "parked"},  # stays pending
        ]
        assert (await http.post(f"{API}/tasks", json=tasks)).status_code == 201
        async with running_worker(broker, queues=("default", "mail")):
            await settle(http, "succeeded", 2)
            await settle(http, "dead", 1)
            response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    served = page_names(response.text)
    families = {family.name for family in text_string_to_metric_families(response.text)}
    missing = {}
    for where, expr in rule_expressions() + dashboard_expressions():
        for name in metric_names(expr) - served - PROMETHEUS_SERIES:
            missing.setdefault(f"{name} (family {family_of(name, families)})", []).append(where)
    assert not missing, f"named by the pack but not on /metrics: {missing}"
