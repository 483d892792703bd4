"""packaging/compose.yaml: a cluster that `docker compose up` can run, kept honest
without a Docker daemon.

Every tq command the file runs (service commands, shell scripts, health checks,
and the commands its header comment tells people to type) is parsed by the real
CLI (click's parser: unknown commands, unknown options, missing arguments fail)
and each option it uses is listed by that command's --help. The images, volumes,
ports and addresses must agree: one tq image for every tq service, each broker
its own data volume and all of them one TLS volume, the workers' --broker lists
exactly the brokers' listen addresses, the store URL names the PostgreSQL
service, Prometheus scrapes exactly the brokers' HTTP ports with files the
`keys` service writes, every TQ_* variable is a setting tq reads. The bootstrap
the file performs (one CA for every broker, keys made through the first broker,
health checks with `tq doctor`) is rehearsed with real brokers on a real
PostgreSQL, and the commands the cluster chapter of docs/OPERATIONS.md quotes
must exist too.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import typer.main
import yaml
from cryptography import x509
from typer.testing import CliRunner

from tq.cli.doctor import run_checks
from tq.cli.main import app
from tq.client import Client
from tq.config import Settings, env_name
from tq.testing import running_broker, running_worker

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
COMPOSE = PACKAGING / "compose.yaml"
PROMETHEUS = PACKAGING / "compose-prometheus.yml"
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")", "$(", "`"}
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: Any) -> Any:
    """What compose passes on: ``$$`` is ``$``, ``${VAR:-default}`` its default."""
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group(1) or match.group(3)
            default = match.group(2)
            assert default is not None, f"${name} has no default: the file must run as it is"
            return default

        return INTERPOLATION.sub(one, value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return {k: interpolate(v) for k, v in doc.items() if not k.startswith("x-")}


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def tq_image(services: dict[str, dict[str, Any]]) -> str:
    return str(services["broker1"]["image"])


def is_tq(service: dict[str, Any], image: str) -> bool:
    return service.get("image") == image


def brokers(services: dict[str, dict[str, Any]]) -> list[str]:
    image = tq_image(services)
    return [
        name
        for name, svc in services.items()
        if is_tq(svc, image) and svc.get("command", [None])[0] == "broker"
    ]


# -- the tq commands the file runs -------------------------------------------------------


@dataclasses.dataclass
class Invocation:
    where: str
    argv: list[str]  # after "tq"


def shell_commands(script: str, where: str) -> Iterator[Invocation]:
    """Each `tq ...` in a POSIX shell script, up to the next operator or line end."""
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            before = i
            while before > 0 and ASSIGNMENT.match(tokens[before - 1]):  # VAR=value tq ...
                before -= 1
            starts_command = before == 0 or tokens[before - 1] in SHELL_OPERATORS | {"exec"}
            after_exec = i >= 2 and tokens[i - 2] == "exec"  # docker compose exec SERVICE tq
            if token == "tq" and (starts_command or after_exec):
                argv: list[str] = []
                for arg in tokens[i + 1 :]:
                    if arg in SHELL_OPERATORS:
                        break
                    argv.append(arg)
                yield Invocation(where, argv)


def invocations(services: dict[str, dict[str, Any]]) -> list[Invocation]:
    image = tq_image(services)
    found: list[Invocation] = []
    for name, svc in services.items():
        if not is_tq(svc, image):
            continue
        command = svc.get("command", [])
        entrypoint = svc.get("entrypoint")
        if entrypoint is None:  # the image's ENTRYPOINT ["tq"]
            found.append(Invocation(name, list(command)))
        else:
            assert entrypoint[:2] == ["/bin/sh", "-ec"], f"{name}: entrypoint {entrypoint}"
            (script,) = command
            found += list(shell_commands(script, name))
        test = (svc.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD":
            assert test[1] == "tq", f"{name}: health check {test}"
            found.append(Invocation(f"{name} healthcheck", test[2:]))
        elif test and test[0] == "CMD-SHELL":
            found += list(shell_commands(test[1], f"{name} healthcheck"))
    return found


def header_invocations() -> list[Invocation]:
    comments = [
        line.lstrip("#").strip()
        for line in COMPOSE.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    ]
    return [
        inv
        for line in comments
        if line.startswith(("tq ", "docker compose"))
        for inv in shell_commands(line.split("  #")[0], "header comment")
    ]


def resolve(argv: list[str]) -> tuple[list[str], Any, list[str]]:
    """The command path (["keys", "create"]), its (click) command, and its arguments."""
    command: Any = typer.main.get_command(app)
    path: list[str] = []
    rest = list(argv)
    while hasattr(command, "commands"):  # a group (typer's own copy of click)
        assert rest, f"`tq {' '.join(path)}` needs a sub-command"
        sub = command.commands.get(rest[0])
        assert sub is not None, f"`tq {' '.join(path + rest[:1])}` is not a tq command"
        path.append(rest.pop(0))
        command = sub
    return path, command, rest


def options_used(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("-") and arg != "-"}


def test_the_file_runs_the_tq_commands_a_cluster_needs(services: dict[str, Any]) -> None:
    runs = invocations(services)
    paths = {" ".join(resolve(inv.argv)[0]) for inv in runs}
    assert {"broker", "worker", "keys create", "doctor"} <= paths, paths
    assert len(brokers(services)) == 3
    workers = [inv for inv in runs if inv.argv[:1] == ["worker"]]
    assert len(workers) == 2


@pytest.mark.parametrize("source", ["services", "header"])
def test_every_tq_command_and_option_exists(source: str, services: dict[str, Any]) -> None:
    runs = invocations(services) if source == "services" else header_invocations()
    assert runs
    runner = CliRunner()
    for inv in runs:
        path, command, args = resolve(inv.argv)
        label = f"{inv.where}: tq {' '.join(inv.argv)}"
        try:  # the real parser: unknown options, missing values and arguments fail
            command.make_context(" ".join(["tq", *path]), list(args), resilient_parsing=False)
        except Exception as exc:  # a UsageError of typer's click
            pytest.fail(f"{label}: {type(exc).__name__}: {exc}")
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}, color=False)
        assert shown.exit_code == 0, f"{label}: --help failed: {shown.output}"
        for option in options_used(args):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", shown.output), (
                f"{label}: {option} is not in `tq {' '.join(path)} --help`"
            )


def test_every_tq_variable_is_a_setting(services: dict[str, Any]) -> None:
    known = {"TQ_CONFIG"}
    for f in dataclasses.fields(Settings):
        known |= {f"TQ_{f.name.upper()}", env_name(f.name)}
    image = tq_image(services)
    text = COMPOSE.read_text(encoding="utf-8")
    used = set(re.findall(r"\bTQ_[A-Z_]+\b", text)) - {"TQ_PG_PASSWORD"}  # compose's own
    assert used and used <= known, used - known
    for name, svc in services.items():
        if is_tq(svc, image):
            env = svc.get("environment") or {}
            assert set(env) - {"PGPASSWORD"} <= known, (name, env)


# -- images, volumes, ports, addresses ----------------------------------------------------


def test_one_tq_image_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    image = tq_image(services)
    tq_services = [svc for svc in services.values() if svc.get("image") == image]
    assert len(tq_services) == 6  # 3 brokers, 2 workers and the one-shot keys service
    for svc in tq_services:
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            PACKAGING / "Dockerfile"
        )
    dockerfile = (PACKAGING / "Dockerfile").read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["tq"]' in dockerfile  # services without an entrypoint run `tq ...`
    for path in ("/var/lib/tq/tls", "/var/lib/tq-keys"):  # volumes there start owned by tq
        assert re.search(rf"install -d [^\n]*-o tq -g tq [^\n]*{re.escape(path)}\b", dockerfile)
    assert "--gid 10001" in dockerfile and "--uid 10001" in dockerfile
    for name, svc in services.items():
        if svc.get("image") != image:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name


def mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only)."""
    found = {}
    for spec in svc.get("volumes", []):
        parts = spec.split(":")
        source, target = parts[0], parts[1]
        found[target] = (source, len(parts) > 2 and parts[2] == "ro")
    return found


