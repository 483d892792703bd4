"""Durable task storage behind one interface, opened from a URL.

    async with open_store("sqlite:///var/lib/tq/tq.db") as store: ...
    async with open_store("postgresql://tq@db.example:5432/tq") as store: ...

Contract: the only package with SQL. Speaks in lifecycle verbs (submit,
claim, complete, extend_leases, release_expired, promote_due, cancel,
retry, get, list, stats; for operators: queue_depth, purge, retry_many,
probe). Every state change is checked against tq.core.states. Blocking
database calls happen only on the store's own threads (see sqlite.py and
postgres.py); the async methods are safe to call from trio. Nothing outside
this package knows which backend it talks to.
May import: tq.core, trio, apsw (sqlite.py), psycopg (postgres.py).

Store URLs:
    sqlite://PATH             an SQLite file; everything after ``sqlite://`` is the
                              path, so ``sqlite:///var/lib/tq/tq.db`` is absolute
                              and ``sqlite://tq.db`` is relative
    PATH                      (no scheme) the same as sqlite://PATH
    postgresql://... (or postgres://...)  a PostgreSQL database, in libpq's URL
                              form (user, password, host, port, database, and
                              ``?options=-csearch_path%3Dschema`` to use a schema)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tq.core.errors import ConfigError
from tq.store.base import BrokerSelf, Store, StoreStats

__all__ = ["BrokerSelf", "Store", "StoreStats", "StoreURL", "open_store", "parse_store_url"]

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
INSTALL_HINT = "pip install 'psycopg[binary]>=3.2'"


@dataclass(frozen=True, slots=True)
class StoreURL:
    backend: str  # "sqlite" or "postgresql"
    target: str  # the SQLite file path, or the PostgreSQL URL as given

    @property
    def shown(self) -> str:
        """The URL as logs and messages show it (a PostgreSQL password masked)."""
        if self.backend == SQLITE:
            return f"sqlite://{self.target}"
        from tq.store.postgres import redact

        return redact(self.target)


def parse_store_url(url: str) -> StoreURL:
    """Which backend ``url`` names, and where; ConfigError naming the accepted forms."""
    text = str(url).strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        if not text:
            raise ConfigError(_bad(url, "it is empty"))
        return StoreURL(SQLITE, text)
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest:
            raise ConfigError(_bad(url, "sqlite:// needs a file path after it"))
        return StoreURL(SQLITE, rest)
    if scheme in ("postgresql", "postgres"):
        return StoreURL(POSTGRESQL, text)
    raise ConfigError(_bad(url, f"unknown scheme {scheme!r}"))


def _bad(url: str, why: str) -> str:
    shown = url if "@" not in str(url) else "(the URL given)"
    return (
        f"store URL {shown!r} is not valid ({why}); use sqlite:///path/to/tq.db or "
        "postgresql://user[:password]@host[:port]/database"
    )


@asynccontextmanager
async def open_store(
    url: str, *, synchronous: str = "full", broker: BrokerSelf | None = None
) -> AsyncIterator[Store]:
    """Open (creating and migrating if needed) the store ``url`` names; close it on exit.

    ``broker``: the broker opening it, as a member of a cluster of brokers sharing
    the database (``Store.cluster``); a backend only one broker can use (SQLite)
    ignores it.
    """
    parsed = parse_store_url(url)
    if parsed.backend == SQLITE:
        from tq.store.sqlite import open_sqlite_store

        async with open_sqlite_store(parsed.target, synchronous=synchronous) as store:
            yield store
        return
    try:
        from tq.store.postgres import open_postgres_store
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        raise ConfigError(
            f"a PostgreSQL store needs psycopg, which cannot be imported ({exc}); "
            f"install it: {INSTALL_HINT}"
        ) from None
    async with open_postgres_store(parsed.target, synchronous=synchronous, broker=broker) as pg:
        yield pg
