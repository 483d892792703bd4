"""Security options and start-up lines of `tq broker`, `tq up` and `tq worker`.

Used by tq/cli/services.py; the security commands themselves are in
tq/cli/security.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from tq.broker.server import BrokerInfo

NoAuthOpt = Annotated[
    bool,
    typer.Option(
        "--no-auth",
        help="Accept clients without API keys (local experiments only) (env TQ_AUTH=false).",
    ),
]
RequireCertOpt = Annotated[
    bool | None,
    typer.Option(
        "--require-client-cert",
        help="Mutual TLS: refuse clients without a certificate from this broker's CA "
        "(`tq ca issue NAME`), on the wire and HTTPS ports alike (env TQ_REQUIRE_CLIENT_CERT).",
        show_default=False,
    ),
]
SubmitRateOpt = Annotated[
    float | None,
    typer.Option(
        "--submit-rate",
        help="Tasks per second each non-admin key may submit (token bucket; 0: no limit) "
        "(default 5000; burst: TQ_SUBMIT_BURST, default 10000).",
        show_default=False,
    ),
]
MaxConnectionsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-connections",
        help="Connections served at once (default 1024); the open-file limit must exceed it "
        "by 128 (the broker raises its soft limit, or warns).",
        show_default=False,
    ),
]
JoinOpt = Annotated[
    str | None,
    typer.Option(
        "--join",
        "-j",
        help="Join token printed by `tq broker` or `tq token create`: broker address, CA and "
        "key in one (env TQ_JOIN).",
        show_default=False,
    ),
]
ClientCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--client-cert",
        help="Certificate for mutual TLS (`tq ca issue`) (env TQ_CLIENT_CERT).",
        show_default=False,
    ),
]
ClientKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--client-key",
        help="Private key of --client-cert (env TQ_CLIENT_KEY).",
        show_default=False,
    ),
]


def broker_flags(
    no_auth: bool,
    require_client_cert: bool | None,
    submit_rate: float | None,
    max_connections: int | None,
) -> dict[str, Any]:
    return {
        "auth": False if no_auth else None,
        "require_client_cert": require_client_cert,
        "submit_rate": submit_rate,
        "max_connections": max_connections,
    }


def client_flags(
    key: str | None, join: str | None, client_cert: Path | None, client_key: Path | None
) -> dict[str, Any]:
    return {"key": key, "join": join, "client_cert": client_cert, "client_key": client_key}


def local_worker_key(info: BrokerInfo) -> str | None:
    """The key `tq up`'s own worker uses: the join token's worker key (least privilege)."""
    if info.join_token is None:
        return None
    from tq.security.tokens import decode_join_token

    return decode_join_token(info.join_token).key


def announce(info: BrokerInfo) -> None:
    """The security lines `tq broker` / `tq up` print at start (stderr)."""
    err = sys.stderr
    if not info.auth:
        print(
            "  WARNING: authentication is off (--no-auth): anyone who can connect may submit, "
            "read and cancel tasks",
            file=err,
        )
        return
    made = "created in" if info.admin_key_created else "in"
    print(f"  auth: API keys required; admin key {made} {info.admin_key_file} (0600),", file=err)
    print("        used by the tq CLI on this machine; more keys: tq keys create", file=err)
    if info.client_cert_required:
        print("  mutual TLS: clients need a certificate: tq ca issue NAME", file=err)
    if info.join_token:
        print("  join token (a secret: it holds a worker key):", file=err)
        print(f"    tq worker --join {info.join_token}", file=err)
