"""The command line: typer commands that parse, call a client or start a service, print.

Contract: thin edges. Data goes to stdout, errors and logs to stderr, exit
statuses come from exits.py. Heavy imports (trio services, cryptography,
textual) happen inside the commands that need them so ``tq --help`` and
``tq submit`` start fast. Nothing imports tq.cli.
"""
