"""The decorator API (tq/tasks.py): declarations, checks, handles, clients, discovery.

Unit tests for the pure parts; the rest against real brokers on loopback with
TLS: in-process under trio for the trio client, and a broker plus a
``tq worker --import`` process for the blocking client and worker discovery.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import trio

import tq
import tq.tasks
from tq.core.errors import ConfigError, Timeout
from tq.core.states import State
from tq.testing import BrokerProcess, running_broker, running_worker
from tq.worker.handlers import HandlerRegistry, Reject, default_registry, import_handlers


@tq.task
def plain(x: int) -> int:
    return x * 2


@tq.task(queue="emails", max_retries=5, priority="high", timeout=30)
async def send(to: str, tags: list[str] | None = None, count: float = 1) -> dict[str, Any]:
    return {"to": to, "tags": tags or [], "count": count}


# -- declarations ---------------------------------------------------------------------


def test_name_defaults_to_module_and_function_and_options_are_sent() -> None:
    assert plain.name == f"{__name__}.plain"
    assert send.queue == "emails"
    assert send.spec({"to": "a"}) == {
        "type": f"{__name__}.send",
        "payload": {"to": "a"},
        "queue": "emails",
        "max_retries": 5,
        "priority": "high",
        "timeout": 30,
    }
    assert plain(4) == 8  # calling runs the function here
    assert plain.__doc__ is None and plain.__name__ == "plain"


def test_explicit_name_and_with_options() -> None:
    @tq.task(name="billing.charge")
    def charge(amount: int) -> None: ...

    assert charge.name == "billing.charge"
    urgent = charge.with_options(priority=255, queue="urgent", idempotency_key="k1")
    assert urgent.spec({"amount": 1}) == {
        "type": "billing.charge",
        "payload": {"amount": 1},
        "priority": 255,
        "queue": "urgent",
        "idempotency_key": "k1",
    }
    assert urgent.with_options(priority=1).spec({}) == {  # options accumulate
        "type": "billing.charge",
        "payload": {},
        "priority": 1,
        "queue": "urgent",
        "idempotency_key": "k1",
    }
    assert charge.spec({}) == {"type": "billing.charge", "payload": {}}  # original unchanged
    with pytest.raises(TypeError, match=r"priority 999 must be 0\.\.255"):
        charge.with_options(priority=999)
    with pytest.raises(TypeError, match=r"unknown task option.*prio"):
        charge.with_options(prio=1)


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (
            lambda: tq.task(queue="two words")(lambda: None),
            "task queue must be .*no spaces or commas, got str 'two words'",
        ),
        (lambda: tq.task(priority=300)(lambda: None), "priority 300 must be 0..255"),
        (lambda: tq.task(max_retries=-1)(lambda: None), "max_retries must be an integer"),
        (
            lambda: tq.task(name="a,b")(lambda: None),
            "task type must be .*no spaces or commas, got str 'a,b'",
        ),
        (lambda: tq.task(unique_for="soon")(lambda: None), "unique_for 'soon' is not a duration"),
        (lambda: tq.task(unique_for=-1)(lambda: None), "unique_for must be a number of seconds"),
        (lambda: tq.task(unique_key="k")(lambda: None), "unique_key needs unique_for"),
        (lambda: tq.task(unique_for=1, unique_key="")(lambda: None), "unique_key must be"),
    ],
)
def test_bad_options_are_refused_at_declaration(declare: Any, message: str) -> None:
    with pytest.raises(tq.tasks.TaskDeclarationError, match=message):
        declare()


def test_unsupported_signatures_are_refused_at_declaration() -> None:
    with pytest.raises(TypeError, match=r"parameter 'items'.*cannot check the annotation"):

        @tq.task
        def uses_set(items: set[int]) -> None: ...

    with pytest.raises(TypeError, match=r"parameter 'args' is positional-only or \*args"):

        @tq.task
        def star(*args: int) -> None: ...

    with pytest.raises(TypeError, match=r"parameter 'x' is positional-only"):

        @tq.task
        def positional(x: int, /) -> None: ...

    with pytest.raises(TypeError, match="return annotation: tq cannot check"):

        @tq.task
        def returns_tuple() -> tuple[int, int]:
            return (1, 2)

    with pytest.raises(TypeError, match="decorates a function"):
        tq.task(plain)


def test_the_same_name_for_two_functions_is_refused() -> None:
    @tq.task(name="dup.name")
    def first() -> None: ...

    with pytest.raises(tq.tasks.TaskDeclarationError, match="declared twice"):

        @tq.task(name="dup.name")
        def second() -> None: ...


# -- argument and result checks ----------------------------------------------------------


@tq.task(name="checks.all")
def everything(
    to: str,
    n: int = 0,
    ratio: float = 1.0,
    flag: bool = False,
    tags: list[str] | None = None,
    meta: dict[str, int] | None = None,
    mode: Literal["fast", "slow"] = "fast",
    maybe: Optional[bytes] = None,  # noqa: UP045 (the Optional spelling is supported too)
    anything: Any = None,
    **extra: int,
) -> None: ...


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "missing required argument 'to'"),
        ((), {"to": 5}, "argument 'to' must be str, got int 5"),
        ((), {"to": "a", "n": True}, "argument 'n' must be int, got bool True"),
        ((), {"to": "a", "n": 1.5}, "argument 'n' must be int, got float 1.5"),
        ((), {"to": "a", "flag": 1}, "argument 'flag' must be bool, got int 1"),
        ((), {"to": "a", "tags": ["x", 2]}, "argument 'tags[1]' must be str, got int 2"),
        ((), {"to": "a", "tags": "xy"}, "argument 'tags' must be list[str] | None, got str 'xy'"),
        ((), {"to": "a", "meta": {"k": "v"}}, "argument 'meta['k']' must be int, got str 'v'"),
        ((), {"to": "a", "meta": {1: 1}}, "argument 'meta' has key 1 that must be str"),
        ((), {"to": "a", "mode": "medium"}, "must be one of 'fast' | 'slow', got str 'medium'"),
        ((), {"to": "a", "maybe": "text"}, "argument 'maybe' must be bytes | None, got str"),
        ((), {"to": "a", "surplus": "x"}, "argument 'surplus' must be int, got str"),
        (("a", 1, 1.0, True, None, None, "fast", None, None, 9), {}, "takes 9 positional"),
        (("a",), {"to": "b"}, "got multiple values for argument 'to'"),
    ],
)
def test_arguments_are_checked_at_submit(args: tuple[Any, ...], kwargs: Any, message: str) -> None:
    # the check runs before any connection is made: no broker is needed to see it fail
    with pytest.raises(tq.tasks.TaskArgumentError, match=re.escape(message)) as info:
        everything.submit_sync(*args, **kwargs)
    assert isinstance(info.value, TypeError)
    assert str(info.value).startswith("checks.all(")


def test_good_arguments_become_a_map_by_name() -> None:
    payload = everything.signature.payload(
        ("a@b", 3), {"ratio": 2, "tags": ["x"], "meta": {"k": 1}, "maybe": b"\x00", "more": 4}
    )
    assert payload == {
        "to": "a@b",
        "n": 3,
        "ratio": 2,  # an int is a fine float
        "tags": ["x"],
        "meta": {"k": 1},
        "maybe": b"\x00",
        "more": 4,
    }
    assert plain.signature.payload((), {"x": 1}) == {"x": 1}


def test_unexpected_argument_without_var_keyword() -> None:
    with pytest.raises(tq.tasks.TaskArgumentError, match="unexpected argument 'y'"):
        plain.submit_sync(x=1, y=2)  # type: ignore[call-arg]


def test_the_handler_rejects_bad_payloads_and_results() -> None:
    run = plain.handler()
    assert run({"x": 21}) == 42
    with pytest.raises(Reject, match=r"plain\(\): argument 'x' must be int, got str"):
        run({"x": "21"})
    with pytest.raises(Reject, match="missing required argument 'x'"):
        run(None)
    with pytest.raises(Reject, match="payload must be a map of arguments by name, got list"):
        run([1])

    @tq.task
    def liar() -> int:
        return "three"  # type: ignore[return-value]

    with pytest.raises(Reject, match=r"result must be int, got str 'three' \(the return"):
        liar.handler()(None)


def test_the_async_handler_runs_under_trio() -> None:
    run = send.handler()
    result = trio.run(run, {"to": "a", "count": 2})
    assert result == {"to": "a", "tags": [], "count": 2}
    with pytest.raises(Reject, match="argument 'to' must be str"):
        trio.run(run, {"to": None})


# -- light imports and lazy names ------------------------------------------------------------


def test_import_tq_and_declaring_tasks_stay_light(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        import tq
        assert "tq.tasks" not in sys.modules and "trio" not in sys.modules
        @tq.task(queue="q")
        def f(x: int) -> int:
            return x
        f.signature.payload((1,), {})
        tq.configure(broker="127.0.0.1:1", insecure=True)  # nothing listens on port 1
        try:
            f.submit_sync(1)
        except tq.tasks.TQError as exc:
            assert exc.code == "connection", exc
        try:
            f.with_options(client=object()).submit_sync(1)
        except tq.tasks.ConfigError as exc:
            assert "needs a tq.client.BlockingClient" in str(exc), exc
        print(sorted(m for m in ("trio", "tq.client.aio", "tq.worker") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_lazy_names() -> None:
    assert tq.task is tq.tasks.task
    assert tq.configure is tq.tasks.configure
    assert tq.connect is tq.tasks.connect
    assert tq.TaskFailed is tq.tasks.TaskFailed
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tq.nope  # type: ignore[attr-defined]


def test_configure_refuses_unknown_settings() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting.*brokr"):
        tq.configure(brokr="x:1")


# -- the worker finds declared tasks ------------------------------------------------------------

APP = """
import tq


