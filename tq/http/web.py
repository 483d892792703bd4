"""The web dashboard: its page and assets, login, the session cookie, live events.

    GET  /                       the page (tq/http/web/index.html; the rest is JS modules)
    GET  /ui/app.js | app.css    the assets (app.js imports lib, overview, tasks, lists .js),
                                 shipped in the package (no build step)
    POST /ui/login               {"key": API key} as JSON (or a form field): sets the cookie
    POST /ui/logout              ends the session and clears the cookie
    GET  /ui/session             who the cookie acts as: key, role, what it may do, CSRF token
    GET  /api/v1/events          server-sent events from the broker's event bus

The page reads and acts through the REST API (/api/v1, app.py). A request
without an ``Authorization`` header may authenticate with the session
cookie instead (``cookie_principal``, called by app.py's ``authenticate``).

Session cookie ``tq_session`` = ``<key id>.<expiry>.<CSRF token>.<HMAC>``:
HMAC-SHA256 under a random secret each broker makes at start (so sessions
end when the broker restarts), HttpOnly, SameSite=Strict, Path=/, Secure
whenever the page was served over HTTPS (it is not only with --insecure).
A login checks the key exactly as a REST bearer key is checked (scrypt the
first time, the key table and the role table); the cookie keeps only the
key id, and every request rebuilds the principal from the key table, so a
revoked or expired key stops working at once and the role applies as on
the wire. A state-changing request (anything but GET/HEAD/OPTIONS) made
with the cookie must send header ``X-CSRF-Token`` equal to the cookie's
token (the page reads it from /ui/session), else 403. Logins and logouts
from another origin are refused (the ``Origin`` header must be this one).

Every page and asset carries a strict Content-Security-Policy (scripts and
styles from this origin only, no inline code), nosniff and no-referrer. The
page writes everything remote parties chose (types, queues, payloads,
errors, worker names) as text (``textContent``), never as HTML.

Events: ``GET /api/v1/events?topics=tasks,counts,workers,progress`` (the same topics
and event bodies as the wire's ``subscribe``, docs/PROTOCOL.md), one SSE
message per event (``event:`` the topic, ``data:`` the event as JSON, ``id:``
a sequence number), a ``: keepalive`` comment every KEEPALIVE seconds. The
stream ends when the client goes or the broker shuts down.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tq.broker.events import TOPICS, EventBus, Subscriber, event_fields
from tq.core.errors import Forbidden, InvalidRequest, Unauthorized, Unavailable
from tq.security.roles import allowed

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from tq.broker.service import BrokerService
    from tq.security.roles import Principal

SESSION_COOKIE = "tq_session"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 8 * 3600  # a login lasts this long (or until the broker restarts)
MAX_ENDED = 100_000  # logged-out sessions remembered until they expire
MAX_LOGIN_BODY = 8 * 1024
KEEPALIVE = 15.0  # seconds between SSE keepalive comments
MAX_STREAMS = 200  # event streams served over HTTP at once (each holds a bounded queue)
# ... of which over HTTP/1.x, where each holds one of the port's connections (server.py's
# MAX_CONNECTIONS, 64) for as long as it lasts: the rest stay free for the API, the page
# and health probes. HTTP/2 (what browsers speak over HTTPS) carries streams on one.
MAX_HTTP1_STREAMS = 32
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",  # the entry module: login, live events, routing
    "lib.js": "text/javascript; charset=utf-8",  # text-only DOM helpers, the API client
    "overview.js": "text/javascript; charset=utf-8",
    "tasks.js": "text/javascript; charset=utf-8",
    "lists.js": "text/javascript; charset=utf-8",  # workers, keys, audit
    "app.css": "text/css; charset=utf-8",
}
# what the page shows buttons for: name -> the role-table action it needs
ACTIONS = {
    "cancel": "cancel",
    "retry": "retry",
    "set_priority": "set_priority",
    "purge": "purge",
    "retry_many": "retry_many",
    "keys": "keys:list",
    "audit": "audit",
    "events": "subscribe",
}


@dataclass(frozen=True, slots=True)
class Session:
    key_id: str
    expires: int
    csrf: str


class Sessions:
    """Signed, stateless session cookies; the secret lives as long as this object."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._secret = secrets.token_bytes(32)
        self.clock = clock
        self._ended: dict[str, int] = {}  # CSRF token of a logged-out session -> its expiry

    def issue(self, key_id: str) -> tuple[str, Session]:
        """(cookie value, session) for a key id just authenticated."""
        session = Session(key_id, int(self.clock()) + SESSION_SECONDS, secrets.token_urlsafe(24))
        body = f"{session.key_id}.{session.expires}.{session.csrf}"
        return f"{body}.{self._sign(body)}", session

    def read(self, value: str | None) -> Session | None:
        """The session a cookie value stands for; None if forged, expired or ended."""
        if not value:
            return None
        parts = value.split(".")
        if len(parts) != 4:
            return None
        key_id, expires, csrf, signature = parts
        expected = self._sign(f"{key_id}.{expires}.{csrf}")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        if not (expires.isascii() and expires.isdigit()) or int(expires) <= self.clock():
            return None
        if csrf in self._ended:
            return None
        return Session(key_id, int(expires), csrf)

    def end(self, session: Session) -> None:
        """Logout: the cookie stops working even if someone kept a copy."""
        now = self.clock()
        if len(self._ended) >= MAX_ENDED:
            self._ended = {t: e for t, e in self._ended.items() if e > now}
        if len(self._ended) < MAX_ENDED:
            self._ended[session.csrf] = session.expires

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _service(request: Request) -> BrokerService:
    service: BrokerService = request.app.state.service
    return service


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


