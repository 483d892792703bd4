"""Every limit of a request, named once.

Contract: the request declarations (tq/protocol/schema.py), the broker, both
clients, the REST layer, the OpenAPI document and docs/PROTOCOL.md's generated
tables read their bounds from here; no other module writes one of these numbers.
Pure constants: imports nothing.

A limit that an operator can change (``--max-frame``, ``--max-payload``) has
its default here; the setting lives in tq/config.py.
"""

from __future__ import annotations

# -- frames and bodies -------------------------------------------------------------------
MAX_FRAME = 16 * 1024 * 1024  # default frame limit: a 10 MiB payload plus the envelope
MAX_FRAME_LIMIT = 2**32 - 1  # a frame's length prefix is 4 bytes
MAX_BODY = MAX_FRAME  # a REST request body, like the wire's frame limit
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # a payload or result, msgpack-encoded

# -- numbers ------------------------------------------------------------------------------
MAX_REQUEST_ID = 2**63 - 1  # a request id; also what SQLite's integers hold
MAX_TOKEN = 2**63 - 1  # lease tokens are positive 62-bit numbers; larger cannot be one
MAX_SEQ = 2**63 - 1  # an audit seq is never above SQLite's largest integer
MAX_COUNT = 2**31 - 1  # hello pid and concurrency
MAX_SECONDS = 10 * 365 * 86400.0  # a duration or delay beyond this is a mistake
MAX_NUMBER = 1e300  # task durations: finite, and any JSON or msgpack number fits a float
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z, the latest time a request may name

# -- tasks --------------------------------------------------------------------------------
MAX_SUBMIT = 10_000  # tasks per submit request (all or nothing, one transaction)
MAX_DEPENDENCIES = MAX_SUBMIT  # dependencies one task may name
# dependencies (depends_on entries) of one submit in all: each is a row written in the
# submit's transaction, and a workflow's group after a group of N names N per task
MAX_LINKS = 100_000
MAX_NAME_LENGTH = 200  # a type, queue, idempotency key, schedule or key name
MAX_RETRIES = 1_000_000  # bounds what the store's 64-bit integers must hold
MAX_PRIORITY = 255
MAX_TRACE_FIELDS = 4
MAX_TRACE_KEY = 64
MAX_TRACE_VALUE = 1024  # characters; W3C traceparent is 55, tracestate at most 512
MAX_UNIQUE_FOR = 366 * 86400.0  # seconds a unique task's key may be held after its submit
MAX_UNIQUE_KEY = 200  # characters of an explicit unique_key
MAX_PROGRESS_MESSAGE = 200  # characters of a progress message (longer ones are cut)

# -- answers and pages --------------------------------------------------------------------
MAX_CLAIM = 1000  # tasks one claim may lease
MAX_WAIT = 60.0  # seconds a claim or wait may long-poll; longer asks are capped to it
MAX_LIST = 10_000  # tasks per list page
DEFAULT_LIST = 100
MAX_SCAN = 10_000  # tasks a filtered list (search, time range) reads per call at most
MAX_SEARCH = 200  # characters of a list's search text
BULK_DEFAULT = 1000  # rows per purge / retry_many request unless the caller says
BULK_MAX = 10_000
MAX_AUDIT_PAGE = 1000
DEFAULT_AUDIT_PAGE = 100
MAX_WARNINGS = 20  # task types named in a submit answer's warnings

# -- what one worker registers (its hello) ------------------------------------------------
MAX_WORKER_QUEUES = 256
MAX_WORKER_TYPES = 1024
MAX_WORKER_TEXT = 255  # name, host, worker id

# -- keys, schedules, caps (admin requests) ------------------------------------------------
MAX_KEY_NAME = 200  # characters of an API key's label
MAX_KEY_QUEUES = 1000  # queues one API key may be limited to
MAX_KEY_ID = 64  # characters of a key id named by a request (ids are 12 hex characters)
MAX_CRON_LENGTH = 200  # characters of a schedule's cron expression
MAX_TIMEZONE = 64  # characters of an IANA time zone name
MAX_CAP_CONCURRENCY = 1_000_000  # running tasks a cap may allow
MAX_CAP_RATE = 1_000_000.0  # tasks per second a cap may allow; also its largest burst
MAX_RATE_TEXT = 32  # characters of a rate written as text ("30/m")