@tq.task(queue="emails", max_retries=0)
def send(to: str, times: int = 1) -> dict:
    return {"to": to, "times": times}


@tq.task(name="{prefix}.boom", max_retries=0)
async def boom(message: str) -> None:
    raise RuntimeError(message)


@tq.task(name="{prefix}.liar", max_retries=0)
def liar() -> int:
    return "not an int"
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: Any) -> str:
    """A user's module of tasks in tmp_path, importable here and by a worker started there."""
    name = f"app_{request.node.name.replace('[', '_').replace(']', '_')}"
    package = tmp_path / "app"
    package.mkdir()
    (package / f"{name}.py").write_text(APP.replace("{prefix}", name), encoding="utf-8")
    monkeypatch.syspath_prepend(str(package))
    return name


def test_import_handlers_registers_declared_tasks(app_module: str) -> None:
    import_handlers(app_module)
    for name in (f"{app_module}.send", f"{app_module}.boom", f"{app_module}.liar"):
        assert default_registry.get(name) is not None, name
    assert default_registry.get(f"{app_module}.boom").is_async  # type: ignore[union-attr]


@pytest.fixture
def app_broker(tmp_path: Path, app_module: str) -> Iterator[BrokerProcess]:
    """A broker process and a ``tq worker --import`` of the app module (queues default, emails)."""
    env = {"PYTHONPATH": str(tmp_path / "app")}
    with BrokerProcess(tmp_path / "broker", "--lease-ttl", "2", env=env) as broker:
        broker.start_worker("--import", app_module, "--queues", "default,emails")
        broker.wait_for_workers(1)
        key = broker.key
        assert key is not None
        tq.configure(broker=broker.address, ca=broker.ca, key=key)
        try:
            yield broker
        finally:
            tq.tasks.close()


