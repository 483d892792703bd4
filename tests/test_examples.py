"""examples/: each one run as its README says, against a real broker on loopback with TLS.

The broker and workers are separate processes (``BrokerProcess``); the examples'
programs get the broker's address, CA and admin key through TQ_BROKER, TQ_CA and
TQ_KEY, as a user's shell would. Node examples are skipped where node is absent;
the shell pipeline needs jq.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

import tq
import tq.tasks
from tq.core.states import State
from tq.testing import BrokerProcess, tq_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PACKAGING = EXAMPLES.parent / "packaging" / "systemd"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed on this machine")
needs_jq = pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A broker process. Parametrized indirectly with an example's name, its workers
    import Python modules from that directory (each example has its own ``tasks``)."""
    example = getattr(request, "param", None)
    env = {"PYTHONPATH": str(EXAMPLES / example)} if example else {}
    with BrokerProcess(tmp_path / "broker", env=env) as running:
        yield running


def client_env(broker: BrokerProcess, home: Path) -> dict[str, str]:
    """A user's environment (fresh HOME, no stray TQ_*) pointed at ``broker``."""
    with tq_env(home) as env:
        key = broker.key
        assert key is not None
        return {**env, "TQ_BROKER": broker.address, "TQ_CA": str(broker.ca), "TQ_KEY": key}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- python/ ---------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["python"], indirect=True)
def test_python_producer_and_worker(broker: BrokerProcess, tmp_path: Path) -> None:
    broker.start_worker("--import", "tasks", "--queues", "default,emails")
    broker.wait_for_workers(1)
    here = EXAMPLES / "python"
    out = run([sys.executable, "producer.py"], here, client_env(broker, tmp_path / "home"))
    lines = json_lines(out.stdout)
    assert [line.get("result") for line in lines[:2]] == [
        {"to": "ada@example.com", "subject": "Bienvenue, Ada!"},
        {"the": 3, "and": 2},
    ]
    assert lines[2:] == [
        {"refused": "tasks.send_welcome(): argument 'name' must be str, got int 42"},
        {"state": "succeeded"},
    ]
    with broker.client() as client:
        welcome = client.get(lines[0]["task"])
    assert (welcome.type, welcome.queue, welcome.priority) == ("tasks.send_welcome", "emails", 200)
    assert welcome.max_retries == 5 and welcome.timeout == 30.0


# -- asyncio-web/ ----------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["asyncio-web"], indirect=True)
def test_asyncio_web_app_submits_and_awaits(broker: BrokerProcess) -> None:
    broker.start_worker("--import", "tasks")
    broker.wait_for_workers(1)
    here = str(EXAMPLES / "asyncio-web")
    sys.path.insert(0, here)
    try:
        app = importlib.import_module("app").app
        tq.configure(broker=broker.address, ca=broker.ca, key=broker.key)

        async def requests() -> tuple[httpx.Response, httpx.Response, list[httpx.Response]]:
            transport = httpx.ASGITransport(app=app)
            async with (
                app.router.lifespan_context(app),  # closes the app's client at the end
                httpx.AsyncClient(transport=transport, base_url="http://app") as http,
            ):
                one = await http.post("/slugs", json={"title": "Hello, World!"})
                bad = await http.post("/slugs", json={"title": 7})
                many = await asyncio.gather(
                    *(http.post("/slugs", json={"title": f"Post number {i}"}) for i in range(8))
                )
                shared = importlib.import_module("app").broker.client  # one AsyncioClient
                assert shared is not None and shared.error is None
            assert importlib.import_module("app").broker.client is None, "closed at shutdown"
            return one, bad, many

        one, bad, many = asyncio.run(requests())
    finally:
        tq.tasks.close()
        sys.path.remove(here)
        for name in ("app", "tasks"):
            sys.modules.pop(name, None)
    assert one.status_code == 200, one.text
    assert one.json()["slug"] == "hello-world"
    assert bad.status_code == 422
    assert bad.json() == {"error": "tasks.slugify(): argument 'title' must be str, got int 7"}
    assert sorted(r.json()["slug"] for r in many) == [f"post-number-{i}" for i in range(8)]
    with broker.client() as client:
        task = client.get(one.json()["id"])
    assert task.state is State.SUCCEEDED and task.result == "hello-world"


