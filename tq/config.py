"""Settings: frozen, typed per role, resolved once at the edge.

Each process reads the settings of its role, and only those:

* ``CommonSettings``: every process (data directory, logging, frame cap, plaintext);
* ``ConnectionSettings``: how to reach a broker (address, CA, key, join token, client
  certificate); shared by ``ClientSettings`` (the CLI, the console, the Python API)
  and ``WorkerSettings`` (which adds queues, concurrency, name, grace);
* ``BrokerSettings``: listen and HTTP addresses, store, durability, auth and limits.

``Settings`` holds every field of every role: what one config file may hold, and what
``tq up`` (a broker and a worker in one process) and ``tq doctor`` use. Each role type
is a base of ``Settings``, so full settings can be passed wherever a role's are taken.

Precedence, lowest first: defaults (the named constants below) < config file
(TOML) < environment (``TQ_<KEY>``) < command-line flags. Only this module
and tq/cli read files and the environment; everything else receives settings.

Values are converted by the field's declared type (``typing.get_type_hints``):
``bool``, ``int``, ``float``, ``str``, ``Path``, ``X | None``, ``tuple[str, ...]``,
``Literal[...]`` (the accepted choices), with ``Annotated`` marks for ranges
(``Bounds``), validation (``Check``) and an off switch (``OFF``). A bad value from any
source is a ConfigError naming that source: ``TQ_GRACE=abc: not a number of seconds``,
``config file F: lease_ttl = -1: must be > 0``, ``--synchronous fast: expected full or
normal``.

The config file is ``$TQ_CONFIG`` if set, else ``config.toml`` in the platform
config directory. One file serves every role; keys are the field names of
``Settings`` (a role ignores the others' keys). An unknown key is refused, naming
the nearest known one, so a typo is noticed. ``ALIASES`` adds names matching the
command-line flag (``TQ_GRACE`` / ``grace`` for ``--grace``, which is
``shutdown_grace``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import platformdirs

from tq.core.errors import ConfigError
from tq.core.limits import MAX_FRAME as DEFAULT_MAX_FRAME
from tq.core.limits import MAX_FRAME_LIMIT
from tq.store.claimplan import Aging

APP = "tq"
DEFAULT_PORT = 7470
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_LEASE_TTL = 30.0
DEFAULT_CONCURRENCY = 8
DEFAULT_SYNCHRONOUS = "full"
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_HTTP = "127.0.0.1:7471"  # broker: REST API, /metrics, /health; "off" disables
# security limits (docs/SECURITY.md)
DEFAULT_MAX_CONNECTIONS = 1024  # per broker; more are refused at once
DEFAULT_MAX_IN_FLIGHT = 1024  # unanswered requests per connection, then back-pressure
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # TCP accept -> TLS handshake done
DEFAULT_HELLO_TIMEOUT = 10.0  # TLS done -> hello accepted
DEFAULT_IDLE_TIMEOUT = 300.0  # no request for this long (and none in flight): closed
DEFAULT_SUBMIT_RATE = 5000.0  # tasks/s per non-admin key (token bucket); 0: no limit
DEFAULT_SUBMIT_BURST = 10000.0  # tasks a key may submit at once above its rate
DEFAULT_AGING_CAP = 50.0  # priority points a wait can add at most (with aging_rate set)
DEFAULT_MAX_PAYLOAD = 10 * 1024 * 1024  # msgpack-encoded task payload; the store's ceiling
# retention: finished tasks are deleted this long after they finished (0: kept forever)
DEFAULT_RETENTION_SUCCEEDED = 7 * 86400.0
DEFAULT_RETENTION_DEAD = 30 * 86400.0
DEFAULT_RETENTION_CANCELLED = 7 * 86400.0


# -- what a field's type may carry besides the type itself ---------------------------------


@dataclass(frozen=True)
class Bounds:
    """A number's range; ``unit`` names it in errors ("not a number of seconds")."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    unit: str = ""


@dataclass(frozen=True)
class Check:
    """A text value's own check: returns the value to keep, raises ConfigError/ValueError."""

    check: Callable[[str], str]


@dataclass(frozen=True)
class Listable:
    """A text setting the config file may also give as an array (joined with commas)."""


LISTABLE = Listable()


@dataclass(frozen=True)
class Off:
    """A text setting a TOML ``false`` turns off (stored as ``"off"``)."""


OFF = Off()