def test_blocking_submit_result_status_cancel(app_broker: BrokerProcess, app_module: str) -> None:
    app = __import__(app_module)
    handle = app.send.submit_sync("a@b", times=2)
    assert handle.result(timeout=30) == {"to": "a@b", "times": 2}
    task = handle.status()
    assert task.state is State.SUCCEEDED and task.queue == "emails"
    assert task.payload == {"to": "a@b", "times": 2}

    with pytest.raises(tq.TaskFailed, match="ended dead after 1 attempt: RuntimeError: kaput"):
        app.boom.submit_sync(message="kaput").result(timeout=30)

    with pytest.raises(tq.TaskFailed, match=r"result must be int, got str 'not an int'"):
        app.liar.submit_sync().result(timeout=30)

    # each thread has its own default client; a handle works from any thread
    seen: dict[str, Any] = {}

    def in_a_thread() -> None:
        seen["handle"] = app.send.submit_sync(to="t@b")
        seen["client"] = tq.tasks.blocking_client()

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(60)
    assert seen["client"] is not tq.tasks.blocking_client()
    assert seen["handle"].result(timeout=30) == {"to": "t@b", "times": 1}

    # a queue no worker takes from: the task waits, times out, is cancelled
    parked = app.send.with_options(queue="nobody").submit_sync(to="x")
    with pytest.raises(Timeout, match=r"is still pending after 0.2s; call result\(\) again"):
        parked.result(timeout=0.2)
    assert parked.cancel().state is State.CANCELLED
    with pytest.raises(tq.TaskFailed, match="ended cancelled"):
        parked.result(timeout=5)


def test_a_payload_that_does_not_fit_fails_at_run(
    app_broker: BrokerProcess, app_module: str
) -> None:
    # a producer that bypasses the declaration (another language, an old version)
    with app_broker.client() as client:
        task_id = client.submit(f"{app_module}.send", {"to": 5}, queue="emails")
        task = client.wait(task_id, timeout=30)
    assert task.state is State.DEAD
    assert task.error is not None and task.error.type == "Reject"
    assert task.error.message == f"{app_module}.send(): argument 'to' must be str, got int 5"


