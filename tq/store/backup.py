"""Online backup of the SQLite store while the broker runs.

    result = backup_sqlite(settings.db_path, "/backups/tq-2026-11-28.db")

How it works: a separate connection opens the live database file and starts
a read transaction. In WAL mode a reader never blocks the broker's writer
(commits go on appending to the WAL), and the reader keeps seeing the one
snapshot it started with. SQLite's online backup API then copies that
snapshot page by page into a temporary file next to the destination, in
steps of ``pages_per_step`` pages.

Holding the read transaction across steps is what makes this work under
load: without it, SQLite restarts a backup whenever another connection
commits between two steps, and with a broker committing every few
milliseconds a stepped backup never finishes (measured: >3,000 steps without
progress). With it the copy is one consistent snapshot: every transaction
committed before the backup started is in the copy, none committed after is.

The copy is switched out of WAL mode (one self-contained file), checked
with ``PRAGMA quick_check``, fsynced and renamed into place, so a crash never
leaves a half-written file under the destination's name.

Cost to the broker: none for its writes, except that the WAL cannot be reset
while the snapshot is held, so it grows for the duration of the backup (the
broker's checkpointer shrinks it again afterwards).

Restore: stop the broker, copy the backup file to ``<data>/tq.db``, delete
``<data>/tq.db-wal`` and ``<data>/tq.db-shm`` if they exist, start the broker
(docs/OPERATIONS.md). An older schema is migrated on start.

Contract: synchronous and blocking (call it from a thread in async code);
the only SQL is PRAGMAs and a count; apsw errors leave as StoreError and
usage mistakes as ConfigError, each saying what to do.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import apsw

from tq.core.errors import ConfigError, StoreError

PAGES_PER_STEP = 4096  # 16 MiB of 4 KiB pages per step
BUSY_TIMEOUT_MS = 10_000

Progress = Callable[[int, int], None]  # (pages copied, pages in all)


@dataclass(frozen=True)
class BackupResult:
    source: str
    path: str
    bytes: int
    pages: int
    page_size: int
    schema_version: int
    tasks: int
    started_at: float  # wall clock when the snapshot was taken
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def backup_sqlite(
    db_path: str | os.PathLike[str],
    dest_path: str | os.PathLike[str],
    *,
    pages_per_step: int = PAGES_PER_STEP,
    overwrite: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
) -> BackupResult:
    """Copy a consistent snapshot of the live database ``db_path`` to ``dest_path``.

    ``dest_path`` may be a directory: the file is then named
    ``tq-YYYYMMDDTHHMMSSZ.db`` inside it. Returns what was written.
    """
    if pages_per_step <= 0:
        raise ConfigError(f"pages_per_step must be > 0, not {pages_per_step}")
    source_path = Path(db_path)
    if not source_path.is_file():
        raise ConfigError(
            f"no task database at {source_path}: pass the broker's data directory "
            "(--data DIR or TQ_DATA); the store is DATA/tq.db"
        )
    dest = _destination(Path(dest_path), overwrite)
    tmp = dest.with_name(f".{dest.name}.partial")
    _remove(tmp)
    clock = time.monotonic()
    try:
        source = _connect(source_path, apsw.SQLITE_OPEN_READWRITE)
    except apsw.Error as exc:
        raise _error(exc, "open", source_path) from exc
    try:
        source.execute("PRAGMA query_only = 1").fetchall()
        started_at, tasks, schema_version = _snapshot(source, source_path)
        try:
            pages, page_size = _copy(source, tmp, pages_per_step, progress, verify)
        finally:
            _end_read(source)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        source.close()
    try:
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        _remove(tmp)
        raise StoreError(f"cannot write the backup to {dest}: {exc.strerror or exc}") from exc
    return BackupResult(
        source=str(source_path),
        path=str(dest),
        bytes=dest.stat().st_size,
        pages=pages,
        page_size=page_size,
        schema_version=schema_version,
        tasks=tasks,
        started_at=started_at,
        seconds=time.monotonic() - clock,
    )


def _destination(dest: Path, overwrite: bool) -> Path:
    if dest.is_dir():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = dest / f"tq-{stamp}.db"
    if not dest.parent.is_dir():
        raise ConfigError(
            f"cannot write the backup to {dest}: {dest.parent} is not a directory; create it first"
        )
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write the backup to {dest}: {dest.parent} is not writable by this user"
        )
    if dest.exists() and not overwrite:
        raise ConfigError(
            f"{dest} already exists: choose a new name, or pass --force to replace it"
        )
    return dest


def _connect(path: Path, flags: int) -> apsw.Connection:
    conn = apsw.Connection(str(path), flags=flags)
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    return conn


def _snapshot(source: apsw.Connection, path: Path) -> tuple[float, int, int]:
    """Start the read transaction that pins the snapshot; what the snapshot holds."""
    try:
        source.execute("BEGIN").fetchall()
        # the snapshot is taken by the first read, just after this: every transaction
        # committed before started_at is in the copy
        started_at = time.time()
        schema_version = int(_one(source, "PRAGMA user_version"))
        has_tasks = source.execute(
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'tasks'"
        ).fetchall()
        tasks = int(_one(source, "SELECT count(*) FROM tasks")) if has_tasks else 0
    except apsw.Error as exc:
        raise _error(exc, "read", path) from exc
    return started_at, tasks, schema_version


def _copy(
    source: apsw.Connection,
    tmp: Path,
    pages_per_step: int,
    progress: Progress | None,
    verify: bool,
) -> tuple[int, int]:
    try:
        # tasks' payloads and API key hashes: readable by the owner only, like the store
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        dest = _connect(tmp, apsw.SQLITE_OPEN_READWRITE)
    except OSError as exc:
        raise StoreError(f"cannot create {tmp}: {exc.strerror or exc}") from exc
    except apsw.Error as exc:
        raise _error(exc, "create", tmp) from exc
    try:
        with dest.backup("main", source, "main") as backup:
            while not backup.done:
                backup.step(pages_per_step)
                if progress is not None:
                    total = backup.page_count
                    progress(total - backup.remaining, total)
        # one self-contained file: the copy inherited WAL mode from the live database
        dest.execute("PRAGMA journal_mode = DELETE").fetchall()
        if verify:
            problems = [str(row[0]) for row in dest.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StoreError(
                    f"the backup failed its integrity check ({'; '.join(problems[:3])}); "
                    "the live database may be damaged: run `tq doctor` on the broker host"
                )
        pages = int(_one(dest, "PRAGMA page_count"))
        page_size = int(_one(dest, "PRAGMA page_size"))
    except apsw.Error as exc:
        raise _error(exc, "copy into", tmp) from exc
    finally:
        dest.close()
    return pages, page_size


def _one(conn: apsw.Connection, sql: str) -> Any:
    """The first column of the first row of ``sql``."""
    return conn.execute(sql).fetchall()[0][0]


def _end_read(source: apsw.Connection) -> None:
    with contextlib.suppress(apsw.Error):
        if source.in_transaction:
            source.execute("COMMIT").fetchall()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        _fsync(path)


def _remove(path: Path) -> None:
    for p in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


_HINTS: tuple[tuple[type[apsw.Error], str], ...] = (
    (apsw.FullError, "the disk is full; free some space or write the backup elsewhere"),
    (apsw.BusyError, "the database stayed locked; retry"),
    (apsw.NotADBError, "the file is not an SQLite database; is --data right?"),
    (apsw.CorruptError, "the database is corrupt; restore the last good backup"),
    (apsw.CantOpenError, "check that the path exists and this user may read and write it"),
    (apsw.ReadOnlyError, "the file or its directory is read-only for this user"),
)


def _error(exc: apsw.Error, doing: str, path: Path) -> StoreError:
    hint = next((text for cls, text in _HINTS if isinstance(exc, cls)), "")
    detail = f"{type(exc).__name__}: {exc}"
    return StoreError(f"backup: cannot {doing} {path}: {hint + ' ' if hint else ''}({detail})")
