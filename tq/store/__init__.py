"""Durable task storage behind one interface.

Contract: the only package with SQL. Speaks in lifecycle verbs (submit,
claim, complete, extend_leases, release_expired, promote_due, cancel,
retry, get, list, stats; for operators: queue_depth, purge, retry_many,
probe). Every state change is checked against
tq.core.states. Blocking database calls happen only on the store's own
threads (see sqlite.py); the async methods are safe to call from trio.
May import: tq.core, trio, apsw (sqlite.py), psycopg (postgres.py).
"""

from tq.store.base import Store, StoreStats

__all__ = ["Store", "StoreStats"]
