"""Security commands: `tq keys`, `tq ca`, `tq token`, `tq audit`.

Key management talks to the broker with an admin key (`keys` and `audit`
requests, docs/PROTOCOL.md), so it works from any machine. With
`--data DIR` it works on the store directly instead (bootstrapping, or a
lost admin key): a running broker sees such changes within a few seconds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from tq.cli import exits
from tq.cli.common import (
    BrokerOpt,
    CaOpt,
    InsecureOpt,
    JsonOpt,
    KeyOpt,
    Output,
    OutputOpt,
    cell,
    emit,
    emit_text,
    fail,
    fmt_time,
    kv_table,
    output_mode,
    role_settings,
    run_guarded,
    settings,
    text_mode,
)


def _store_settings(**flags: Any) -> Any:
    """A command that opens the store itself reads what a broker reads (data, store)."""
    from tq.config import BrokerSettings

    return role_settings(BrokerSettings, **flags)


if TYPE_CHECKING:
    from tq.broker.auth import Auth

T = TypeVar("T")
keys_app = typer.Typer(help="API keys: create, list, revoke (admin).", no_args_is_help=True)
ca_app = typer.Typer(help="The broker's CA: client certificates for mutual TLS.")
token_app = typer.Typer(help="Join tokens: broker address, CA and a key in one string.")

OfflineOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        "-d",
        help="Work on the broker's store directly instead of over the network (on the "
        "broker's machine; no key needed): DATA/tq.db, or the store TQ_STORE or the config "
        "file names.",
        show_default=False,
    ),
]
RoleOpt = Annotated[
    str, typer.Option("--role", "-r", help="admin, producer, worker or reader.", show_default=False)
]
NameOpt = Annotated[str, typer.Option("--name", "-n", help="A label for operators.")]
QueuesOpt = Annotated[
    str | None,
    typer.Option(
        "--queues",
        "-q",
        help="Limit the key to these queues (comma-separated) (default: all).",
        show_default=False,
    ),
]
ExpiresOpt = Annotated[
    str | None,
    typer.Option(
        "--expires",
        help="When the key stops working: a duration (90d, 12h, 30m, 45s) or a date "
        "(2027-01-31 or 2027-01-31T12:00) (default: never).",
        show_default=False,
    ),
]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str | None, now: float) -> float | None:
    """Epoch seconds for --expires; exits with a usage error if unreadable."""
    if text is None:
        return None
    match = _DURATION.match(text.strip().lower())
    if match:
        return now + float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        fail(f"--expires {text!r}: use a duration like 90d or 12h, or a date 2027-01-31", 2)


def _call(conn: dict[str, Any], data: Path | None, msg: dict[str, Any]) -> dict[str, Any]:
    """One admin request: over the wire, or on the store in ``data`` (offline)."""
    if data is None:
        from tq.client import BlockingClient

        with BlockingClient.from_settings(settings(**conn)) as client:
            return client.request(msg)
    import msgspec

    from tq.protocol.parse import typed

    answer: msgspec.Struct
    if msg["t"] == "audit":
        from tq.protocol.schema import Audit

        page = typed(Audit, {**msg, "id": 0}, "audit")
        answer = _offline(data, lambda auth: auth.audit_page(page))
    else:
        from tq.protocol.schema import Keys
        from tq.security.roles import Principal

        local = Principal("local", "local CLI", "admin", None)  # audited as "local"
        keys = typed(Keys, {**msg, "id": 0})  # the wire's declaration, offline too
        answer = _offline(data, lambda auth: auth.request(local, keys))
    # the declared answer as the map the wire's answer decodes to (bytes stay bytes)
    reply: dict[str, Any] = msgspec.to_builtins(answer, builtin_types=(bytes,))
    return reply


def _offline(data: Path, fn: Callable[[Auth], Awaitable[T]]) -> T:
    """``fn(auth)`` on the broker's store, as the broker would run it: the store its
    settings name (``store``: TQ_STORE or the config file), else DATA/tq.db."""
    import trio

    from tq.broker.auth import Auth
    from tq.store import open_store, parse_store_url
    from tq.store.inspect import inspect_store

    url = _store_settings(data=data).store_url
    where = parse_store_url(url)
    if not inspect_store(url).exists:
        if where.backend == "sqlite":
            fail(
                f"no broker store at {where.target}: pass the broker's --data directory",
                exits.USAGE,
            )
        fail(
            f"no tq store in {where.shown} yet: start a broker on it first (it creates the "
            "tables), or point TQ_STORE at the broker's store",
            exits.USAGE,
        )

    async def main() -> T:
        async with open_store(url) as store:
            auth = Auth(store)
            await auth.load()
            return await fn(auth)

    return trio.run(main)


def _has_store(url: str) -> bool:
    """Whether the broker's store exists yet (False, not an error, when it cannot be read)."""
    from tq.core.errors import TQError
    from tq.store.inspect import inspect_store

    try:
        return inspect_store(url).exists
    except TQError:
        return False


