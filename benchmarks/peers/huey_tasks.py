"""The no-op workload for Huey on SQLite (imported by huey_consumer and the benches).

synchronous=FULL (``fsync=True``), WAL: every enqueue is committed and fsynced
before ``noop(n)`` returns.
"""

import os

from huey import SqliteHuey

huey = SqliteHuey("tq-bench", filename=os.environ["HUEY_DB"], fsync=True)


def _noop(n):
    return 1  # a stored result marks the task done (Huey skips storing None)


noop = huey.task(name="noop")(_noop)


def producer():
    """An enqueue function on a SqliteHuey instance of its own (its own connection):
    one instance serialises its callers on a lock, as one connection would."""
    own = SqliteHuey("tq-bench", filename=os.environ["HUEY_DB"], fsync=True)
    return own.task(name="noop")(_noop)
