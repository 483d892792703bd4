"""Tasks declared once: submitted, typed and run from the same declaration.

    import tq

    @tq.task(queue="emails", max_retries=5)
    async def send(to: str, subject: str = "hello") -> dict:
        ...
        return {"sent": to}

    handle = send.submit_sync(to="a@b")            # blocking client (scripts, threads)
    handle.result(timeout=30)                      # {"sent": "a@b"}

    async with tq.connect():                       # trio client for this block
        handle = await send.submit(to="a@b")
        await handle.result(timeout=30)

Contract:

* ``@tq.task`` (with or without options) turns an ``async def`` or plain
  function into a ``TaskDef``. The task type is ``name=`` or
  ``module.qualname`` (for a script run as ``python producer.py`` the
  module is the file's stem, ``producer``). Options (``queue``,
  ``priority``, ``max_retries``, ``timeout``, ``retry_base``,
  ``retry_cap``, ``unique_for``, ``unique_key``) are checked when the
  function is declared and sent with
  every submission; ``with_options(...)`` overrides them (and picks a client)
  for some submissions. Calling the declared object runs the function here.
* The payload is a map of the function's arguments by name (positional
  arguments are named at submit). Arguments and the result are checked
  against the annotations at submit and at run: ``str``, ``int``, ``float``
  (an int is accepted), ``bool``, ``bytes``, ``None``, ``list``, ``dict``,
  ``list[X]``, ``dict[K, V]``, ``X | Y``, ``Optional[X]``, ``Literal[...]``,
  ``Any`` or no annotation. Any other annotation, ``*args`` or a
  positional-only parameter is refused at declaration (the checks live in
  tq/core/signature.py). A mismatch at submit raises ``TaskArgumentError``
  (a ``TypeError``) naming the argument, and nothing is sent; at run the
  task fails without retry (``Reject``) with the same message, as it does
  when the result does not match the return annotation.
* Clients: ``submit_sync`` uses this thread's default ``BlockingClient``,
  opened on first use from ``configure(...)`` (else from the ``TQ_*``
  environment and the config file, as the CLI does) and reopened when the
  broker has closed it; ``await submit`` uses the client of the enclosing
  ``async with tq.connect()`` block (a trio ``Client`` under trio, an
  ``AsyncioClient`` under asyncio). ``with_options(client=c)``
  uses ``c`` instead. Handles use the client their task was submitted with.
* Workers find tasks from the same declarations: ``tq worker --import
  myapp.tasks`` registers every task declared while importing that module
  (``declared()``) as the handler of its type. Take care that the worker
  takes from the task's queue (``--queues default,emails``).

Importing this module is light (no trio, no socket): a producer that only
calls ``submit_sync`` never loads trio.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

from tq.core.errors import ConfigError, InvalidRequest, Timeout, TQError
from tq.core.signature import Signature, TaskArgumentError, TaskDeclarationError
from tq.core.task import TaskSpec
from tq.core.units import seconds

if TYPE_CHECKING:
    from tq.client.aio import Client
    from tq.client.asyncio_client import AsyncioClient
    from tq.client.sync import BlockingClient
    from tq.config import ClientSettings, ConnectionSettings
    from tq.core.task import Task

P = ParamSpec("P")
R = TypeVar("R")


class TaskFailed(TQError):
    """The task ended without a result: ``dead`` (``.task.error`` says why) or cancelled."""

    code = "task_failed"

    def __init__(self, task: Task) -> None:
        attempts = "attempt" if task.attempts == 1 else "attempts"
        error = task.error
        why = "" if error is None else f": {error.type}: {error.message}"
        super().__init__(
            f"task {task.id} ({task.type}) ended {task.state.value} "
            f"after {task.attempts} {attempts}{why}"
        )
        self.task = task


# -- the declaration ----------------------------------------------------------------------

_OPTIONS = (
    "queue",
    "priority",
    "max_retries",
    "timeout",
    "retry_base",
    "retry_cap",
    "unique_for",
    "unique_key",
)


def _module_name(fn: Callable[..., Any]) -> str:
    """The module a worker would import ``fn`` from (a script's ``__main__`` is its stem)."""
    module = getattr(fn, "__module__", None) or "__main__"
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name).removesuffix(".__main__")
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else "__main__"


