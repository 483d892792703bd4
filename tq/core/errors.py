"""One exception tree for tq. Every error that crosses the wire has a stable ``code``.

    TQError                      code "error"
     ├── ProtocolError           code "protocol"       bad frame or message
     │    ├── FrameTooLarge      code "frame_too_large"
     │    └── UnknownMessage     code "unknown_message"
     ├── InvalidRequest          code "invalid"        a field is missing or has the wrong type
     │    └── PayloadTooLarge    code "payload_too_large"
     ├── NotFound                code "not_found"
     ├── InvalidTransition       code "invalid_transition"
     ├── LeaseLost               code "lease_lost"     fencing: a stale lease token
     ├── StoreError              code "store"
     ├── ConfigError             code "config"
     ├── ConnectionFailed        code "connection"     client side: broker unreachable
     │    └── TLSFailure         code "tls"
     ├── Timeout                 code "timeout"
     ├── Unavailable             code "unavailable"    broker shutting down
     ├── Unauthorized            code "unauthorized"   no, unknown, wrong, revoked or expired key
     ├── Forbidden               code "forbidden"      the key's role or queues do not allow it
     ├── RateLimited             code "rate_limited"   over the key's rate; see ``retry_after``
     └── RemoteError             code from the NACK    a NACK whose code has no class here

Foreign exceptions (OSError, ssl.SSLError, apsw.Error, msgpack errors) are
translated at the boundary where they are caught. ``error_from_code`` turns
a NACK back into the matching class on the client side. The CLI maps codes
to exit statuses in one place (tq/cli/exits.py).
"""

from __future__ import annotations

MAX_MESSAGE = 2000  # characters: an error quoting what a peer sent stays a line, not 16 MiB


def _bounded(message: str) -> str:
    """``message``, its middle cut if it is longer than MAX_MESSAGE (values a remote
    party chose are quoted in errors, and errors go into answers and the log)."""
    if len(message) <= MAX_MESSAGE:
        return message
    cut = len(message) - MAX_MESSAGE
    half = MAX_MESSAGE // 2
    return f"{message[:half]}... ({cut} characters left out) ...{message[-half:]}"


class TQError(Exception):
    """Base of every tq error. ``code`` is stable and travels in NACKs."""

    code = "error"

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        message = _bounded(message)
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message or self.__class__.__name__


class ProtocolError(TQError):
    code = "protocol"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class UnknownMessage(ProtocolError):
    code = "unknown_message"


class InvalidRequest(TQError):
    code = "invalid"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"


class NotFound(TQError):
    code = "not_found"


class InvalidTransition(TQError):
    code = "invalid_transition"


class LeaseLost(TQError):
    code = "lease_lost"


class StoreError(TQError):
    code = "store"


class ConfigError(TQError):
    code = "config"


class ConnectionFailed(TQError):
    code = "connection"


class TLSFailure(ConnectionFailed):
    code = "tls"


class Timeout(TQError):
    code = "timeout"


class Unavailable(TQError):
    code = "unavailable"


class Unauthorized(TQError):
    code = "unauthorized"


class Forbidden(TQError):
    code = "forbidden"


class RateLimited(TQError):
    code = "rate_limited"


class RemoteError(TQError):
    """A NACK whose code this version does not know; keeps the remote code."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.code = code


def _all_subclasses(cls: type[TQError]) -> list[type[TQError]]:
    out: list[type[TQError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_KNOWN: list[type[TQError]] = [TQError, *_all_subclasses(TQError)]
_BY_CODE: dict[str, type[TQError]] = {c.code: c for c in _KNOWN if c is not RemoteError}


def error_from_code(code: str, message: str, retry_after: float | None = None) -> TQError:
    """The exception for a NACK: the class registered for ``code``, else RemoteError."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(code, message, retry_after=retry_after)
    return cls(message, retry_after=retry_after)