# -- shell/ ----------------------------------------------------------------------------


@needs_jq
def test_shell_pipeline(broker: BrokerProcess, tmp_path: Path) -> None:
    broker.start_worker()
    broker.wait_for_workers(1)
    env = {**client_env(broker, tmp_path / "home"), "TQ": f"{sys.executable} -m tq"}
    out = run(["bash", str(EXAMPLES / "shell" / "pipeline.sh")], EXAMPLES / "shell", env)
    lines = json_lines(out.stdout)
    assert lines[0] == {"ended": {"dead": 2, "succeeded": 3}}
    dead = lines[1:3]
    assert sorted(d["error"] for d in dead) == ["bad input 3", "bad input 5"]
    assert {d["type"] for d in dead} == {"fail"}
    assert lines[3:] == [{"id": d["id"], "state": "pending"} for d in lines[3:]]
    assert sorted(line["id"] for line in lines[3:]) == sorted(d["dead"] for d in dead)
    assert "submitted 5 task(s)" in out.stderr


# -- exec-handlers/ --------------------------------------------------------------------


def test_exec_handler_in_bash(broker: BrokerProcess) -> None:
    broker.start_worker("--exec", f"greet={EXAMPLES / 'exec-handlers' / 'greet.sh'}")
    broker.wait_for_workers(1)
    with broker.client() as client:
        flaky = client.submit("greet", {"name": "Ada", "flaky": True}, retry_base=0.01)
        broken = client.submit("greet", {"nom": "Ada"})
        done, dead = client.wait(flaky, timeout=60), client.wait(broken, timeout=60)
    assert done.state is State.SUCCEEDED and done.attempts == 2  # exit 75 asked for a retry
    assert done.result == {"greeting": "Hello, Ada!", "attempt": 2}
    assert dead.state is State.DEAD and dead.attempts == 1  # exit 65: bad input, no retry
    assert dead.error is not None and "the payload needs a name" in dead.error.traceback


@needs_node
def test_exec_handler_in_node(broker: BrokerProcess) -> None:
    broker.start_worker("--exec", f"wordcount={EXAMPLES / 'exec-handlers' / 'wordcount.js'}")
    broker.wait_for_workers(1)
    with broker.client() as client:
        ok = client.submit("wordcount", {"text": "The cat and the hat. THE END", "top": 2})
        bad = client.submit("wordcount", {"words": []})
        done, dead = client.wait(ok, timeout=60), client.wait(bad, timeout=60)
    assert done.state is State.SUCCEEDED
    assert done.result == {"words": 7, "top": [["the", 3], ["and", 1]]}
    assert dead.state is State.DEAD and dead.error is not None
    assert 'needs a "text" string' in dead.error.traceback


# -- node-client/ ----------------------------------------------------------------------


