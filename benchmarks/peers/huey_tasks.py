"""The no-op workload for Huey on SQLite (imported by huey_consumer and huey_bench)."""

import os

from huey import SqliteHuey

huey = SqliteHuey("tq-bench", filename=os.environ["HUEY_DB"])


@huey.task()
def noop(n):
    return 1  # a stored result marks the task done (Huey skips storing None)