@dataclass(frozen=True)
class Duration:
    """A number of seconds that may also be written 30s, 5m, 12h, 7d, 2w; ``off``, ``0``
    or a TOML ``false`` is 0 (for a TTL: forever)."""


DURATION = Duration()


@dataclass(frozen=True)
class QueueTTLs:
    """Per-queue retention TTLs: in the config file a table of tables,
    ``[retention_queues.reports]`` ``succeeded = "1d"``; in the environment or a flag
    ``reports.succeeded=1d,reports.dead=off``. Held as sorted (queue, state, seconds)."""


QUEUE_TTLS = QueueTTLs()


def _store_url(text: str) -> str:
    text = text.strip()
    if text:
        from tq.store import parse_store_url

        parse_store_url(text)  # ConfigError naming the accepted forms
    return text


def _brokers(text: str) -> str:
    """One broker address or several, comma-separated, each checked (the entry that is
    wrong is named, with how to write a list)."""
    from tq.client.failover import parse_brokers

    return ",".join(parse_brokers(text))


Seconds = Annotated[float, Bounds(gt=0, unit="seconds")]
Count = Annotated[int, Bounds(gt=0)]
Rate = Annotated[float, Bounds(ge=0)]  # 0: no limit
Amount = Annotated[float, Bounds(gt=0)]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["human", "json"]
Synchronous = Literal["full", "normal"]
StoreURL = Annotated[str, Check(_store_url)]
Brokers = Annotated[str, LISTABLE, Check(_brokers)]
Switchable = Annotated[str, OFF]
TTL = Annotated[float, Bounds(ge=0, unit="seconds"), DURATION]  # 0: forever
PerQueueTTLs = Annotated[tuple[tuple[str, str, float], ...], QUEUE_TTLS]


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_config_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("TQ_CONFIG"):
        return Path(env["TQ_CONFIG"])
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


# -- the settings of each role ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CommonSettings:
    """What every process reads."""

    role: ClassVar[str] = "every role"

    data: Path = field(default_factory=default_data_dir)
    log_level: LogLevel = "info"
    log_format: LogFormat = "human"  # services' log lines: human or json
    max_frame: Annotated[int, Bounds(gt=0, le=MAX_FRAME_LIMIT)] = DEFAULT_MAX_FRAME
    insecure: bool = False  # broker: listen without TLS; others: connect without it

    @property
    def tls_dir(self) -> Path:
        return self.data / "tls"

    @property
    def db_path(self) -> Path:
        return self.data / "tq.db"

    @property
    def admin_key_file(self) -> Path:
        """Where a broker writes the admin key it creates on first start (0600)."""
        return self.data / "admin.key"

    @property
    def join_key_file(self) -> Path:
        """Where a broker keeps the worker key its printed join token carries (0600)."""
        return self.data / "join.key"


@dataclass(frozen=True, kw_only=True)
class ConnectionSettings(CommonSettings):
    """How a client or a worker reaches the broker and proves who it is."""

    role: ClassVar[str] = "workers and clients"

    broker: Brokers = DEFAULT_LISTEN  # where the broker is: one address or several
    ca: Path | None = None  # None: <data>/tls/ca.pem if it exists
    key: str | None = None  # API key; None: <data>/admin.key (the local broker's) if readable
    join: str | None = None  # join token: broker addresses, CA and key in one string
    client_cert: Path | None = None  # mutual TLS: this client's certificate ...
    client_key: Path | None = None  # ... and its private key (`tq ca issue NAME`)

    def ca_file(self) -> Path | None:
        """The CA to verify the broker with: --ca, else the local broker's."""
        if self.ca is not None:
            return self.ca
        local = self.tls_dir / "ca.pem"
        return local if local.exists() else None

    def api_key(self) -> str | None:
        """The key to present: --key / TQ_KEY / config, else the local broker's admin key."""
        if self.key:
            return self.key
        try:
            return self.admin_key_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(
                f"cannot read the admin key {self.admin_key_file} ({exc.strerror}); "
                "pass --key (or set TQ_KEY) with a key an admin gave you"
            ) from None


@dataclass(frozen=True, kw_only=True)
class ClientSettings(ConnectionSettings):
    """The CLI's client commands, the console and the Python API: the connection only."""

    role: ClassVar[str] = "clients"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(ConnectionSettings):
    """A worker: the connection, and what it runs."""

    role: ClassVar[str] = "workers"

    concurrency: Count = DEFAULT_CONCURRENCY
    queues: tuple[str, ...] = ("default",)
    name: str = ""  # worker name; empty: host-pid
    shutdown_grace: Seconds = DEFAULT_SHUTDOWN_GRACE
    lease_ttl: Seconds = DEFAULT_LEASE_TTL  # until the broker's hello answer says


