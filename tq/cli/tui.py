"""`tq tui`: the live operator console (tq/tui, docs/TUI.md).

Textual is imported inside the command only, so no other command pays for it;
it is the ``console`` extra (``pip install 'tq[console]'``), and without it the
command says so instead of failing with a traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tq.cli.common import BrokerOpt, CaOpt, InsecureOpt, KeyOpt, fail, run_guarded, say, settings


def tui(
    broker: BrokerOpt = None,
    ca: CaOpt = None,
    insecure: InsecureOpt = None,
    api_key: KeyOpt = None,
    light: Annotated[
        bool, typer.Option("--light", help="Colours for a light terminal (ctrl+t toggles).")
    ] = False,
) -> None:
    """Live operator console: queues, workers, failures, tasks; cancel, retry, submit, purge.

    Connects like every other command (--broker, --ca, --key or TQ_* settings).
    If the broker is down the console starts anyway and reconnects by itself.
    Keys: d dashboard, t tasks, s submit, ? help, ctrl+p command palette, q quit.
    """
    try:
        from tq.tui.app import ConsoleApp
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "textual":
            raise
        fail(
            "the console needs Textual, an optional dependency of tq: "
            "pip install 'tq[console]' (the one-file executable includes it)"
        )
    from tq.client import AsyncioClient, BlockingClient
    from tq.core.errors import ConnectionFailed, TLSFailure

    conf = settings(broker=broker, ca=ca, insecure=insecure, key=api_key)

    async def connect() -> AsyncioClient:
        return await AsyncioClient.open_from_settings(conf, name="tq-tui")

    def check() -> None:
        """Fail now on what retrying cannot fix (TLS, keys, settings); not on a down broker."""
        try:
            BlockingClient.from_settings(conf, name="tq-tui").close()
        except TLSFailure:
            raise
        except ConnectionFailed as exc:
            say(f"tq: {exc.message} (the console will keep trying)", err=True)

    run_guarded(check)
    ConsoleApp(connect, address=conf.broker, theme="textual-light" if light else None).run()