def _conn(broker: str | None, ca: Path | None, insecure: bool | None, key: str | None) -> Any:
    return {"broker": broker, "ca": ca, "insecure": insecure, "key": key}


async def _recorded(auth: Auth, action: str, target: str, path: str) -> dict[str, Any]:
    await auth.record("local", action, target, {"file": path})
    return {}


def _create(conn: dict[str, Any], data: Path | None, **fields: Any) -> dict[str, Any]:
    msg = {"t": "keys", "op": "create", **{k: v for k, v in fields.items() if v is not None}}
    return _call(conn, data, msg)


def _queues_of(queues: str | None) -> list[str] | None:
    """--queues as a list; None (every queue) only when it was left out: an empty
    value (an unset shell variable) is a usage error, not a key of every queue."""
    from tq.core.auth import parse_queues
    from tq.core.errors import InvalidRequest

    try:
        parsed = parse_queues(queues)
    except InvalidRequest:
        fail(
            f"--queues {queues!r} names no queue: name one or more (a,b), or leave "
            "--queues out for a key of every queue",
            exits.USAGE,
        )
    return None if parsed is None else list(parsed)


@keys_app.command("create")
def keys_create(
    role: RoleOpt,
    name: NameOpt = "",
    queues: QueuesOpt = None,
    expires: ExpiresOpt = None,
    data: OfflineOpt = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Create a key and print it. It is shown this once: only a hash is stored."""
    queue_list = _queues_of(queues)
    expires_at = parse_expiry(expires, time.time())

    def body() -> None:
        conn = _conn(broker, ca, insecure, api_key)
        reply = _create(conn, data, role=role, name=name, queues=queue_list, expires_at=expires_at)
        mode = text_mode(output, as_json)
        if mode is not Output.table:
            emit_text({"key": reply["key"], **reply["info"]}, mode, None)
            return
        typer.echo(reply["key"])
        info = reply["info"]
        typer.echo(
            f"created {info['role']} key {info['id']} ({info['name']}); it is shown only "
            "now: store it (e.g. TQ_KEY) before you close this terminal",
            err=True,
        )

    run_guarded(body)


def _keys_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table()
    for column in ("id", "name", "role", "queues", "state", "created", "expires"):
        table.add_column(column)
    for k in rows:
        queues = "all" if k["queues"] is None else ",".join(k["queues"])
        table.add_row(
            cell(k["id"]),
            cell(k["name"]),
            cell(k["role"]),
            cell(queues),
            cell(k["state"]),
            fmt_time(k["created_at"]),
            fmt_time(k["expires_at"]) or "never",
        )
    return table


@keys_app.command("list")
def keys_list(
    data: OfflineOpt = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """List keys (never their secrets): id, role, queues, state, expiry."""

    def body() -> None:
        reply = _call(_conn(broker, ca, insecure, api_key), data, {"t": "keys", "op": "list"})
        emit(reply["keys"], output_mode(output, as_json), _keys_table)

    run_guarded(body)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (tq keys list), or the key.")],
    data: OfflineOpt = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Revoke a key: refused on its next request, without a broker restart."""
    if key_id.startswith("tq_"):
        key_id = key_id.split("_")[1]  # accept the whole key; only its public id is sent

    def body() -> None:
        msg = {"t": "keys", "op": "revoke", "key_id": key_id}
        info = _call(_conn(broker, ca, insecure, api_key), data, msg)["info"]
        text = f"{info['id']} revoked ({info['name']}, {info['role']})"
        emit_text(info, text_mode(output, as_json), text)

    run_guarded(body)


@ca_app.command("issue")
def ca_issue(
    name: Annotated[str, typer.Argument(help="The client's name (certificate CN).")],
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="The broker's data directory.", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Directory for NAME.pem and NAME.key (default: <data>/clients).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Issue a client certificate from the broker's CA (for --require-client-cert).

    Run it on the broker's machine; hand NAME.pem and NAME.key (both 0600)
    to the client, which passes them as --client-cert and --client-key.
    """

    def body() -> None:
        from tq.security.tls import TLSFiles, issue_client_cert

        conf = _store_settings(data=data)
        files = TLSFiles.in_dir(conf.tls_dir)
        if not files.ca_key.exists():
            fail(f"no CA in {conf.tls_dir}: pass the broker's --data directory", exits.USAGE)
        cert, key = issue_client_cert(files, name, out or conf.data / "clients")
        if _has_store(conf.store_url):
            _offline(conf.data, lambda auth: _recorded(auth, "cert.issue", name, str(cert)))
        typer.echo(f"certificate: {cert}\nkey:         {key}")
        typer.echo(f"client flags: --client-cert {cert} --client-key {key}", err=True)

    run_guarded(body)


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", "-r", help="The key's role.")] = "worker",
    name: NameOpt = "join token",
    queues: QueuesOpt = None,
    expires: ExpiresOpt = None,
    address: Annotated[
        list[str] | None,
        typer.Option(
            "--address",
            "-a",
            help="Broker address(es) for the token: repeat it or separate with commas "
            "to list every broker of a cluster, tried in turn (default: --broker).",
            show_default=False,
        ),
    ] = None,
    data: OfflineOpt = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Create a key and print a join token: `tq worker --join TOKEN` needs nothing else.

    The token holds the broker address(es), the broker's CA certificate and
    the new key: treat it as a secret; revoke it with `tq keys revoke ID`.
    For a cluster, list every broker (`-a b1:7470,b2:7470`): workers and
    clients with the token fail over between them.
    """

    def body() -> None:
        from tq.client.failover import parse_brokers
        from tq.security.tokens import encode_join_token

        for entry in address or ():
            parse_brokers(entry)  # a bad address fails before a key is made
        conn = _conn(broker, ca, insecure, api_key)
        conf = settings(**conn, data=data)  # offline: the CA in DATA/tls
        ca_file = conf.ca_file()
        if ca_file is None:
            fail("a join token needs the broker's CA: pass --ca with its ca.pem", exits.USAGE)
        queue_list = _queues_of(queues)
        reply = _create(
            conn,
            data,
            role=role,
            name=name,
            queues=queue_list,
            expires_at=parse_expiry(expires, time.time()),
        )
        addresses = address or [conf.broker]  # each may list brokers: host1:7470,host2:7470
        typer.echo(encode_join_token(addresses, ca_file.read_bytes(), reply["key"]))
        typer.echo(f"token holds {role} key {reply['info']['id']}", err=True)

    run_guarded(body)


@token_app.command("inspect")
def token_inspect(
    token: Annotated[str, typer.Argument(help="A join token (tqj1_...).")],
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Show what a join token holds (addresses, CA fingerprint, key id; not the secret)."""

    def body() -> None:
        from tq.security.tokens import decode_join_token

        decoded = decode_join_token(token)
        info = {
            "addresses": list(decoded.addresses),
            "ca_fingerprint": decoded.ca_fingerprint,
            "key_id": decoded.key_id,
        }
        emit(
            info,
            text_mode(output, as_json),
            lambda d: kv_table(
                (k, ", ".join(v) if isinstance(v, list) else v) for k, v in d.items()
            ),
        )

    run_guarded(body)


def _audit_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from tq.cli.common import compact

    table = Table()
    for column in ("seq", "time", "actor", "action", "target", "detail"):
        table.add_column(column)
    for e in rows:
        table.add_row(
            str(e["seq"]),
            fmt_time(e["at"]),
            cell(e["actor"]),
            cell(e["action"]),
            cell(e["target"]),
            cell(compact(e["detail"], 40) if e["detail"] else ""),
        )
    return table


def audit(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 100,
    before: Annotated[
        int | None,
        typer.Option("--before", help="Cursor: entries older than this seq.", show_default=False),
    ] = None,
    data: OfflineOpt = None,
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """The audit log, newest first: key changes, cancels, retries, admin actions (admin)."""

    def body() -> None:
        msg: dict[str, Any] = {"t": "audit", "limit": limit}
        if before is not None:
            msg["before"] = before
        reply = _call(_conn(broker, ca, insecure, api_key), data, msg)
        mode = output_mode(output, as_json)
        emit(reply["entries"], mode, _audit_table)
        if reply.get("next") is not None and mode.value == "table":
            typer.echo(f"more: tq audit --before {reply['next']}", err=True)

    run_guarded(body)


def register(app: typer.Typer) -> None:
    """Add the security commands to the `tq` app."""
    app.add_typer(keys_app, name="keys", rich_help_panel="Security")
    app.add_typer(ca_app, name="ca", rich_help_panel="Security")
    app.add_typer(token_app, name="token", rich_help_panel="Security")
    app.command(rich_help_panel="Security")(audit)