@dataclass(frozen=True, kw_only=True)
class BrokerSettings(CommonSettings):
    """A broker: where it listens, where it keeps tasks, and its limits."""

    role: ClassVar[str] = "brokers"

    listen: str = DEFAULT_LISTEN  # where to accept connections
    http: Switchable = DEFAULT_HTTP  # where to serve HTTP (REST, metrics), or "off"
    tls_san: tuple[str, ...] = ()
    store: StoreURL = ""  # the store URL (tq.store); empty: sqlite://<data>/tq.db
    synchronous: Synchronous = "full"
    lease_ttl: Seconds = DEFAULT_LEASE_TTL
    # -- security --
    auth: bool = True  # require API keys (--no-auth turns this off)
    require_client_cert: bool = False  # mutual TLS
    max_connections: Count = DEFAULT_MAX_CONNECTIONS
    max_in_flight: Count = DEFAULT_MAX_IN_FLIGHT
    handshake_timeout: Seconds = DEFAULT_HANDSHAKE_TIMEOUT
    hello_timeout: Seconds = DEFAULT_HELLO_TIMEOUT
    idle_timeout: Seconds = DEFAULT_IDLE_TIMEOUT
    submit_rate: Rate = DEFAULT_SUBMIT_RATE
    submit_burst: Amount = DEFAULT_SUBMIT_BURST
    max_payload: Count = DEFAULT_MAX_PAYLOAD
    # -- retention: finished tasks deleted by the broker after these (0/off: kept) --
    retention_succeeded: TTL = DEFAULT_RETENTION_SUCCEEDED
    retention_dead: TTL = DEFAULT_RETENTION_DEAD
    retention_cancelled: TTL = DEFAULT_RETENTION_CANCELLED
    retention_queues: PerQueueTTLs = ()  # per queue and state, over the three above
    # -- priority aging: pending tasks gain aging_rate priority points a minute of
    # waiting, at most aging_cap (0: off); claims take the highest sum first --
    aging_rate: Rate = 0.0
    aging_cap: Amount = DEFAULT_AGING_CAP

    @property
    def aging(self) -> Aging | None:
        """The claim order's aging (tq.store.claimplan), None when off."""
        if not self.aging_rate:
            return None
        return Aging(rate=self.aging_rate / 60.0, cap=self.aging_cap)

    @property
    def http_enabled(self) -> bool:
        return self.http.strip().lower() not in ("off", "no", "false", "none", "")

    @property
    def store_url(self) -> str:
        """Where the broker keeps its tasks: ``store``, else the SQLite file in ``data``."""
        return self.store or f"sqlite://{self.db_path}"


@dataclass(frozen=True, kw_only=True)
class Settings(BrokerSettings, WorkerSettings, ClientSettings):
    """Every setting of every role: the config file's keys; ``tq up`` and ``tq doctor``."""

    role: ClassVar[str] = "every role"


R = TypeVar("R", bound=CommonSettings)
ROLES: dict[str, type[CommonSettings]] = {
    "broker": BrokerSettings,
    "worker": WorkerSettings,
    "client": ClientSettings,
}

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
SECRET_SETTINGS = frozenset({"key", "join"})  # credentials: never passed on (--exec programs)
# names matching a command-line flag that differs from the field's name
ALIASES = {"grace": "shutdown_grace"}  # env TQ_GRACE, config key grace
# the command-line flag of each setting that has one (tq/cli/settings_table.py checks
# these against every command's options)
FLAGS = {
    "data": "--data",
    "listen": "--listen",
    "http": "--http",
    "broker": "--broker",
    "ca": "--ca",
    "insecure": "--insecure",
    "tls_san": "--tls-san",
    "synchronous": "--synchronous",
    "lease_ttl": "--lease-ttl",
    "concurrency": "--concurrency",
    "queues": "--queues",
    "shutdown_grace": "--grace",
    "name": "--name",
    "log_level": "--log-level",
    "log_format": "--log-format",
    "key": "--key",
    "join": "--join",
    "client_cert": "--client-cert",
    "client_key": "--client-key",
    "auth": "--no-auth",
    "require_client_cert": "--require-client-cert",
    "max_connections": "--max-connections",
    "submit_rate": "--submit-rate",
    "store": "--store",
}


