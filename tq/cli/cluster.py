"""`tq cluster-status` with several brokers (``--broker b1,b2,...``, a join token): ask
each one, in parallel, and show every broker on one screen.

Each listed address gets its own connection (no failover: the point is to see each
one) and answers ``query health``; what it says is shown as it says it: its ``role``
(``leader`` or ``follower``) when the broker reports one, its version, uptime and
health. ``last_seen`` is when it last answered: now for a broker that answered; for
one that did not, the time another broker's answer says it last heard from it (the
``brokers`` list a broker on a shared store reports), else nothing.

Output (``--output json``): ``{"healthy", "reachable", "brokers": [...]}``, one entry
per address in the order given. Exit 0 when every broker answered and is healthy,
1 when some did not answer or are unhealthy, 4 when none answered.
With one address the command shows that broker's own answer, as always.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tq.cli import exits
from tq.cli.common import Output, emit, fail, fmt_time

if TYPE_CHECKING:
    from tq.config import Settings

ASK_TIMEOUT = 5.0  # seconds per broker to connect and answer


def addresses(conf: Settings) -> list[str]:
    from tq.client.options import settings_options, split_addresses

    return split_addresses(settings_options(conf)["address"])


def ask(conf: Settings, address: str) -> dict[str, Any]:
    """One broker's entry: what it answered, or why it did not."""
    from tq.client import BlockingClient
    from tq.client.options import settings_options
    from tq.core.errors import TQError

    entry: dict[str, Any] = {
        "address": address,
        "reachable": False,
        "healthy": False,
        "role": None,
        "version": None,
        "broker": None,
        "uptime": None,
        "last_seen": None,
        "latency": None,
        "error": None,
        "status": None,
    }
    options = {**settings_options(conf), "address": address, "failover": 0}
    started = time.monotonic()
    try:
        with BlockingClient(**options, timeout=ASK_TIMEOUT) as client:
            status = client.cluster_status()
    except TQError as exc:
        entry["error"] = exc.message or str(exc)
        return entry
    entry.update(
        reachable=True,
        healthy=bool(status.get("healthy")),
        role=status.get("role"),
        version=status.get("version"),
        broker=status.get("broker"),
        uptime=status.get("uptime"),
        last_seen=time.time(),
        latency=time.monotonic() - started,
        status=status,
    )
    return entry


def _fill_from_peers(entries: list[dict[str, Any]]) -> None:
    """What the brokers that answered know of those that did not (a shared store's
    ``brokers`` list): their last sign of life, role and version, marked as heard."""
    heard: dict[str, dict[str, Any]] = {}
    for entry in entries:
        for peer in (entry["status"] or {}).get("brokers") or ():
            if isinstance(peer, dict) and isinstance(peer.get("address"), str):
                known = heard.get(peer["address"])
                if known is None or (peer.get("last_seen") or 0) > (known.get("last_seen") or 0):
                    heard[peer["address"]] = {**peer, "reported_by": entry["address"]}
    for entry in entries:
        peer = heard.get(entry["address"])
        if entry["reachable"] or peer is None:
            continue
        entry["last_seen"] = peer.get("last_seen")
        entry["version"] = peer.get("version")
        entry["broker"] = peer.get("id")
        entry["reported_by"] = peer["reported_by"]


def gather(conf: Settings, listed: list[str]) -> dict[str, Any]:
    with ThreadPoolExecutor(max_workers=min(16, len(listed))) as pool:
        entries = list(pool.map(lambda a: ask(conf, a), listed))
    _fill_from_peers(entries)
    reachable = sum(e["reachable"] for e in entries)
    return {
        "healthy": all(e["healthy"] for e in entries),
        "reachable": reachable,
        "brokers": entries,
    }


def _rows(data: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{data['reachable']} of {len(data['brokers'])} brokers answered")
    for column in ("broker", "status", "role", "version", "uptime", "last seen"):
        table.add_column(column, no_wrap=column != "last seen")
    table.add_column("detail", overflow="fold")
    for e in data["brokers"]:
        if not e["reachable"]:
            status = Text("UNREACHABLE", "bold red")
        elif e["healthy"]:
            status = Text("healthy", "green")
        else:
            status = Text("UNHEALTHY", "bold red")
        uptime = "-" if e["uptime"] is None else f"{e['uptime']:.0f} s"
        seen = fmt_time(e["last_seen"]) if e["last_seen"] else "never"
        if e.get("reported_by"):
            seen += f" (said {e['reported_by']})"
        detail = e["error"] or (e["broker"] or "")
        table.add_row(
            e["address"], status, e["role"] or "-", e["version"] or "-", uptime, seen, detail
        )
    return table


def show(conf: Settings, mode: Output) -> None:
    """Ask every listed broker, print, and exit as the module docstring says."""
    listed = addresses(conf)
    data = gather(conf, listed)
    emit(data, mode, _rows)
    if not data["reachable"]:
        fail("no broker answered (see the errors above)", exits.CONNECTION)
    if not data["healthy"]:
        down = [e["address"] for e in data["brokers"] if not e["healthy"]]
        fail(f"unreachable or unhealthy: {', '.join(down)}", exits.ERROR)
