"""One broker per data directory: an exclusive lock held for the broker's life.

``data_dir_lock(data)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``DATA/broker.lock`` and writes the holder's pid into it. A second broker on
the same directory (another process, or another broker in this one) fails at
once with an error naming the pid that holds it, instead of sharing the store
silently. The kernel drops the lock when the holder exits, even on kill -9,
so a stale lock file never blocks a restart. Offline tools (`tq backup`, `tq
keys --data`) do not take it: they are safe next to a running broker.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tq.core.errors import ConfigError

LOCK_NAME = "broker.lock"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"pid {int(text)}"
    return "an unknown process"


@contextlib.contextmanager
def data_dir_lock(data: Path) -> Iterator[Path]:
    """Hold the data directory's lock until the block ends; ConfigError if taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not a POSIX system: no lock
        yield data / LOCK_NAME
        return
    path = data / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"data directory {data} is in use by another broker ({_holder(fd)} holds "
                f"{path}); stop that broker first, or give this one another --data"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