def env_name(key: str) -> str:
    """The documented environment variable of setting ``key`` (TQ_GRACE for --grace)."""
    alias = next((a for a, k in ALIASES.items() if k == key), key)
    return f"TQ_{alias.upper()}"


def config_key(key: str) -> str:
    """The documented config-file key of setting ``key``."""
    return next((a for a, k in ALIASES.items() if k == key), key)


def roles_of(key: str) -> list[str]:
    """The roles that read setting ``key``: "broker", "worker", "client"."""
    return [name for name, cls in ROLES.items() if key in field_types(cls)]


def as_role(settings: CommonSettings, role: type[R]) -> R:
    """The part of ``settings`` that ``role`` reads, as that type."""
    return role(**{name: getattr(settings, name) for name in field_types(role)})


# -- conversion by type -------------------------------------------------------------------


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(role: type[CommonSettings]) -> dict[str, Any]:
    """Field name -> its resolved type (``Annotated`` marks kept), for ``role``."""
    if role not in _FIELD_TYPES:
        hints = get_type_hints(role, include_extras=True)
        _FIELD_TYPES[role] = {f.name: hints[f.name] for f in dataclasses.fields(role)}
    return _FIELD_TYPES[role]


def convert(kind: Any, value: Any) -> Any:
    """``value`` (flag, environment text or TOML value) as type ``kind``; ValueError
    (or ConfigError from a ``Check``) says what is wrong with it."""
    marks: tuple[Any, ...] = ()
    if get_origin(kind) is Annotated:
        kind, *rest = get_args(kind)
        marks = tuple(rest)
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None or value == "":
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return convert(kind, value)
    if origin is Literal:
        if not isinstance(value, str) or value.strip().lower() not in args:
            raise ValueError(f"expected {' or '.join(args)}")
        return value.strip().lower()
    if kind is bool:
        return _boolean(value)
    if QUEUE_TTLS in marks:
        return _queue_ttls(value)
    if DURATION in marks:
        value = _duration(value)
    if kind in (int, float):
        bounds = next((m for m in marks if isinstance(m, Bounds)), Bounds())
        return _number(kind, value, bounds)
    if origin is tuple:
        return _names(value)
    if kind is Path:
        if not isinstance(value, str | Path):
            raise ValueError("expected a path (in quotes in the config file)")
        return Path(os.path.expanduser(str(value)))
    if kind is str:
        if value is False and OFF in marks:
            return "off"
        if LISTABLE in marks and isinstance(value, list | tuple):  # a TOML array
            if not all(isinstance(v, str) for v in value):
                raise ValueError('expected text or a list of texts (["a:7470", "b:7470"])')
            value = ",".join(value)
        if not isinstance(value, str):
            raise ValueError("expected text (in quotes in the config file)")
        for mark in marks:
            if isinstance(mark, Check):
                value = mark.check(value)
        return value
    raise TypeError(f"no conversion to {kind!r}")  # a new field type: teach convert


def _duration(value: Any) -> Any:
    """Text like 7d (or off) as seconds; numbers as they are (checked by ``_number``)."""
    if value is False:
        return 0.0
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("off", "never", "forever", "none", "false"):
        return 0.0
    from tq.core.errors import InvalidRequest
    from tq.core.when import parse_duration

    try:
        return parse_duration(text)
    except InvalidRequest:
        raise ValueError(
            "not a duration: write e.g. 7d, 12h, 30m, 45s, seconds, or off (kept forever)"
        ) from None


def _queue_ttls(value: Any) -> tuple[tuple[str, str, float], ...]:
    """A table {queue: {state: ttl}} or text "queue.state=ttl,..." as sorted triples."""
    from tq.core.retention import FINISHED

    pairs: list[tuple[str, str, Any]] = []
    if isinstance(value, str):
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, ttl = item.partition("=")
            queue, dot, state = name.strip().rpartition(".")
            if not sep or not dot or not queue:
                raise ValueError(
                    f"{item!r} is not QUEUE.STATE=TTL (e.g. reports.succeeded=1d,reports.dead=off)"
                )
            pairs.append((queue, state.strip(), ttl))
    elif isinstance(value, Mapping):
        for queue, states in value.items():
            if not isinstance(states, Mapping):
                raise ValueError(
                    f"retention_queues.{queue} must be a table of states, e.g. "
                    f'[retention_queues.{queue}] succeeded = "1d"'
                )
            pairs += [(str(queue), str(state), ttl) for state, ttl in states.items()]
    else:
        raise ValueError('expected a table ([retention_queues.NAME] succeeded = "1d")')
    out: dict[tuple[str, str], float] = {}
    for queue, state, ttl in pairs:
        if state not in FINISHED:
            raise ValueError(f"{queue}.{state}: retention applies to {', '.join(FINISHED)}")
        try:
            seconds = _number(float, _duration(ttl), Bounds(ge=0, unit="seconds"))
        except ValueError as exc:
            raise ValueError(f"{queue}.{state} = {ttl!r}: {exc}") from None
        out[(queue, state)] = float(seconds)
    return tuple(sorted((q, st, t) for (q, st), t in out.items()))


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not true or false")


