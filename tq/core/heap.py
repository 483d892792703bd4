"""Keep a service's start-up objects away from the cyclic garbage collector.

    settle_heap()   # once a broker or worker has started

Modules, TLS contexts, settings and the like live until exit, yet every full
(generation 2) collection walks them all: in a loaded broker that measured
13-30 ms per collection, several a second, each one a stall of the event loop
and so a latency spike for every request in flight. ``gc.freeze()`` moves them
to the permanent generation; later garbage is collected as before.

The serve functions call it (``serve_broker`` once it listens, ``serve_worker``
as it starts), so every way of starting one gets it, not only the CLI. It acts
once per process: what a process holds when its first service starts is what
lives until exit (``tq up`` starts a broker, then a worker, in one process);
freezing again would also pin whatever later became garbage in a cycle.
"""

from __future__ import annotations

import gc

_settled = False


def settle_heap() -> None:
    """Collect, then freeze what is left (the first time in this process only)."""
    global _settled
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()