def test_default_client_per_thread_and_reconnect_after_idle_close(
    tmp_path: Path, app_module: str
) -> None:
    env = {"TQ_IDLE_TIMEOUT": "1"}
    with BrokerProcess(tmp_path / "idle", env=env) as broker:
        tq.configure(broker=broker.address, ca=broker.ca, key=broker.key)
        try:
            app = __import__(app_module)
            first = app.send.submit_sync(to="a")
            client = tq.tasks.blocking_client()
            assert not client.closed_by_broker()  # a live idle connection has nothing to read
            assert tq.tasks.blocking_client() is client  # and is reused
            deadline = time.monotonic() + 30
            while not client.closed_by_broker():  # the broker closes the idle connection
                assert time.monotonic() < deadline, "the broker did not close an idle client"
                time.sleep(0.05)
            second = app.send.submit_sync(to="b")  # reconnects instead of failing
            assert tq.tasks.blocking_client() is not client
            assert second.status().payload == {"to": "b"}
            assert first.status().state is State.PENDING
        finally:
            tq.tasks.close()


# -- the trio client ------------------------------------------------------------------------------


@tq.task(name="api.double")
async def double(n: int) -> int:
    await trio.sleep(0)
    return 2 * n


@tq.task(name="api.never", max_retries=0)
def never(n: int) -> int:
    raise AssertionError("no worker runs this type")


@tq.task(name="api.export", unique_for="1h")
def export(day: str) -> str:
    return day


def test_unique_options_are_sent_with_every_submission() -> None:
    assert export.spec({"day": "d"}) == {
        "type": "api.export",
        "payload": {"day": "d"},
        "unique_for": 3600.0,  # a duration is read at declaration
    }
    one = export.with_options(unique_key="all-days", unique_for="5m")
    assert one.spec({}) == {
        "type": "api.export",
        "payload": {},
        "unique_for": 300.0,
        "unique_key": "all-days",
    }
    with pytest.raises(TypeError, match="unique_key needs unique_for"):
        tq.task(name="api.lone")(lambda: None).with_options(unique_key="k")


@pytest.mark.trio
async def test_a_unique_task_declared_once_is_submitted_once(tmp_path: Path) -> None:
    """No worker runs them: they stay pending, so the key stays held."""
    async with running_broker(tmp_path) as broker, tq.connect(broker.settings) as client:
        first = await export.submit("2026-12-05")
        again = await export.submit(day="2026-12-05")  # the same payload: the same task
        other = await export.submit("2026-12-06")
        assert again.id == first.id and other.id != first.id
        single = export.with_options(unique_key="all-days")
        by_key = await single.submit("2026-12-07")
        assert (await single.submit("2026-12-08")).id == by_key.id  # the key, not the payload
        assert by_key.id not in (first.id, other.id)
        listed = (await client.list(type="api.export")).tasks
        assert sorted(task.id for task in listed) == sorted({first.id, other.id, by_key.id})


@pytest.mark.trio
async def test_trio_submit_result_status_cancel(tmp_path: Path) -> None:
    registry = HandlerRegistry()
    tq.tasks.register(registry, [double])
    async with running_broker(tmp_path) as broker:
        async with running_worker(broker, registry):
            with pytest.raises(ConfigError, match=r"inside `async with tq.connect\(\):`"):
                await double.submit(n=1)
            async with tq.connect(broker.settings) as client:
                handle = await double.submit(21)
                assert await handle.result(timeout=30) == 42
                assert (await handle.status()).state is State.SUCCEEDED

                results: list[int] = []

                async def child(n: int) -> None:  # tasks of the block inherit its client
                    results.append(await (await double.submit(n=n)).result(timeout=30))

                async with trio.open_nursery() as nursery:
                    for n in range(5):
                        nursery.start_soon(child, n)
                assert sorted(results) == [0, 2, 4, 6, 8]

                parked = await never.submit(n=1)  # no worker has this type
                assert parked.warning is not None and "api.never" in parked.warning
                assert (await parked.cancel()).state is State.CANCELLED
                with pytest.raises(tq.TaskFailed, match="ended cancelled"):
                    await parked.result(timeout=5)

                with pytest.raises(ConfigError, match=r"needs a tq\.client\.BlockingClient"):
                    double.with_options(client=client).submit_sync(n=1)
            settings = broker.settings  # or separate settings, as tq.configure takes them
            async with tq.connect(broker=settings.broker, ca=settings.ca, key=settings.key):
                assert await (await double.submit(n=4)).result(timeout=30) == 8
            with pytest.raises(ConfigError, match="not both"):
                async with tq.connect(settings, broker="elsewhere:1"):
                    pass