def _number(kind: type[int] | type[float], value: Any, bounds: Bounds) -> int | float:
    noun = f"a number of {bounds.unit}" if bounds.unit else "a number"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"not {noun}")
    number: int | float
    try:
        number = int(str(value).strip()) if kind is int else float(value)
    except ValueError:
        raise ValueError(f"not {'a whole number' if kind is int else noun}") from None
    if not math.isfinite(number):
        raise ValueError(f"not {noun}")
    if bounds.gt is not None and not number > bounds.gt:
        raise ValueError(f"must be > {_shown(bounds.gt)}")
    if bounds.ge is not None and not number >= bounds.ge:
        raise ValueError(f"must be >= {_shown(bounds.ge)}")
    if bounds.le is not None and not number <= bounds.le:
        raise ValueError(f"must be <= {_shown(bounds.le)}")
    return number


def _shown(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


def _names(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError('expected a list of names (["a", "b"]) or a comma-separated string')
    return tuple(i.strip() for i in items if i.strip())


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """``convert``, with any error naming where the value came from (``where``:
    "TQ_GRACE=abc", "--grace abc", "config file F: grace = 'abc'")."""
    try:
        return convert(kind, value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


# -- sources ------------------------------------------------------------------------------


def _nearest(key: str) -> str:
    names = sorted({*FIELDS, *ALIASES})
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings by field name (aliases resolved), unchecked values; {} if
    there is no file. Invalid TOML or an unknown key: a ConfigError naming the file."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"config file {path} is not valid TOML ({exc}); fix it or point TQ_CONFIG elsewhere"
        ) from None
    for alias, key in ALIASES.items():
        if alias in data:
            if key in data:
                raise ConfigError(f"config file {path}: give {alias} or {key}, not both")
            data[key] = data.pop(alias)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        named = ", ".join(f"{key}{_nearest(key)}" for key in unknown)
        raise ConfigError(
            f"config file {path}: unknown key(s) {named}; known keys: {', '.join(sorted(FIELDS))}"
        )
    return data


def load(
    role: type[R],
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> R:
    """Resolve ``role``'s settings: defaults < config file < TQ_* environment < flags.

    Only ``role``'s fields are read (a worker ignores the broker's keys); the config
    file's keys are all checked to be known. ``flags`` holds only the options the
    user gave (None values are ignored).
    """
    env = os.environ if env is None else env
    kinds = field_types(role)
    merged: dict[str, tuple[Any, str]] = {}  # key -> (value, where it came from)
    path = config_file or default_config_file(env)
    for key, value in read_config_file(path).items():
        if key in kinds:
            merged[key] = (value, f"config file {path}: {config_key(key)} = {value!r}")
    for key in kinds:
        for name in dict.fromkeys((f"TQ_{key.upper()}", env_name(key))):  # alias wins
            value = env.get(name)
            if value is not None and value != "":
                merged[key] = (value, f"{name}={value}")
    for key, value in (flags or {}).items():
        if value is not None:
            flag = FLAGS.get(key, f"--{key.replace('_', '-')}")
            if key not in kinds:
                raise ConfigError(f"unknown setting {key!r} ({flag}) for {role.role}")
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
            merged[key] = (value, f"{flag} {shown}")
    return role(**{k: _coerce(kinds[k], v, where) for k, (v, where) in merged.items()})


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Every role's settings (``load(Settings, ...)``): for ``tq up`` and ``tq doctor``."""
    return load(Settings, flags, env, config_file)


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host:port', 'host', ':port' or '[v6]:port' -> (host, port)."""
    text = text.strip()
    if not text:
        raise ConfigError("empty address; expected HOST:PORT, e.g. 127.0.0.1:7470")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"address {text!r}: missing ']' after an IPv6 host")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        return host or "127.0.0.1", default_port
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"address {text!r}: port must be a number 0..65535") from None
    return host or "127.0.0.1", port
