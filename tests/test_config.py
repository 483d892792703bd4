"""Settings per role, converted by each field's declared type (tq/config.py)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tq.config import (
    BrokerSettings,
    ClientSettings,
    CommonSettings,
    ConnectionSettings,
    Settings,
    WorkerSettings,
    as_role,
    env_name,
    field_types,
    load,
    load_settings,
    read_config_file,
    roles_of,
)
from tq.core.errors import ConfigError
from tq.testing import tq_command


def _names(role: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(role)}


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# -- the roles ------------------------------------------------------------------------------


def test_each_role_has_its_own_type_sharing_the_connection_part() -> None:
    connection = _names(ConnectionSettings) - _names(CommonSettings)
    assert {"broker", "ca", "key", "join", "client_cert", "client_key"} == connection
    assert connection <= _names(WorkerSettings) and connection <= _names(ClientSettings)
    assert not connection & _names(BrokerSettings)  # a broker does not connect to a broker
    assert {"concurrency", "queues", "name", "shutdown_grace"} <= _names(WorkerSettings)
    assert not {"concurrency", "listen", "store"} & _names(ClientSettings)
    assert not {"concurrency", "queues"} & _names(BrokerSettings)
    assert {"listen", "http", "store", "max_connections", "submit_rate"} <= _names(BrokerSettings)
    # the full settings are every role's (tq up, tq doctor), usable wherever one is taken
    assert _names(Settings) == _names(BrokerSettings) | _names(WorkerSettings)
    assert all(issubclass(Settings, r) for r in (BrokerSettings, WorkerSettings, ClientSettings))
    assert roles_of("lease_ttl") == ["broker", "worker"]
    assert roles_of("broker") == ["worker", "client"]
    assert roles_of("data") == ["broker", "worker", "client"]


def test_a_role_reads_only_its_own_settings(tmp_path: Path) -> None:
    # a bad broker-only value does not stop a worker or a client; it stops a broker
    env = {"TQ_MAX_CONNECTIONS": "lots", "TQ_BROKER": "b1:7470"}
    none = tmp_path / "none.toml"
    assert load(WorkerSettings, env=env, config_file=none).broker == "b1:7470"
    assert type(load(ClientSettings, env=env, config_file=none)) is ClientSettings
    with pytest.raises(ConfigError, match=r"^TQ_MAX_CONNECTIONS=lots: not a whole number$"):
        load(BrokerSettings, env=env, config_file=none)
    # a worker-only key in the shared file: the broker ignores it, the worker checks it
    config = _file(tmp_path, 'concurrency = "many"\nlisten = "0.0.0.0:7470"\n')
    assert load(BrokerSettings, env={}, config_file=config).listen == "0.0.0.0:7470"
    with pytest.raises(ConfigError, match=r"config.toml: concurrency = 'many': not a whole"):
        load(WorkerSettings, env={}, config_file=config)


def test_a_flag_of_another_role_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'concurrency' \(--concurrency\)"):
        load(ClientSettings, {"concurrency": 3}, env={}, config_file=Path("/none"))


def test_as_role_keeps_the_roles_part() -> None:
    full = Settings(broker="b:1", listen="0.0.0.0:7470", concurrency=3, data=Path("/d"))
    worker = as_role(full, WorkerSettings)
    assert type(worker) is WorkerSettings
    assert (worker.broker, worker.concurrency, worker.data) == ("b:1", 3, Path("/d"))
    assert not hasattr(worker, "listen")


# -- conversion by type -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('queues = "a, b,,c"', "queues", ("a", "b", "c")),
        ('queues = ["a", " b "]', "queues", ("a", "b")),
        ('insecure = "yes"', "insecure", True),
        ("insecure = false", "insecure", False),
        ('ca = "~/ca.pem"', "ca", Path("~/ca.pem").expanduser()),
        ('ca = ""', "ca", None),
        ('key = ""', "key", None),
        ("http = false", "http", "off"),
        ('synchronous = "NORMAL"', "synchronous", "normal"),
        ("lease_ttl = 5", "lease_ttl", 5.0),
        ('concurrency = "4"', "concurrency", 4),
        ("submit_rate = 0", "submit_rate", 0.0),
        ("max_frame = 4294967295", "max_frame", 4294967295),
        ('store = " postgresql://tq@db/tq "', "store", "postgresql://tq@db/tq"),
    ],
)
def test_file_values_are_converted_by_type(
    tmp_path: Path, line: str, key: str, expected: Any
) -> None:
    loaded = load_settings(env={}, config_file=_file(tmp_path, line + "\n"))
    assert getattr(loaded, key) == expected
    assert type(getattr(loaded, key)) is type(expected)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("concurrency = true", "concurrency = True: not a number"),
        ("concurrency = 2.5", "concurrency = 2.5: not a whole number"),
        ("concurrency = 0", "concurrency = 0: must be > 0"),
        ("queues = 5", "queues = 5: expected a list of names"),
        ('queues = ["a", 1]', "queues = ['a', 1]: expected a list of names"),
        ("insecure = 1", "insecure = 1: not true or false"),
        ("broker = 7470", "broker = 7470: expected text (in quotes in the config file)"),
        ("ca = 5", "ca = 5: expected a path"),
        ("lease_ttl = nan", "lease_ttl = nan: not a number of seconds"),
        ("grace = inf", "grace = inf: not a number of seconds"),
        ("hello_timeout = -1", "hello_timeout = -1: must be > 0"),
        ("max_frame = 4294967296", "max_frame = 4294967296: must be <= 4294967295"),
        ("submit_rate = -1", "submit_rate = -1: must be >= 0"),
        ("submit_burst = 0", "submit_burst = 0: must be > 0"),
        ('log_level = "loud"', "log_level = 'loud': expected debug or info or warning or error"),
        ("log_format = 3", "log_format = 3: expected human or json"),
        ('store = "redis://x"', "store = 'redis://x': store URL 'redis://x' is not valid"),
    ],
)
def test_wrong_file_values_name_the_file_and_key(tmp_path: Path, line: str, error: str) -> None:
    config = _file(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, config_file=config)
    assert caught.value.message.startswith(f"config file {config}: {error}")


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"TQ_INSECURE": "maybe"}, "TQ_INSECURE=maybe: not true or false"),
        ({"TQ_MAX_FRAME": "0"}, "TQ_MAX_FRAME=0: must be > 0"),
        ({"TQ_IDLE_TIMEOUT": "-inf"}, "TQ_IDLE_TIMEOUT=-inf: not a number of seconds"),
        ({"TQ_SYNCHRONOUS": "fast"}, "TQ_SYNCHRONOUS=fast: expected full or normal"),
        ({"TQ_SHUTDOWN_GRACE": "x"}, "TQ_SHUTDOWN_GRACE=x: not a number of seconds"),
    ],
)
def test_wrong_environment_values_name_the_variable(env: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env, config_file=Path("/none"))
    assert caught.value.message.startswith(error)


def test_wrong_flag_values_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--concurrency 0: must be > 0$"):
        load(WorkerSettings, {"concurrency": 0}, env={}, config_file=Path("/none"))
    with pytest.raises(ConfigError, match=r"^--submit-rate -2.0: must be >= 0$"):
        load(BrokerSettings, {"submit_rate": -2.0}, env={}, config_file=Path("/none"))
    with pytest.raises(ConfigError, match=r"^--synchronous fast: expected full or normal$"):
        load(BrokerSettings, {"synchronous": "fast"}, env={}, config_file=Path("/none"))


def test_every_field_converts_its_default_back(tmp_path: Path) -> None:
    """Each field's type has a conversion: its default, given as text in TQ_*, loads as is."""
    defaults = Settings()
    env = {}
    for f in dataclasses.fields(Settings):
        value = getattr(defaults, f.name)
        if value is None or value == "" or value == ():
            continue
        if isinstance(value, tuple):
            env[env_name(f.name)] = ",".join(value)
        elif isinstance(value, bool):
            env[env_name(f.name)] = "true" if value else "false"
        else:
            env[env_name(f.name)] = str(value)
    assert load_settings(env=env, config_file=tmp_path / "none.toml") == defaults
    for role in (CommonSettings, BrokerSettings, WorkerSettings, ClientSettings, Settings):
        assert set(field_types(role)) == _names(role)


# -- the file -------------------------------------------------------------------------------


def test_an_unknown_key_names_the_nearest_known_one(tmp_path: Path) -> None:
    config = _file(tmp_path, "lease_tll = 5\ngracee = 3\nzzz = 1\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(config)
    message = caught.value.message
    assert message.startswith(
        f"config file {config}: unknown key(s) gracee (did you mean grace?), "
        "lease_tll (did you mean lease_ttl?), zzz; known keys: "
    )
    assert "zzz (did you mean" not in message


def test_cli_reports_a_wrong_key_and_a_wrong_value_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    env = {"TQ_CONFIG": str(config), "HOME": str(tmp_path), "PATH": ""}
    for text, expected in (
        ("concurency = 4\n", "unknown key(s) concurency (did you mean concurrency?)"),
        ("concurrency = 2.5\n", "concurrency = 2.5: not a whole number"),
    ):
        config.write_text(text)
        out = subprocess.run(
            tq_command("worker", "--insecure"),
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert out.returncode == 2, out.stderr
        assert f"config file {config}: {expected}" in " ".join(out.stderr.split())
        assert "Traceback" not in out.stderr