def test_volumes_are_declared_used_and_shared_as_the_brokers_need(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    declared = set(compose["volumes"])
    named: set[str] = set()
    for name, svc in services.items():
        for source, _ in mounts(svc).values():
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                named.add(source)
    assert named == declared, f"declared but unused: {declared - named}"

    names = brokers(services)
    data = [mounts(services[b])["/var/lib/tq"] for b in names]
    assert len({source for source, _ in data}) == len(names), "one data directory per broker"
    assert not any(ro for _, ro in data)
    tls = {mounts(services[b])["/var/lib/tq/tls"] for b in names}
    assert len(tls) == 1 and not next(iter(tls))[1], "one CA, written by the first broker"
    keys = mounts(services["keys"])
    assert keys["/var/lib/tq"] == (mounts(services[names[0]])["/var/lib/tq"][0], True)
    assert keys["/var/lib/tq-keys"][1] is False
    for name in ("worker1", "worker2", "prometheus"):
        assert mounts(services[name])["/var/lib/tq-keys"] == (keys["/var/lib/tq-keys"][0], True)


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_ports_and_addresses_agree(services: dict[str, Any]) -> None:
    names = brokers(services)
    published: list[str] = []
    wire: dict[str, int] = {}
    http: dict[str, int] = {}
    for b in names:
        argv = services[b]["command"]
        (listen,) = option(argv, "--listen")
        (web,) = option(argv, "--http")
        wire[b], http[b] = port_of(listen), port_of(web)
        assert listen.startswith("0.0.0.0:") and web.startswith("0.0.0.0:")
        assert services[b]["hostname"] == b
        assert set(option(argv, "--tls-san")) >= set(names), "one certificate for every broker"
        inside = {int(p.split(":")[-1]) for p in services[b]["ports"]}
        assert inside == {wire[b], http[b]}, b
    for svc in services.values():
        for spec in svc.get("ports", []):
            assert spec.startswith("127.0.0.1:"), spec  # a demonstration: loopback only
            published.append(spec.split(":")[1])
    assert len(published) == len(set(published)), "a host port published twice"

    expected = {f"{b}:{wire[b]}" for b in names}
    runs = invocations(services)
    workers = [inv for inv in runs if inv.argv[:1] == ["worker"]]
    for inv in workers:
        (addresses,) = option(inv.argv, "--broker")
        listed = addresses.split(",")
        assert set(listed) == expected and len(listed) == len(expected), inv
        assert option(inv.argv, "--ca") == ["/var/lib/tq-keys/ca.pem"]
    names_seen = [option(inv.argv, "--name") for inv in workers]
    assert len({tuple(n) for n in names_seen}) == len(workers), "workers need their own names"
    for inv in runs:
        if inv.argv[:2] == ["keys", "create"]:
            (address,) = option(inv.argv, "--broker")
            assert address in expected
    header = COMPOSE.read_text(encoding="utf-8")
    (line,) = [x for x in header.splitlines() if "TQ_BROKER=" in x]
    host_ports = {p.split(":")[1] for b in names for p in services[b]["ports"]}
    listed = line.split("TQ_BROKER=")[1].split()[0].split(",")
    assert {a.split(":")[1] for a in listed} <= host_ports
    assert len(listed) == len(names)


def test_the_brokers_share_the_postgres_service(services: dict[str, Any]) -> None:
    pg = services["postgres"]
    env = pg["environment"]
    names = brokers(services)
    for b in names:
        broker_env = services[b]["environment"]
        url = urlsplit(broker_env["TQ_STORE"])
        assert url.scheme == "postgresql" and url.hostname == "postgres"
        assert url.password is None, "the password goes in PGPASSWORD, not the URL"
        assert url.username == env["POSTGRES_USER"] and url.path == f"/{env['POSTGRES_DB']}"
        assert broker_env["PGPASSWORD"] == env["POSTGRES_PASSWORD"]
        assert services[b]["depends_on"]["postgres"]["condition"] == "service_healthy"
    settings = dict(
        arg.split("=", 1) for arg in pg["command"] if "=" in arg and not arg.startswith("-")
    )
    assert settings["synchronous_commit"] == "on" and settings["fsync"] == "on"
    assert int(settings["max_connections"]) >= 3 * 4 + 10  # brokers' connections and tools


def test_start_order_and_dependencies(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for needed, how in (svc.get("depends_on") or {}).items():
            assert needed in services, f"{name} depends on unknown {needed}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{needed} has no health check"
    first, *others = brokers(services)
    assert "keys" not in services[first].get("depends_on", {})
    for b in others:  # the CA exists before a second broker starts
        assert services[b]["depends_on"][first]["condition"] == "service_healthy"
    assert services["keys"]["depends_on"][first]["condition"] == "service_healthy"
    assert services["keys"]["restart"] == "no"
    for name in ("worker1", "worker2", "prometheus"):
        done = services[name]["depends_on"]["keys"]["condition"]
        assert done == "service_completed_successfully"


# -- Prometheus ------------------------------------------------------------------------


def test_prometheus_scrapes_every_broker_with_the_keys_services_files(
    services: dict[str, Any],
) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    names = brokers(services)
    http = {b: port_of(option(services[b]["command"], "--http")[0]) for b in names}
    assert targets == {f"{b}:{http[b]}" for b in names}
    assert job["scheme"] == "https"
    prom = services["prometheus"]
    assert mounts(prom)["/etc/prometheus/prometheus.yml"][0] == f"./{PROMETHEUS.name}"
    keys_dir = "/var/lib/tq-keys"
    (script,) = services["keys"]["command"]
    for path in (job["tls_config"]["ca_file"], job["authorization"]["credentials_file"]):
        assert path.startswith(keys_dir + "/") and Path(path).name in script
    assert "umask 027" in script and "10001" in prom["group_add"]  # 0640, group tq
    assert "rule_files" not in config  # per-instance rules misjudge a cluster (see the file)


def test_promtool_accepts_the_scrape_config() -> None:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    out = subprocess.run(
        [found, "check", "config", "--syntax-only", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr


# -- the cluster chapter of docs/OPERATIONS.md ----------------------------------------------


def chapter_commands() -> list[Invocation]:
    """The `tq ...` commands the cluster chapter quotes (inline code and code blocks)."""
    text = (PACKAGING.parent / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    start = text.index("## Cluster: several brokers on one PostgreSQL")
    chapter = text[start : text.index("\n## ", start + 1)]
    quoted = re.findall(r"`([^`]+)`", chapter.replace("```", "\n"))
    found = []
    for code in quoted:
        code = " ".join(code.split())  # inline code may wrap
        if code.startswith("tq ") and "..." not in code:
            found += list(shell_commands(code, "OPERATIONS.md"))
    return found


def test_the_cluster_chapter_quotes_only_commands_and_options_that_exist() -> None:
    runs = chapter_commands()
    assert {" ".join(resolve(inv.argv)[0]) for inv in runs} >= {"migrate", "doctor"}
    runner = CliRunner()
    for inv in runs:
        path, _, args = resolve(inv.argv)
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}, color=False)
        assert shown.exit_code == 0, inv
        for option in options_used(args):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", shown.output), (
                f"OPERATIONS.md: tq {' '.join(inv.argv)}: {option} is not in --help"
            )


# -- the bootstrap the file performs, rehearsed on loopback ---------------------------------


@pytest.mark.trio
async def test_the_bootstrap_works_with_real_brokers_on_one_database(
    pg_url: str, tmp_path: Path
) -> None:
    """What compose.yaml does, without Docker: the first broker makes the CA (naming
    every broker) and the admin key; `tq keys create` through it makes the worker and
    reader keys; a second broker on the same database and the same TLS directory
    (tq-tls) re-issues nothing, has no admin key, passes its health check (`tq doctor`
    with the reader key), and serves a worker holding the worker key."""
    names = tuple(brokers(yaml_services()))
    sans = tuple(option(yaml_services()[names[0]]["command"], "--tls-san"))
    first, second = tmp_path / "broker1", tmp_path / "broker2"
    async with running_broker(first, store=pg_url, tls_san=sans) as b1:
        tls = first / "tls"
        cert = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
        named = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert set(names) <= set(named.value.get_values_for_type(x509.DNSName))
        issued = {p.name: p.read_bytes() for p in tls.iterdir()}

        def create(role: str, name: str) -> str:  # the keys service: tq keys create > FILE
            conn = ["--broker", b1.settings.broker, "--ca", str(tls / "ca.pem")]
            args = ["keys", "create", *conn, "--role", role, "--name", name]
            made = CliRunner().invoke(app, args, env={"TQ_KEY": str(b1.key)})
            assert made.exit_code == 0, made.output
            return made.stdout.strip()

        worker_key = await trio.to_thread.run_sync(create, "worker", "compose-workers")
        reader_key = await trio.to_thread.run_sync(create, "reader", "prometheus")

        second.mkdir(mode=0o700)
        (second / "tls").symlink_to(tls)  # one tq-tls volume for every broker
        async with running_broker(second, store=pg_url, tls_san=sans) as b2:
            assert {p.name: p.read_bytes() for p in tls.iterdir()} == issued
            assert not b2.info.admin_key_created and not (second / "admin.key").exists()
            flags = {"data": second, "store": pg_url, "broker": b2.settings.broker}
            checks = await trio.to_thread.run_sync(lambda: run_checks({**flags, "key": reader_key}))
            failed = {c.name for c in checks if c.status == "fail"}
            assert failed <= {"pg settings"}, checks  # the test cluster runs fsync = off
            assert next(c for c in checks if c.name == "broker").status == "ok"

            async with b1.client() as producer:  # submitted through the first broker
                task_id = await producer.submit("echo", {"via": "broker1"})
            # run by a worker of the second, and waited for there (a wait on one broker
            # hears of a task another broker finishes only when it starts, for now)
            reader = dataclasses.replace(b2.settings, key=reader_key, ca=tls / "ca.pem")
            async with Client.from_settings(reader) as watcher:
                async with running_worker(b2, key=worker_key, ca=tls / "ca.pem"):
                    done = await watcher.wait(task_id, timeout=30)
    assert done.state == "succeeded" and done.result == {"via": "broker1"}


def yaml_services() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services: dict[str, dict[str, Any]] = interpolate(doc["services"])
    return services
