"""Dependencies and workflows end to end: a real broker and real workers on loopback
TLS (in this trio run, or as processes for the CLI and the kill -9 test)."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tq.core.errors import InvalidRequest, NotFound
from tq.core.workflow import compile_workflow
from tq.testing import BrokerProcess, running_broker, running_worker, tq_command
from tq.worker.handlers import HandlerRegistry, builtin_registry

# -- the document compiler (pure) -------------------------------------------------------


def test_compile_chain_group_chord() -> None:
    tasks = compile_workflow(
        {
            "chain": [
                {"type": "a"},
                {"group": [{"type": "b"}, {"chain": [{"type": "c"}, {"type": "d"}]}]},
                {"chord": [{"type": "e"}, {"type": "f"}], "callback": {"type": "g"}},
            ]
        }
    )
    assert [t["type"] for t in tasks] == list("abcdefg")
    deps = [t.get("depends_on") for t in tasks]
    assert deps == [None, ["#0"], ["#0"], ["#2"], ["#1", "#3"], ["#1", "#3"], ["#4", "#5"]]
    inputs = [t.get("input") for t in tasks]
    assert inputs == [None, "result", "result", "result", "results", "results", "results"]
    assert all(t["on_dependency_failure"] == "wait" for t in tasks[1:])


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ([], "must be a map"),
        ({"chain": []}, "workflow chain must be a non-empty array of nodes"),
        ({"group": [{"type": "a"}], "chain": [{"type": "b"}]}, "not several"),
        ({"chord": [{"type": "a"}]}, "needs a callback"),
        ({"chain": [{"type": "a"}, {"type": "b", "depends_on": ["x"]}]}, "chain[1]: depends_on"),
        ({"group": [{"payload": 1}]}, "group[0] must be a task"),
        ({"chain": [{"type": "a"}], "x": 1}, "unknown workflow field x; known: callback, chain"),
        ({"chain": [{"type": "a", "max_retries": True}]}, "workflow chain[0].max_retries must be"),
        ({"chain": [{"type": "a"}], "queue": "q"}, "['queue'] in a chain"),
        ({"type": "a", "callback": {"type": "b"}}, "a callback belongs to a chord, not a task"),
        (  # not a task field: named as what it is
            {"group": [{"type": "a"}], "callback": {"type": "b"}, "queue": "q"},
            "workflow: a callback belongs to a chord, not a group",
        ),
    ],
)
def test_compile_refuses_naming_the_node(document: Any, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says.replace("[", r"\[").replace("]", r"\]")):
        compile_workflow(document)


def test_tree_runs_a_chain_at_one_level_and_expands_a_callback_once() -> None:
    from rich.console import Console

    from tq.cli.workflows import render

    states = ["succeeded"] * 4 + ["blocked"] * 3
    tasks = [{"id": f"t{i}", "type": "s", "state": state} for i, state in enumerate(states)]
    edges = [["t1", "t0"], ["t2", "t1"], ["t3", "t2"], ["t4", "t2"], ["t5", "t2"]]
    edges += [["t6", "t3"], ["t6", "t4"], ["t6", "t5"]]
    console = Console(width=100, record=True)
    console.print(render({"tasks": tasks, "edges": edges, "truncated": False}))
    lines = console.export_text().splitlines()
    assert lines[0] == "workflow of 7 task(s): 3 blocked, 4 succeeded"
    assert [line.index("succeeded") for line in lines[1:4]] == [4, 4, 4]  # the chain
    assert sum("t6" in line for line in lines) == 3
    assert sum("shown above" in line for line in lines) == 2


# -- in-process broker and worker ---------------------------------------------------------


def _registry(calls: list[Any]) -> HandlerRegistry:
    registry = builtin_registry()

    async def inc(payload: Any) -> Any:
        return {"n": payload["n"] + 1}

    async def times10(payload: Any) -> Any:
        return payload * 10

    async def square(payload: Any) -> Any:
        return payload * payload

    async def total(payload: Any) -> Any:
        calls.append(payload)
        return sum(payload)

    for name, fn in (("inc", inc), ("times10", times10), ("square", square), ("total", total)):
        registry.register(name, fn)
    return registry


@pytest.mark.trio
async def test_chain_passes_results_and_chord_of_1000_calls_back_once(tmp_path: Path) -> None:
    calls: list[Any] = []
    async with (
        running_broker(tmp_path) as broker,
        running_worker(broker, _registry(calls), concurrency=16),
        broker.client() as client,
    ):
        chain = await client.submit_workflow(
            {
                "chain": [
                    {"type": "inc", "payload": {"n": 1}},
                    {"type": "inc"},
                    {"type": "times10", "result_key": "n"},
                ]
            }
        )
        last = await client.wait(chain[-1], timeout=60)
        assert (last.state.value, last.result) == ("succeeded", 30)
        assert last.payload == 3

        n = 1000
        chord = await client.submit_workflow(
            {
                "chord": [{"type": "square", "payload": i} for i in range(n)],
                "callback": {"type": "total"},
            }
        )
        assert len(chord) == n + 1
        done = await client.wait(chord[-1], timeout=60)
        assert done.state.value == "succeeded"
        assert calls == [[i * i for i in range(n)]]  # exactly once, every result in order
        assert done.result == sum(i * i for i in range(n))

        graph = await client.workflow(chord[0])
        assert len(graph["tasks"]) == n + 1 and len(graph["edges"]) == n
        assert {t["state"] for t in graph["tasks"]} == {"succeeded"}


@pytest.mark.trio
async def test_depends_on_through_the_client(tmp_path: Path) -> None:
    async with (
        running_broker(tmp_path) as broker,
        broker.client() as client,
    ):
        first = await client.submit("echo", 1)
        then = await client.submit("echo", 2, depends_on=[first])
        assert (await client.get(then)).state.value == "blocked"
        explained = await client.explain(then)
        assert explained["reasons"][0]["code"] == "blocked"
        assert explained["reasons"][0]["waiting_for"] == [first]
        with pytest.raises(NotFound, match="no-such"):
            await client.submit("echo", depends_on=["no-such"])
        await client.cancel(first)
        assert (await client.get(then)).state.value == "cancelled"
        async with running_worker(broker):
            ran = await client.submit("echo", 3, depends_on=[first], on_dependency_failure="run")
            assert (await client.wait(ran, timeout=30)).state.value == "succeeded"


@pytest.mark.trio
async def test_retrying_a_dead_step_resumes_the_workflow(tmp_path: Path) -> None:
    attempts: list[Any] = []
    registry = builtin_registry()

    async def flaky(payload: Any) -> Any:
        attempts.append(payload)
        if len(attempts) == 1:
            raise RuntimeError("first time fails")
        return payload + 1

    registry.register("flaky", flaky)
    async with (
        running_broker(tmp_path) as broker,
        running_worker(broker, registry),
        broker.client() as client,
    ):
        ids = await client.submit_workflow(
            {
                "chain": [
                    {"type": "echo", "payload": 1},
                    {"type": "flaky", "max_retries": 0},
                    {"type": "echo"},
                ]
            }
        )
        assert (await client.wait(ids[1], timeout=30)).state.value == "dead"
        assert (await client.get(ids[2])).state.value == "blocked"  # waits, not cancelled
        explained = await client.explain(ids[2])
        assert explained["reasons"][0]["waiting_for"] == [ids[1]]
        await client.retry(ids[1])
        done = await client.wait(ids[2], timeout=30)
        assert (done.state.value, done.result) == ("succeeded", 2)
        assert attempts == [1, 1]


@pytest.mark.trio
async def test_rest_workflow_submit_and_graph(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        document = {"chord": [{"type": "echo", "payload": 1}], "callback": {"type": "echo"}}
        made = await http.post("/api/v1/workflows", json=document)
        assert made.status_code == 201, made.text
        body = made.json()
        assert len(body["tasks"]) == 2 and body["id"] == body["tasks"][1]["id"]
        graph = await http.get(f"/api/v1/tasks/{body['id']}/workflow")
        assert graph.status_code == 200
        assert graph.json()["edges"] == [[body["id"], body["tasks"][0]["id"]]]
        states = {t["id"]: t["state"] for t in graph.json()["tasks"]}
        assert states[body["id"]] == "blocked"
        bad = await http.post("/api/v1/workflows", json={"chain": []})
        assert bad.status_code == 400 and "non-empty" in bad.text
        missing = await http.get("/api/v1/tasks/nope/workflow")
        assert missing.status_code == 404


@pytest.mark.trio
async def test_rest_workflow_bad_bodies_name_the_field_and_store_nothing(tmp_path: Path) -> None:
    """POST /workflows decodes its body into the document's declaration: a bad node or
    task field is refused with the sentence the CLI and the clients get for the same
    document (they compile it with the same declaration), and nothing is stored."""
    bad: list[tuple[Any, str]] = [
        (
            {"chain": [{"type": "a"}, {"type": "b", "max_retries": True}]},
            "workflow chain[1].max_retries must be an integer 0..1000000, got bool True",
        ),
        (
            {"group": [{"type": "a"}, {"chain": [{"type": "b", "priority": 1.5}]}]},
            "workflow group[1].chain[0].priority must be an integer or a string, got float 1.5",
        ),
        ({"chain": [{"type": "a", "colour": 1}]}, "unknown workflow field chain[0].colour"),
        ({"chain": [{"type": "a b"}]}, "workflow chain[0].type must be a non-empty string"),
        ({"chord": [{"type": "a"}]}, "workflow: a chord needs a callback"),
        ({"chain": []}, "workflow chain must be a non-empty array of nodes"),
        ({"group": [{"payload": 1}]}, "workflow group[0] must be a task (with a type)"),
        (
            {"chain": [{"type": "a"}, {"type": "b", "input": "result"}]},
            "workflow chain[1]: input come(s) from the workflow's shape",
        ),
        ([{"type": "a"}], "a workflow must be a map, got array"),
    ]
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        for document, says in bad:
            response = await http.post("/api/v1/workflows", json=document)
            assert response.status_code == 400, (document, response.text)
            detail = response.json()["detail"]
            assert says in detail, (document, detail)
            with pytest.raises(InvalidRequest) as compiled:
                compile_workflow(document)
            assert compiled.value.message == detail  # the CLI's and the clients' words
        # checked by the submit (after decoding): still all or nothing
        late = {"chain": [{"type": "a"}, {"type": "b", "priority": 999}]}
        response = await http.post("/api/v1/workflows", json=late)
        assert response.status_code == 400 and "task 1: priority 999" in response.text
        headers = {"content-type": "application/json"}
        nan = b'{"chain": [{"type": "a", "timeout": NaN}]}'
        response = await http.post("/api/v1/workflows", content=nan, headers=headers)
        assert response.status_code == 400 and "not valid JSON" in response.text
        assert (await http.get("/api/v1/tasks")).json()["tasks"] == []


def test_stdin_lines_cannot_use_batch_references() -> None:
    from tq.cli.stdin_submit import _check

    rows, good = _check([(1, {"type": "a"}), (2, {"type": "b", "depends_on": ["#0"]})])
    assert good == [0]
    assert "tq submit --workflow" in rows[1]["error"]


# -- processes: the CLI, and kill -9 of the broker mid-workflow ------------------------------


def tq(
    broker: BrokerProcess, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tq_command(*args, *broker.client_args()),
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def _ran_once_or_redelivered(history: list[dict[str, Any]]) -> None:
    """One success; every lease after the first follows a lease lost or given back."""
    events = [row["event"] for row in history]
    assert events.count("succeeded") == 1 and events[-1] == "succeeded", events
    for i, event in enumerate(events):
        if event == "leased" and "leased" in events[:i]:
            previous = max(j for j in range(i) if events[j] == "leased")
            between = events[previous + 1 : i]
            assert {"lease_lost", "released"} & set(between), events


def _stuck(graph: dict[str, Any]) -> list[str]:
    """Blocked tasks all of whose dependencies succeeded (the release was lost)."""
    state = {t["id"]: t["state"] for t in graph["tasks"]}
    deps: dict[str, list[str]] = {}
    for task, dep in graph["edges"]:
        deps.setdefault(task, []).append(dep)
    return [
        task
        for task, s in state.items()
        if s == "blocked" and all(state.get(d) == "succeeded" for d in deps.get(task, []))
    ]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_cli_workflow_and_kill_9_leaves_nothing_stuck(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    extra = ["--store", request.getfixturevalue("pg_url")] if store == "postgresql" else []
    steps = 40
    document = {"chain": [{"type": "echo", "payload": {"step": 0}}] + [{"type": "echo"}] * steps}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(document))
    with BrokerProcess(tmp_path / "broker", "--lease-ttl", "3", *extra) as broker:
        bad = tq(broker, "submit", "--workflow", str(path), "echo")
        assert bad.returncode != 0 and "--workflow" in bad.stderr
        out = tq(broker, "submit", "--workflow", str(path), "--json")
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        first, last = answer["tasks"][0], answer["id"]
        assert len(answer["tasks"]) == steps + 1 and answer["tasks"][-1] == last
        dep = tq(broker, "submit", "echo", "--depends-on", last, "--depends-on", first)
        assert dep.returncode == 0, dep.stderr
        shown = tq(broker, "workflow", "show", first, "--json")
        assert shown.returncode == 0, shown.stderr
        graph = json.loads(shown.stdout)
        assert len(graph["tasks"]) == steps + 2 and graph["truncated"] is False

        broker.start_worker("--concurrency", "4")
        broker.wait_for_workers(1)
        with broker.client() as client:  # let part of the chain run, then kill -9
            while client.get(answer["tasks"][steps // 3]).state != "succeeded":
                trio.run(trio.sleep, 0.01)
        broker.kill()
        broker.start(listen=broker.address)  # where the worker reconnects
        with broker.client() as client:
            graph = client.workflow(first)
            assert _stuck(graph) == []  # each release committed with its dependency's success
            done = client.wait(last, timeout=60)
            assert done.state == "succeeded"
            assert done.payload == {"step": 0}  # echo passed the first payload all the way
            for task in answer["tasks"]:  # at least once, and twice only after a lost lease
                _ran_once_or_redelivered(client.history(task))
            for before, after in itertools.pairwise(answer["tasks"]):
                finished = client.history(before)[-1]
                released = [r for r in client.history(after) if r["event"] == "unblocked"]
                assert [r["actor"] for r in released] == [f"dependency:{before}"]
                assert released[0]["at"] >= finished["at"]
        table = tq(broker, "workflow", "show", last, "--output", "table")
        assert table.returncode == 0, table.stderr
        assert "succeeded" in table.stdout and last in table.stdout


def test_stdin_line_with_an_unknown_dependency_is_refused_alone(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        with broker.client() as client:
            known = client.submit("echo", 0)
        lines = [
            {"type": "echo", "payload": 1},
            {"type": "echo", "depends_on": ["no-such-task"]},
            {"type": "echo", "depends_on": [known]},
        ]
        stdin = "".join(json.dumps(line) + "\n" for line in lines)
        out = subprocess.run(
            tq_command("submit", "-", *broker.client_args()),
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
        )
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert out.returncode == 2, out.stderr
        assert [("id" in row, "error" in row) for row in rows] == [
            (True, False),
            (False, True),
            (True, False),
        ]
        assert "no-such-task" in rows[1]["error"]
        with broker.client() as client:
            assert client.get(rows[2]["id"]).state == "blocked"
