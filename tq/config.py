"""Settings: frozen, resolved once at the edge.

Precedence, lowest first: defaults (the named constants below) < config file
(TOML) < environment (``TQ_<KEY>``) < command-line flags. Only this module
and tq/cli read files and the environment; everything else receives a
``Settings``.

The config file is ``$TQ_CONFIG`` if set, else ``config.toml`` in the
platform config directory. Keys are the field names of ``Settings``; unknown
keys are refused so a typo is noticed. ``ALIASES`` adds names matching the
command-line flag (``TQ_GRACE`` / ``grace`` for ``--grace``, which is
``shutdown_grace``). A bad value from any source is a ConfigError naming that
source: ``TQ_GRACE=abc: not a number of seconds``, ``config file F: lease_ttl
= -1: must be > 0``, ``--synchronous fast: expected full or normal``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from tq.core.errors import ConfigError

APP = "tq"
DEFAULT_PORT = 7470
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_LEASE_TTL = 30.0
DEFAULT_CONCURRENCY = 8
DEFAULT_SYNCHRONOUS = "full"
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
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
DEFAULT_MAX_PAYLOAD = 10 * 1024 * 1024  # msgpack-encoded task payload; the store's ceiling


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_config_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("TQ_CONFIG"):
        return Path(env["TQ_CONFIG"])
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


@dataclass(frozen=True)
class Settings:
    data: Path = field(default_factory=default_data_dir)
    listen: str = DEFAULT_LISTEN  # broker: where to accept connections
    http: str = DEFAULT_HTTP  # broker: where to serve HTTP (REST, metrics), or "off"
    broker: str = DEFAULT_LISTEN  # clients and workers: where the broker is
    ca: Path | None = None  # None: <data>/tls/ca.pem if it exists
    insecure: bool = False
    tls_san: tuple[str, ...] = ()
    store: str = ""  # broker: the store URL (tq.store); empty: sqlite://<data>/tq.db
    synchronous: str = DEFAULT_SYNCHRONOUS
    lease_ttl: float = DEFAULT_LEASE_TTL
    max_frame: int = DEFAULT_MAX_FRAME
    concurrency: int = DEFAULT_CONCURRENCY
    queues: tuple[str, ...] = ("default",)
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    name: str = ""  # worker name; empty: host-pid
    log_level: str = "info"
    log_format: str = "human"  # services' log lines: human or json
    # -- security --
    key: str | None = None  # API key; None: <data>/admin.key (the local broker's) if readable
    join: str | None = None  # join token: broker addresses, CA and key in one string
    client_cert: Path | None = None  # mutual TLS: this client's certificate ...
    client_key: Path | None = None  # ... and its private key (`tq ca issue NAME`)
    auth: bool = True  # broker: require API keys (--no-auth turns this off)
    require_client_cert: bool = False  # broker: mutual TLS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    submit_rate: float = DEFAULT_SUBMIT_RATE
    submit_burst: float = DEFAULT_SUBMIT_BURST
    max_payload: int = DEFAULT_MAX_PAYLOAD

    @property
    def http_enabled(self) -> bool:
        return self.http.strip().lower() not in ("off", "no", "false", "none", "")

    @property
    def tls_dir(self) -> Path:
        return self.data / "tls"

    @property
    def db_path(self) -> Path:
        return self.data / "tq.db"

    @property
    def store_url(self) -> str:
        """Where the broker keeps its tasks: ``store``, else the SQLite file in ``data``."""
        return self.store or f"sqlite://{self.db_path}"

    def ca_file(self) -> Path | None:
        """The CA to verify the broker with: --ca, else the local broker's."""
        if self.ca is not None:
            return self.ca
        local = self.tls_dir / "ca.pem"
        return local if local.exists() else None

    @property
    def admin_key_file(self) -> Path:
        """Where a broker writes the admin key it creates on first start (0600)."""
        return self.data / "admin.key"

    @property
    def join_key_file(self) -> Path:
        """Where a broker keeps the worker key its printed join token carries (0600)."""
        return self.data / "join.key"

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


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
SECRET_SETTINGS = frozenset({"key", "join"})  # credentials: never passed on (--exec programs)
ZERO_DISABLES = frozenset({"submit_rate"})  # settings where 0 means "no limit"
# names matching a command-line flag that differs from the field's name
ALIASES = {"grace": "shutdown_grace"}  # env TQ_GRACE, config key grace
SECONDS = frozenset(
    {"lease_ttl", "shutdown_grace", "handshake_timeout", "hello_timeout", "idle_timeout"}
)
CHOICES = {
    "synchronous": ("full", "normal"),
    "log_level": ("debug", "info", "warning", "error"),
    "log_format": ("human", "json"),
}
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


