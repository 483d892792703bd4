"""Settings: frozen, resolved once at the edge.

Precedence, lowest first: defaults (the named constants below) < config file
(TOML) < environment (``TQ_<KEY>``) < command-line flags. Only this module
and tq/cli read files and the environment; everything else receives a
``Settings``.

The config file is ``$TQ_CONFIG`` if set, else ``config.toml`` in the
platform config directory (``tq config-path`` prints it). Keys are the field
names of ``Settings``; unknown keys are refused so a typo is noticed.
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
DEFAULT_HTTP = "127.0.0.1:7471"  # broker: REST API, /metrics, /health (issue 5); "off" disables
# security limits (issue 4; docs/SECURITY.md)
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
    # -- security (issue 4) --
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


def _coerce(key: str, value: Any) -> Any:
    """Turn a file/env/flag value into the field's type, or explain."""
    kind = FIELDS[key].type
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
            raise ValueError("expected true or false")
        if kind == "float":
            number = float(value)
            if number < 0 or (number == 0 and key not in ZERO_DISABLES):
                raise ValueError("must be > 0")
            return number
        if kind == "int":
            whole = int(value)
            if whole <= 0:
                raise ValueError("must be > 0")
            return whole
        if kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if key == "store" and str(value).strip():
            from tq.store import parse_store_url

            parse_store_url(str(value))  # ConfigError naming the accepted forms
            return str(value).strip()
        if key == "synchronous" and str(value).lower() not in ("full", "normal"):
            raise ValueError("expected full or normal")
        return str(value).lower() if key == "synchronous" else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {key!r}: {value!r} is not valid ({exc})") from None


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
    merged: dict[str, Any] = {}
    path = config_file or default_config_file(env)
    merged.update(read_config_file(path))
    for key in FIELDS:
        value = env.get(f"TQ_{key.upper()}")
        if value is not None and value != "":
            merged[key] = value
    for key, value in (flags or {}).items():
        if value is not None:
            if key not in FIELDS:
                raise ConfigError(f"unknown setting {key!r}")
            merged[key] = value
    return Settings(**{k: _coerce(k, v) for k, v in merged.items()})


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
