"""The one-file executable (pyinstaller.spec), built and driven as an operator would.

Builds dist/tq into a temporary directory once per run (~25 s on 2 cores), or
uses the executable named by TQ_EXECUTABLE (e.g. from an earlier `make build`
in the same CI run). Then: the archive holds every tq module and no test
tools; `tq broker` and `tq worker` run as separate processes of the
executable; tasks go in with `tq submit` (one by one and as JSON lines on
stdin), come back through `tq wait` and `tq list`; `tq doctor` and
`tq backup` run against the live broker; SIGTERM stops both cleanly (exit 0).

Deselect with -m 'not executable' (make quick does).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tq.http.web import ASSETS
from tq.testing import BrokerProcess, tq_env

pytestmark = [pytest.mark.slow, pytest.mark.executable]

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 600
NEVER_BUNDLED = (
    "pytest",
    "_pytest",
    "hypothesis",
    "mypy",
    "trustme",
    "PyInstaller",
    "setuptools",
    "playwright",
)


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("TQ_EXECUTABLE")
    if given:
        path = Path(given).resolve()
        assert path.is_file() and os.access(path, os.X_OK), f"TQ_EXECUTABLE={given} is not runnable"
        return path
    out = tmp_path_factory.mktemp("frozen")
    started = time.monotonic()
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "PyInstaller",
            "--noconfirm",
            "--log-level",
            "WARN",
            "--distpath",
            str(out / "dist"),
            "--workpath",
            str(out / "work"),
            str(ROOT / "pyinstaller.spec"),
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=out,
    )
    assert build.returncode == 0, f"PyInstaller failed:\n{build.stdout}\n{build.stderr[-5000:]}"
    path = out / "dist" / "tq"
    size = path.stat().st_size / 2**20
    print(f"\nbuilt {path}: {size:.1f} MiB in {time.monotonic() - started:.1f} s")
    return path


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh user: HOME and XDG dirs under tmp_path, no TQ_* from the caller."""
    with tq_env(tmp_path / "home") as env:
        yield env


def run(
    exe: Path, env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(exe), *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )


def archive_modules(exe: Path) -> set[str]:
    """Names in the executable's archives: modules, data files and binaries."""
    listing = subprocess.run(
        [sys.executable, "-m", "PyInstaller.utils.cliutils.archive_viewer", "-r", "-b", str(exe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    return {line.strip() for line in listing.stdout.splitlines() if line.startswith(" ")}


def tq_modules() -> set[str]:
    names = set()
    for path in (ROOT / "tq").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_executable_bundles_tq_and_leaves_test_tools_out(exe: Path, home: dict[str, str]) -> None:
    names = archive_modules(exe)
    missing = sorted(m for m in tq_modules() if m not in names and m != "tq.__main__")
    assert not missing, f"modules missing from the executable: {missing}"
    suffixes = (".tcss", ".css", ".html", ".js", ".svg")
    data_files = [p for p in (ROOT / "tq").rglob("*") if p.suffix in suffixes]
    for path in data_files:
        assert str(path.relative_to(ROOT)) in names, f"{path} is not bundled"
    bundled_tools = sorted(n for n in names if n.split(".")[0] in NEVER_BUNDLED)
    assert not bundled_tools, f"test/build tools in the executable: {bundled_tools[:10]}"

    info = json.loads(run(exe, home, "version", "--json").stdout)
    assert info["frozen"] is True and info["tq"] and info["protocol"] and info["sqlite"]

    from tq.cli.main import app  # every command registered now, including those added later

    helped = run(exe, home, "--help")
    assert helped.returncode == 0, helped.stderr
    for command in app.registered_commands:
        name = command.name or (command.callback.__name__ if command.callback else "")
        if not command.hidden:
            assert re.search(rf"\b{re.escape(name)}\b", helped.stdout), f"{name} not in --help"


def test_operator_flow_broker_worker_submit_sigterm(exe: Path, home: dict[str, str]) -> None:
    data = Path(home["HOME"]) / "broker"
    with BrokerProcess(data, env=home, executable=exe).start(timeout=60) as broker:
        env = {**home, "TQ_DATA": str(data)}  # the CLI finds the CA (and key) like on the host
        worker = broker.start_worker("--concurrency", "4", "--exec", "copy=cat")
        client = broker.client_args()

        single = [run(exe, env, "submit", "echo", "--payload", json.dumps({"n": 1}), *client)]
        single.append(run(exe, env, "submit", "copy", "--payload", '{"via": "cat"}', *client))
        for out in single:
            assert out.returncode == 0, out.stderr
        ids = [out.stdout.strip() for out in single]
        lines = "".join(json.dumps({"type": "echo", "payload": i}) + "\n" for i in range(40))
        piped = run(exe, env, "submit", "-", *client, stdin=lines)
        assert piped.returncode == 0, piped.stderr
        ids += [json.loads(line)["id"] for line in piped.stdout.splitlines()]
        assert len(ids) == 42

        waited = run(exe, env, "wait", ids[1], "--timeout", "60", *client)
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout) == {"via": "cat"}  # an executable handler ran
        deadline = time.monotonic() + 60
        while True:
            listed = run(exe, env, "list", "--state", "succeeded", "--limit", "100", *client)
            assert listed.returncode == 0, listed.stderr
            done = {json.loads(line)["id"] for line in listed.stdout.splitlines()}
            if done >= set(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done >= set(ids), f"{len(set(ids) - done)} tasks did not succeed"

        with broker.http_client() as http:  # the dashboard's files, read from the archive
            for path in ("/", *(f"/ui/{name}" for name in ASSETS)):
                page = http.get(path)
                assert page.status_code == 200 and page.content, (path, page.text)
        stats = run(exe, env, "stats", "--json", *client)
        assert stats.returncode == 0, stats.stderr
        doctor = run(exe, env, "doctor", "--json", *client)
        report = json.loads(doctor.stdout)
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        assert doctor.returncode == 0 and not failed, failed
        backup = run(exe, env, "backup", str(data.parent / "backup.db"), "--json")
        assert backup.returncode == 0, backup.stderr
        assert json.loads(backup.stdout)["tasks"] == 42
        if "tui" in run(exe, env, "--help").stdout:
            check_console_starts(exe, env, client)

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, (data / "worker0.log").read_text()
        assert broker.stop(30) == 0, broker.log.read_text()
        assert "store closed cleanly" in broker.log.read_text()


def check_console_starts(exe: Path, env: dict[str, str], client: list[str]) -> None:
    """`tq tui` on Textual's headless driver: its screens and styles load from the archive."""
    headless = {**env, "TEXTUAL_DRIVER": "textual.drivers.headless_driver:HeadlessDriver"}
    log = Path(env["HOME"]) / "tui.log"
    with open(log, "wb") as out:
        console = subprocess.Popen(
            [str(exe), "tui", *client], stdout=out, stderr=subprocess.STDOUT, env=headless
        )
    try:
        time.sleep(4)
        assert console.poll() is None, f"tq tui exited {console.returncode}:\n{log.read_text()}"
    finally:
        console.terminate()
        console.wait(15)
    text = log.read_text(errors="replace")
    assert not any(bad in text for bad in ("Traceback", "ImportError", "NotFoundError")), text


def test_bench_runs_from_the_executable(exe: Path, home: dict[str, str]) -> None:
    """`tq bench` starts brokers, workers, `tq submit -` and its latency probe as
    processes of the executable itself (there is no `python -m tq` in a frozen build)."""
    small = ("--tasks", "300", "--single", "20", "--batch", "100", "--workers", "1")
    out = run(
        exe, home, "bench", "-s", "submit,latency", *small,
        "--concurrency", "4", "--latency-samples", "10", "--json", timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    assert results["submit"]["stdin"]["tasks"] == 300
    assert results["latency"]["idle"]["samples"] == 10
    assert results["latency"]["under_load"]["samples"] > 0


def test_one_ctrl_c_at_a_terminal_is_a_graceful_stop(exe: Path, home: dict[str, str]) -> None:
    """Ctrl-C signals the terminal's whole process group: the bootloader (which also
    forwards it) and the tq process. One keypress must still drain, not stop at once."""
    data = Path(home["HOME"]) / "up"
    data.mkdir(parents=True)
    log_path = data / "up.log"
    command = [str(exe), "up", "--data", str(data), "--listen", "127.0.0.1:0", "--http", "off"]
    with open(log_path, "wb") as log:
        up = subprocess.Popen(command, stdout=log, stderr=log, env=home, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "try: tq submit" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = log_path.read_text().split("listening on ")[1].split()[0]
        client = ["--broker", address, "--data", str(data)]
        env = {**home, "TQ_DATA": str(data)}
        task_id = run(exe, env, "submit", "sleep", "-p", "6", "--broker", address).stdout.strip()
        while True:
            status = run(exe, env, "status", task_id, "-o", "json", "--broker", address)
            if json.loads(status.stdout)["state"] == "running":
                break
            time.sleep(0.05)
        os.killpg(up.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert up.wait(60) == 0, log_path.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
    text = log_path.read_text()
    assert "stopping now" not in text and "1 running task(s) get" in text, text
    with BrokerProcess(data, env=home, executable=exe).start(timeout=60) as again:
        out = run(exe, env, "status", task_id, "-o", "json", *again.client_args())
        assert json.loads(out.stdout)["state"] == "succeeded", client
