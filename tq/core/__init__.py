"""The task model: states, priorities, retry policy, ids and errors.

Contract: pure code. Imports nothing beyond the standard library; takes time
as an argument (``now``); no I/O. Every other package may import it. The one
process-wide effect is ``heap.settle_heap`` (the garbage collector, once a
service has started).
"""