class TaskDef(Generic[P, R]):
    """A declared task: call it to run here, ``submit``/``submit_sync`` to queue it."""

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
        client: Any = None,
        idempotency_key: str | None = None,
        signature: Signature | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or f"{_module_name(fn)}.{fn.__qualname__}"
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        if isinstance(self.options.get("unique_for"), str):  # a duration: "1h", "30m", "1d"
            try:
                self.options["unique_for"] = seconds(self.options["unique_for"], "unique_for")
            except ValueError as exc:
                raise TaskDeclarationError(f"task {self.name}: {exc}") from None
        self.client = client
        self.idempotency_key = idempotency_key
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = signature or Signature.of(fn, self.name)
        spec = self.spec({})
        try:
            TaskSpec.from_mapping(spec)
        except InvalidRequest as exc:
            raise TaskDeclarationError(f"task {self.name}: {exc}") from None
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<tq task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function here, now (no queue, no checks): for tests and scripts."""
        return self.fn(*args, **kwargs)

    @property
    def queue(self) -> str:
        return str(self.options.get("queue", "default"))

    def with_options(
        self,
        *,
        client: Client | AsyncioClient | BlockingClient | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> TaskDef[P, R]:
        """A copy that submits with other options (``queue``, ``priority``, ...) or client."""
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TaskDeclarationError(
                f"unknown task option(s) {', '.join(unknown)}; known: "
                f"client, idempotency_key, {', '.join(_OPTIONS)}"
            )
        return TaskDef(
            self.fn,
            name=self.name,
            options={**self.options, **options},
            client=client if client is not None else self.client,
            idempotency_key=self.idempotency_key if idempotency_key is None else idempotency_key,
            signature=self.signature,
        )

    def spec(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The submission map for ``payload``."""
        spec: dict[str, Any] = {"type": self.name, "payload": payload, **self.options}
        if self.idempotency_key is not None:
            spec["idempotency_key"] = self.idempotency_key
        return spec

    def submit_sync(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Check the arguments, submit with the blocking client; a handle once durable."""
        spec = self.spec(self.signature.payload(args, kwargs))
        client = self.client if self.client is not None else blocking_client()
        _require(client, blocking=True)
        item = client.submit_items([spec])[0]
        return TaskHandle(self, item["id"], self.client, item.get("warning"))

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> AsyncTaskHandle[R]:
        """Check the arguments, submit with the trio client; a handle once durable."""
        spec = self.spec(self.signature.payload(args, kwargs))
        client = self.client if self.client is not None else current_client()
        _require(client, blocking=False)
        item = (await client.submit_items([spec]))[0]
        return AsyncTaskHandle(self, item["id"], self.client, item.get("warning"))

    # -- the worker's side ---------------------------------------------------------------
    def handler(self) -> Callable[[Any], Any]:
        """The worker's handler for this type: checks the payload, runs, checks the result."""
        sig = self.signature
        fn: Callable[..., Any] = self.fn

        def arguments(payload: Any) -> dict[str, Any]:
            try:
                return sig.arguments(payload)
            except TaskArgumentError as exc:
                raise _reject(exc) from None

        def result(value: Any) -> Any:
            try:
                return sig.check_result(value)
            except TaskArgumentError as exc:
                raise _reject(exc) from None

        if self.is_async:

            async def run_async(payload: Any) -> Any:
                return result(await fn(**arguments(payload)))

            return run_async

        def run(payload: Any) -> Any:
            return result(fn(**arguments(payload)))

        return run


def _reject(exc: TaskArgumentError) -> Exception:
    from tq.worker.handlers import Reject  # only ever called inside a worker

    return Reject(str(exc))


def _require(client: Any, *, blocking: bool) -> None:
    wanted: type
    if blocking:  # import only that client: the blocking one must not load trio
        from tq.client.sync import BlockingClient as wanted

        method, other = "submit_sync", "await submit(...)"
    else:  # the trio Client or the AsyncioClient: both have the async methods
        from tq.client._methods import AsyncMethods as wanted

        method, other = "submit", "submit_sync(...)"
    if not isinstance(client, wanted):
        needs = "BlockingClient" if blocking else "Client or tq.client.AsyncioClient"
        raise ConfigError(
            f"{method} needs a tq.client.{needs}, got {type(client).__name__}; "
            f"use {other} with that client"
        )


# -- handles -------------------------------------------------------------------------------


class TaskHandle(Generic[R]):
    """A submitted task, through the blocking client: ``result``, ``status``, ``cancel``."""

    def __init__(
        self,
        task: TaskDef[Any, R],
        id: str,
        client: BlockingClient | None = None,
        warning: str | None = None,
    ) -> None:
        self.task, self.id, self.warning = task, id, warning
        self._client = client

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task.name} {self.id}>"

    def _c(self) -> BlockingClient:
        return self._client if self._client is not None else blocking_client()

    def status(self) -> Task:
        """The task as the broker has it now (``.state``, ``.attempts``, ``.error``, ...)."""
        return self._c().get(self.id)

    def cancel(self) -> Task:
        return self._c().cancel(self.id)

    def result(self, timeout: float | None = None) -> R:
        """Wait (``timeout`` seconds, None: as long as it takes) and return the result.

        Raises ``TaskFailed`` if the task ended dead or cancelled, ``tq.core.errors.Timeout``
        if it is still unfinished after ``timeout``.
        """
        client = self._c()
        try:
            task = client.wait(self.id, timeout)
        except Timeout:
            raise _timed_out(self, client.get(self.id), timeout) from None
        return _outcome(self.task, task)