@needs_node
def test_node_client_submits_and_waits(broker: BrokerProcess, tmp_path: Path) -> None:
    broker.start_worker()
    broker.wait_for_workers(1)
    # (JSON.parse makes every number a double: 64-bit integers are covered below)
    payload = {"x": 1, "neg": -70000, "text": "héllo", "list": [1.5, None, True], "map": {}}
    env = client_env(broker, tmp_path / "home")
    here = EXAMPLES / "node-client"
    out = run([str(NODE), "client.js", "echo", json.dumps(payload)], here, env)
    hello, final = json_lines(out.stdout)
    assert hello["server"] == f"tq/{tq.__version__}" and hello["role"] == "admin"
    assert final["id"] == hello["submitted"] and final["state"] == "succeeded"
    assert final["result"] == payload and final["attempts"] == 1 and final["error"] is None
    with broker.client() as client:
        assert client.get(final["id"]).payload == payload

    failed = subprocess.run(
        [str(NODE), "client.js", "echo"],
        cwd=here,
        env={**env, "TQ_KEY": "tq_000000000000_nope"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1
    assert failed.stderr.startswith("client.js: unauthorized: ")


NODE_ROUND_TRIP = """
const m = require("./msgpack.js");
const value = m.decode(require("fs").readFileSync(0));  // msgpack bytes on stdin
const hello = m.encode({t: "hello", id: 1, v: 1, kind: "client", name: "x"});
process.stdout.write(JSON.stringify({
  back: m.encode(value).toString("hex"),
  hello: hello.toString("hex"),
  token: typeof value.token,
}));
"""


@needs_node
def test_node_msgpack_matches_the_protocol_and_msgpack_python() -> None:
    value = {
        "token": 1099524508033828244,  # a lease token: beyond 2^53
        "ints": [0, 127, 128, 255, 256, 65535, 65536, 2**32, -1, -32, -33, -(2**40)],
        "floats": [1.5, -0.25, 1e300],
        "text": ["", "x" * 31, "y" * 32, "é" * 200, "z" * 70000],
        "bin": b"\x00\x01\xff",
        "nested": {"a": [None, True, False, {}], "b": {"c": []}},
        "long": list(range(20)),
        "wide": {f"k{i}": i for i in range(20)},
    }
    packed = msgpack.packb(value, use_bin_type=True)
    out = subprocess.run(
        [str(NODE), "-e", NODE_ROUND_TRIP],
        input=packed,
        cwd=EXAMPLES / "node-client",
        capture_output=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.decode())
    assert result["token"] == "bigint"
    assert msgpack.unpackb(bytes.fromhex(result["back"]), raw=False) == value
    # docs/PROTOCOL.md, "Worked example": the 35 body bytes of that hello
    assert result["hello"] == (
        "85a174a568656c6c6fa2696401a17601a46b696e64a6636c69656e74a46e616d65a178"
    )


# -- systemd/ --------------------------------------------------------------------------

UNITS = sorted(PACKAGING.glob("*.service"))
DROP_IN = EXAMPLES / "systemd" / "python-worker.conf"


def exec_starts(path: Path) -> list[list[str]]:
    """Each non-empty ExecStart= command line of a unit file, specifiers filled in."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("ExecStart=") and line != "ExecStart=":
            text = line.removeprefix("ExecStart=").replace("%H", socket.gethostname())
            lines.append(shlex.split(text.replace("%i", "default")))
    return lines


def tq_arguments(argv: list[str]) -> list[str]:
    """The arguments to tq in ``.../tq ARGS`` or ``.../python -m tq ARGS``."""
    if Path(argv[0]).name == "tq":
        return argv[1:]
    assert argv[1:3] == ["-m", "tq"], argv
    return argv[3:]


@pytest.mark.parametrize("unit", [*UNITS, DROP_IN], ids=lambda p: p.name)
def test_systemd_exec_start_is_a_valid_tq_command(unit: Path) -> None:
    commands = exec_starts(unit)
    assert commands, f"{unit} has no ExecStart"
    for argv in commands:
        args = tq_arguments(argv)
        # tq parses every option before it prints the help: an unknown one exits 2
        command = [sys.executable, "-m", "tq", *args, "--help"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{unit.name}: tq {shlex.join(args)}: {done.stderr}"
        assert re.search(rf"Usage: .*tq {args[0]} ", done.stdout), done.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_units_and_drop_in_verify(tmp_path: Path) -> None:
    tq_wrapper = tmp_path / "bin" / "tq"  # stands in for /usr/local/bin/tq
    tq_wrapper.parent.mkdir()
    tq_wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m tq "$@"\n', encoding="utf-8")
    tq_wrapper.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for path in PACKAGING.iterdir():
        text = path.read_text(encoding="utf-8").replace("/usr/local/bin/tq", str(tq_wrapper))
        (units / path.name).write_text(text, encoding="utf-8")
    drop_ins = units / "tq-worker@app.service.d"
    drop_ins.mkdir()
    text = DROP_IN.read_text(encoding="utf-8").replace("/opt/myapp/venv/bin/python", sys.executable)
    (drop_ins / "python.conf").write_text(text, encoding="utf-8")
    names = ["tq-broker.service", "tq-backup.service", "tq-backup.timer", "tq-worker@app.service"]
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(units / n) for n in names)],
        cwd=units,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