def _coerce(key: str, value: Any, source: str | None = None) -> Any:
    """Turn a file/env/flag value into the field's type, or say what is wrong with it
    and where it came from (``source``: "TQ_GRACE=abc", "--grace abc", ...)."""
    try:
        return _convert(key, value)
    except (TypeError, ValueError) as exc:
        where = source or f"setting {key!r}: {value!r}"
        raise ConfigError(f"{where}: {exc}") from None


def _convert(key: str, value: Any) -> Any:
    kind = FIELDS[key].type
    if key in CHOICES:
        text = str(value).strip().lower()
        if text not in CHOICES[key]:
            raise ValueError(f"expected {' or '.join(CHOICES[key])}")
        return text
    if kind in ("float", "int"):
        noun = "a number of seconds" if key in SECONDS else "a number"
        if isinstance(value, bool):
            raise ValueError(f"not {noun}")
        try:
            number = float(value) if kind == "float" else int(str(value).strip())
        except (TypeError, ValueError):
            raise ValueError(f"not {'a whole number' if kind == 'int' else noun}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"not {noun}")
        if number < 0 or (number == 0 and key not in ZERO_DISABLES):
            raise ValueError("must be > 0")
        return number
    try:
        if kind in ("Path", "Path | None"):
            return None if value in (None, "") else Path(os.path.expanduser(str(value)))
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("not true or false")
        if kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if key == "broker":
            from tq.client.failover import parse_brokers

            if isinstance(value, list | tuple):  # the config file may list them
                value = ",".join(str(v) for v in value)
            try:
                return ",".join(parse_brokers(str(value)))
            except ConfigError as exc:  # the entry that is wrong, and how to write a list
                raise ValueError(str(exc)) from None
        if key == "store" and str(value).strip():
            from tq.store import parse_store_url

            parse_store_url(str(value))  # ConfigError naming the accepted forms
            return str(value).strip()
        return str(value)
    except TypeError:
        raise ValueError(f"expected {kind}") from None


def read_config_file(path: Path) -> dict[str, Any]:
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
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(FIELDS))}"
        )
    return data


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Resolve settings: defaults < config file < TQ_* environment < flags.

    ``flags`` holds only the options the user gave (None values are ignored).
    """
    env = os.environ if env is None else env
    merged: dict[str, tuple[Any, str]] = {}  # key -> (value, where it came from)
    path = config_file or default_config_file(env)
    for key, value in read_config_file(path).items():
        merged[key] = (value, f"config file {path}: {config_key(key)} = {value!r}")
    for key in FIELDS:
        for name in dict.fromkeys((f"TQ_{key.upper()}", env_name(key))):  # alias wins
            value = env.get(name)
            if value is not None and value != "":
                merged[key] = (value, f"{name}={value}")
    for key, value in (flags or {}).items():
        if value is not None:
            if key not in FIELDS:
                raise ConfigError(f"unknown setting {key!r}")
            flag = FLAGS.get(key, f"--{key.replace('_', '-')}")
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
            merged[key] = (value, f"{flag} {shown}")
    return Settings(**{k: _coerce(k, v, where) for k, (v, where) in merged.items()})


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