class AsyncTaskHandle(Generic[R]):
    """A submitted task, through the trio client: ``await result()``, ``status``, ``cancel``."""

    def __init__(
        self,
        task: TaskDef[Any, R],
        id: str,
        client: Client | AsyncioClient | None = None,
        warning: str | None = None,
    ) -> None:
        self.task, self.id, self.warning = task, id, warning
        self._client = client

    def __repr__(self) -> str:
        return f"<AsyncTaskHandle {self.task.name} {self.id}>"

    def _c(self) -> Client | AsyncioClient:
        return self._client if self._client is not None else current_client()

    async def status(self) -> Task:
        return await self._c().get(self.id)

    async def cancel(self) -> Task:
        return await self._c().cancel(self.id)

    async def result(self, timeout: float | None = None) -> R:
        """As ``TaskHandle.result``, awaited."""
        client = self._c()
        try:
            task = await client.wait(self.id, timeout)
        except Timeout:
            raise _timed_out(self, await client.get(self.id), timeout) from None
        return _outcome(self.task, task)


def _outcome(declared: TaskDef[Any, R], task: Task) -> R:
    if task.state.value != "succeeded":
        raise TaskFailed(task)
    value: R = declared.signature.check_result(task.result)
    return value


def _timed_out(handle: TaskHandle[Any] | AsyncTaskHandle[Any], task: Task, t: Any) -> Timeout:
    return Timeout(
        f"task {handle.id} ({handle.task.name}) is still {task.state.value} after {t:g}s; "
        "call result() again to wait longer, or status() to look at it"
    )


# -- declaring ------------------------------------------------------------------------------

_declared: dict[str, TaskDef[Any, Any]] = {}
_declared_lock = threading.Lock()


def declared() -> list[TaskDef[Any, Any]]:
    """Every task declared in this process so far (what ``tq worker --import`` registers)."""
    with _declared_lock:
        return list(_declared.values())


def _declare(
    fn: Callable[..., Any], name: str | None, options: dict[str, Any]
) -> TaskDef[Any, Any]:
    if not callable(fn) or isinstance(fn, TaskDef):
        raise TaskDeclarationError(f"@tq.task decorates a function, got {fn!r}")
    declared_task: TaskDef[Any, Any] = TaskDef(fn, name=name, options=options)
    with _declared_lock:
        earlier = _declared.get(declared_task.name)
        if earlier is not None and _origin(earlier.fn) != _origin(fn):
            raise TaskDeclarationError(
                f"task {declared_task.name} is declared twice ({_origin(earlier.fn)} and "
                f"{_origin(fn)}); give one of them another name="
            )
        _declared[declared_task.name] = declared_task  # a re-import replaces its own
    return declared_task


def _origin(fn: Callable[..., Any]) -> str:
    return f"{_module_name(fn)}.{getattr(fn, '__qualname__', '?')}"


class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> TaskDef[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> TaskDef[P, R]: ...


@overload
def task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> TaskDef[P, R]: ...
@overload
def task(fn: Callable[P, R], /) -> TaskDef[P, R]: ...
@overload
def task(
    *,
    name: str | None = None,
    queue: str | None = None,
    priority: int | str | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
    retry_base: float | None = None,
    retry_cap: float | None = None,
    unique_for: float | str | None = None,
    unique_key: str | None = None,
) -> _Decorator: ...
def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str | None = None,
    priority: int | str | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
    retry_base: float | None = None,
    retry_cap: float | None = None,
    unique_for: float | str | None = None,
    unique_key: str | None = None,
) -> Any:
    """Declare a task type: ``@tq.task`` or ``@tq.task(queue="emails", max_retries=5)``.
    ``unique_for`` (seconds or a duration, "1h") makes every submission unique
    (docs/PYTHON.md, "Unique tasks"): by type and payload, or by ``unique_key``."""
    options = {
        "queue": queue,
        "priority": priority,
        "max_retries": max_retries,
        "timeout": timeout,
        "retry_base": retry_base,
        "retry_cap": retry_cap,
        "unique_for": unique_for,
        "unique_key": unique_key,
    }
    if fn is not None:
        return _declare(fn, name, options)
    return lambda f: _declare(f, name, options)