def _session(request: Request) -> Session:
    session = _sessions(request).read(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise Unauthorized(
            "not logged in, or the session ended (logged out, expired after "
            f"{SESSION_SECONDS // 3600} h, or the broker restarted): log in with an API key"
        )
    return session


async def cookie_principal(request: Request, action: str) -> Principal | None:
    """The principal of a request authenticated by the session cookie, checked for
    ``action`` like a bearer key; a state-changing request must carry the CSRF token."""
    service = _service(request)
    if not service.auth.enabled:
        return None
    session = _session(request)
    if request.method not in SAFE_METHODS:
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise Forbidden(
                f"a request authenticated by the session cookie must send header "
                f"X-CSRF-Token (from GET /ui/session) to {request.method} {request.url.path}"
            )
    principal = service.auth.principal_of(session.key_id)
    if principal is not None:
        principal.authorize(action)
    return principal


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _same_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise Forbidden(f"refused a {request.url.path} from another origin ({origin})")


@cache
def _asset(name: str) -> bytes:
    return resources.files("tq.http").joinpath("web", name).read_bytes()


# -- routes --------------------------------------------------------------------------


async def page(request: Request) -> Response:
    response = Response(_asset("index.html"), media_type="text/html; charset=utf-8")
    response.headers["Cache-Control"] = "no-cache"
    return _secure(response)


async def asset(request: Request) -> Response:
    name = request.url.path.removeprefix("/ui/")
    response = Response(_asset(name), media_type=ASSETS[name])
    response.headers["Cache-Control"] = "no-cache"
    return _secure(response)


def _about(service: BrokerService, principal: Principal | None, session: Session | None) -> Any:
    role = "admin" if principal is None else principal.role
    queues = None if principal is None or principal.queues is None else sorted(principal.queues)
    return {
        "auth": service.auth.enabled,
        "broker": service.name,
        "key_id": None if principal is None else principal.key_id,
        "name": None if principal is None else principal.name,
        "role": role,
        "queues": queues,
        "may": {
            name: allowed(role, action) and not (action == "subscribe" and queues is not None)
            for name, action in ACTIONS.items()
        },
        "csrf": None if session is None else session.csrf,
        "expires_at": None if session is None else session.expires,
    }


async def login(request: Request) -> Response:
    _same_origin(request)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_LOGIN_BODY:
            raise InvalidRequest(f"a login body is at most {MAX_LOGIN_BODY} bytes")
    form = media == "application/x-www-form-urlencoded"
    key: object
    if form:
        key = (parse_qs(data.decode("utf-8", "replace")).get("key") or [""])[0]
    elif media == "application/json":
        try:
            body = json.loads(data)
        except ValueError:
            raise InvalidRequest('send {"key": "<API key>"} as JSON') from None
        key = body.get("key") if isinstance(body, dict) else None
    else:
        raise InvalidRequest('send {"key": "<API key>"} as JSON, or a form with field key')
    service = _service(request)
    # exactly a REST bearer key's check; a key that cannot read (a worker's) is refused
    principal = await service.authorize(key if isinstance(key, str) else None, "query:stats")
    if principal is None:  # --no-auth: there is nothing to log in to
        return _secure(JSONResponse(_about(service, None, None)))
    value, session = _sessions(request).issue(principal.key_id)
    await service.auth.record(principal.key_id, "ui.login", principal.key_id)
    about = _about(service, principal, session)
    response: Response = RedirectResponse("/", 303) if form else JSONResponse(about)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    response.headers["Cache-Control"] = "no-store"
    return _secure(response)


async def logout(request: Request) -> Response:
    _same_origin(request)
    session = _sessions(request).read(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        _sessions(request).end(session)
    response = Response(status_code=204)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return _secure(response)


async def session_info(request: Request) -> Response:
    service = _service(request)
    if not service.auth.enabled:
        about = _about(service, None, None)
    else:
        session = _session(request)
        about = _about(service, service.auth.principal_of(session.key_id), session)
    response = JSONResponse(about)
    response.headers["Cache-Control"] = "no-store"
    return _secure(response)


async def events(request: Request) -> Response:
    from tq.http.app import authenticate  # app.py imports this module

    principal = await authenticate(request, "subscribe")
    text = request.query_params.get("topics")
    topics = list(TOPICS) if text is None else [t for t in text.split(",") if t]
    service = _service(request)
    if service.closing:
        raise Unavailable("the broker is shutting down; reconnect once it is back")
    streams: set[Subscriber] = request.app.state.streams
    if len(streams) >= MAX_STREAMS:
        raise Unavailable(
            f"this broker already serves {MAX_STREAMS} event streams over HTTP: close one "
            "(another tab?) or subscribe over the wire"
        )
    held: set[Subscriber] | None = None
    if request.scope.get("http_version") != "2":
        held = request.app.state.http1_streams
        if len(held) >= MAX_HTTP1_STREAMS:
            raise Unavailable(
                f"this broker already serves {MAX_HTTP1_STREAMS} event streams over HTTP/1.1, "
                "each holding one of its HTTP connections: close one, or connect with HTTP/2 "
                "(browsers do over HTTPS), which carries every stream on one connection"
            )
    sub = service.events.subscribe(0, topics)  # raises InvalidRequest for a bad topic
    shutdown: trio.Event | None = getattr(request.app.state, "shutdown", None)
    stream = EventStream(service.events, sub, shutdown, streams, held)
    if principal is not None:  # a key revoked or expired since, or a logout, ends it
        cookie = None if "authorization" in request.headers else request.cookies.get(SESSION_COOKIE)
        stream.still_good = partial(_still_good, service, principal, _sessions(request), cookie)
    return stream


def _still_good(
    service: BrokerService, principal: Principal, sessions: Sessions, cookie: str | None
) -> None:
    """Unauthorized once the stream's key is revoked or expired, or the session it was
    opened with (if any) has ended (logout)."""
    service.auth.check(principal)
    if cookie is not None and sessions.read(cookie) is None:
        raise Unauthorized("the session ended (logged out or expired): log in again")


class EventStream(Response):
    """A text/event-stream of one subscriber, until the client or the broker goes."""

    def __init__(
        self,
        bus: EventBus,
        sub: Subscriber,
        shutdown: trio.Event | None,
        streams: set[Subscriber],
        held: set[Subscriber] | None = None,
    ) -> None:
        super().__init__(
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.bus, self.sub, self.shutdown, self.streams = bus, sub, shutdown, streams
        self.held = held  # the HTTP/1.x streams, each holding a connection (None: HTTP/2)
        self.still_good: Callable[[], None] = lambda: None  # Unauthorized once the key is not
        streams.add(sub)
        if held is not None:
            held.add(sub)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await self._chunk(send, "retry: 2000\n: connected\n\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_disconnect, receive, nursery.cancel_scope)
                if self.shutdown is not None:
                    nursery.start_soon(self._until_shutdown, self.shutdown, nursery.cancel_scope)
                nursery.start_soon(self._pump, send, nursery.cancel_scope)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.streams.discard(self.sub)
            if self.held is not None:
                self.held.discard(self.sub)
            self.bus.unsubscribe(self.sub)

    @staticmethod
    async def _chunk(send: Send, text: str) -> None:
        await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

    @staticmethod
    async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    @staticmethod
    async def _until_shutdown(shutdown: trio.Event, scope: trio.CancelScope) -> None:
        await shutdown.wait()
        scope.cancel()

    async def _pump(self, send: Send, scope: trio.CancelScope) -> None:
        seq = 0
        while True:
            with trio.move_on_after(KEEPALIVE) as idle:
                try:
                    queued = await self.sub.receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    break  # unsubscribed
            try:
                self.still_good()
            except Unauthorized:
                break  # the key was revoked or expired: no more events (a reconnect gets 401)
            if idle.cancelled_caught:
                await self._chunk(send, ": keepalive\n\n")
                continue
            event = self.sub.take(queued)  # a counts slot: the newest counts
            if event is None:
                continue
            seq += 1
            data = json.dumps(event_fields(event), ensure_ascii=False, default=repr)
            await self._chunk(send, f"id: {seq}\nevent: {event.topic}\ndata: {data}\n\n")
        scope.cancel()


def install(app: Starlette) -> None:
    """What the routes keep per app: the session signer (a fresh secret) and the streams."""
    app.state.sessions = Sessions(app.state.service.clock)
    app.state.streams = set()
    app.state.http1_streams = set()


def routes() -> list[Route]:
    return [
        Route("/", page, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", logout, methods=["POST"]),
        Route("/ui/session", session_info, methods=["GET"]),
        *(Route(f"/ui/{name}", asset, methods=["GET"]) for name in ASSETS),
    ]
