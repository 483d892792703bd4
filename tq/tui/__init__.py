"""The operator console (`tq tui`): a Textual app that talks to one broker.

Contract: a client of the broker like any other. It uses only tq.client
(one ``AsyncioClient`` on Textual's asyncio loop, no threads), never the
broker or the store. Live updates come from a ``subscribe``; requests and
actions go over the same connection beside them. May import: textual, rich, tq.client,
tq.core. Nothing imports tq.tui except tq.cli.tui (and only inside the
command, so the rest of the CLI never pays for importing Textual).

    app.py        the App: state, link callbacks, actions, command palette
    link.py       the connection, reconnect with backoff, task pages
    model.py      what the console knows (pure; time is an argument)
    fmt.py        text formatting (pure)
    widgets.py    banner, broker line, tables, state colours
    screens/      dashboard, tasks, task detail, dialogs
    tq.tcss       the stylesheet (theme variables only: dark and light)

docs/TUI.md is the operator's guide.
"""