# -- clients ------------------------------------------------------------------------------

_CLIENT_FLAGS = ("broker", "ca", "key", "join", "insecure", "client_cert", "client_key")
_config_lock = threading.Lock()
_settings: ConnectionSettings | None = None
_generation = 0  # bumped by configure(): clients opened before are stale
_local = threading.local()
_opened: list[BlockingClient] = []
_current: contextvars.ContextVar[Client | AsyncioClient | None] = contextvars.ContextVar(
    "tq_client", default=None
)


def configure(settings: ConnectionSettings | None = None, **flags: Any) -> None:
    """Where tasks are submitted: ``broker``, ``ca``, ``key`` (or ``join``), ``insecure``,
    ``client_cert``, ``client_key``; unset ones come from ``TQ_*`` and the config file.

    Closes the default clients opened so far; the next submit connects anew.
    """
    unknown = sorted(set(flags) - set(_CLIENT_FLAGS))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(_CLIENT_FLAGS)}"
        )
    if settings is not None and flags:
        raise ConfigError("configure takes settings or separate settings, not both")
    resolved = settings if settings is not None else _load(flags)
    global _settings, _generation
    with _config_lock:
        _settings = resolved
        _generation += 1
    close()


def _load(flags: Mapping[str, Any]) -> ClientSettings:
    from tq.config import ClientSettings, load

    return load(ClientSettings, {k: v for k, v in flags.items() if v is not None})


def default_settings() -> ConnectionSettings:
    """The settings default clients connect with (``configure``, else TQ_* and the file)."""
    global _settings
    with _config_lock:
        if _settings is None:
            _settings = _load({})
        return _settings


def blocking_client() -> BlockingClient:
    """This thread's default blocking client (opened now if needed, or reopened when the
    broker has closed it: an idle timeout, a restart)."""
    from tq.client.sync import BlockingClient

    mine: BlockingClient | None = getattr(_local, "client", None)
    if mine is not None and (_local.generation != _generation or mine.closed_by_broker()):
        _forget(mine)
        mine = None
    if mine is None:
        generation = _generation
        mine = BlockingClient.from_settings(default_settings())
        _local.client, _local.generation = mine, generation
        with _config_lock:
            _opened.append(mine)
    return mine


def _forget(client: BlockingClient) -> None:
    client.close()
    with _config_lock, contextlib.suppress(ValueError):
        _opened.remove(client)
    _local.client = None


def close() -> None:
    """Close every default blocking client (each thread reconnects on its next submit)."""
    with _config_lock:
        clients = list(_opened)
        _opened.clear()
    for client in clients:
        client.close()


def current_client() -> Client | AsyncioClient:
    """The client of the enclosing ``async with tq.connect()``."""
    client = _current.get()
    if client is None:
        raise ConfigError(
            "await submit() needs a client: run it inside `async with tq.connect():` "
            "or pass one with task.with_options(client=client)"
        )
    return client


@contextlib.asynccontextmanager
async def connect(
    settings: ConnectionSettings | None = None, **flags: Any
) -> AsyncIterator[Client | AsyncioClient]:
    """A client for this block; ``await task.submit(...)`` inside it uses it.

    Arguments as ``configure`` (default: the configured settings). Under trio a
    trio ``Client`` (tasks that the block's nursery starts inherit it); under
    asyncio an ``AsyncioClient`` (tasks created inside the block inherit it).
    """

    unknown = sorted(set(flags) - set(_CLIENT_FLAGS))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(_CLIENT_FLAGS)}"
        )
    if settings is not None and flags:
        raise ConfigError("connect takes settings or separate settings, not both")
    if settings is None:
        settings = _load(flags) if flags else default_settings()
    if _on_asyncio():
        from tq.client.asyncio_client import AsyncioClient as chosen
    else:
        from tq.client.aio import Client as chosen  # type: ignore[assignment]
    async with chosen.from_settings(settings) as client:
        token = _current.set(client)
        try:
            yield client
        finally:
            _current.reset(token)


def _on_asyncio() -> bool:
    """Is the caller running under asyncio (not trio)? Without importing either."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def register(registry: Any, tasks: Iterable[TaskDef[Any, Any]] | None = None) -> None:
    """Register ``tasks`` (default: every declared one) as handlers in a worker registry."""
    for one in declared() if tasks is None else tasks:
        registry.register(one.name, one.handler())


__all__ = [
    "AsyncTaskHandle",
    "TaskArgumentError",
    "TaskDeclarationError",
    "TaskDef",
    "TaskFailed",
    "TaskHandle",
    "blocking_client",
    "close",
    "configure",
    "connect",
    "declared",
    "default_settings",
    "register",
    "task",
]
