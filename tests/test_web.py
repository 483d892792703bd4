"""The web dashboard's HTTP side against a real broker (TLS, API keys), with httpx.

Login and the session cookie, cookie authentication of the REST API with its
CSRF token, roles, security headers, the server-sent event stream, the
routes the page needs (priority, purge, retry-many, keys, audit) and the
list filters the store does not know (text search, time range).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tq.broker.service import MAX_SCAN
from tq.http import web
from tq.http.web import ASSETS, CSP, SESSION_COOKIE
from tq.testing import RunningBroker, running_broker, running_worker

API = "/api/v1"


@asynccontextmanager
async def browser(broker: RunningBroker) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no Authorization header: what a browser sends (plus its cookies)."""
    assert broker.info.http is not None and broker.info.ca_file is not None
    verify = ssl.create_default_context(cafile=str(broker.info.ca_file))
    async with httpx.AsyncClient(base_url=broker.info.http, verify=verify, timeout=30) as http:
        yield http


@asynccontextmanager
async def event_stream(
    broker: RunningBroker, cookie: str, query: str = ""
) -> AsyncIterator[trio.SSLStream[trio.SocketStream]]:
    """GET /api/v1/events as a browser would, over a raw TLS stream (httpx leaves its
    inner generators to the collector when a stream is left before its end)."""
    assert broker.info.http is not None and broker.info.ca_file is not None
    host, port = broker.info.http.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(broker.info.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context)
    async with stream:
        request = (
            f"GET {API}/events{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Cookie: {SESSION_COOKIE}={cookie}\r\nAccept: text/event-stream\r\n\r\n"
        )
        await stream.send_all(request.encode())
        yield stream


async def read_until(stream: trio.abc.ReceiveStream, seen: bytes, done: bytes) -> bytes:
    """Read until ``done`` appears after what was ``seen``; everything read."""
    data = seen
    while done not in data:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"the stream ended before {done!r}: {data!r}")
        data += chunk
    return data


def sse_events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(topic, event) of every complete SSE message in a raw (chunked) HTTP response."""
    found = []
    for line in data.decode().splitlines():
        if line.startswith("event: "):
            topic = line.removeprefix("event: ")
        elif line.startswith("data: "):
            found.append((topic, json.loads(line.removeprefix("data: "))))
    return found


async def new_key(broker: RunningBroker, role: str) -> str:
    async with broker.client() as admin:
        key: str = (await admin.request({"t": "keys", "op": "create", "role": role}))["key"]
    return key


async def log_in(http: httpx.AsyncClient, key: str) -> dict[str, Any]:
    response = await http.post("/ui/login", json={"key": key})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.trio
async def test_login_sets_a_signed_strict_cookie_and_logout_ends_it(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, browser(broker) as http:
        assert (await http.get(f"{API}/stats")).status_code == 401
        response = await http.post("/ui/login", json={"key": broker.key})
        assert response.status_code == 200, response.text
        cookie = response.headers["set-cookie"]
        flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "secure", "path", "max-age", "samesite"} <= flags
        assert "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
        about = response.json()
        assert about["role"] == "admin" and about["may"]["purge"] and about["csrf"]
        assert about["csrf"] in http.cookies[SESSION_COOKIE]  # key id . expiry . csrf . hmac

        session = (await http.get("/ui/session")).json()
        assert session["csrf"] == about["csrf"] and session["key_id"] == about["key_id"]
        stats = await http.get(f"{API}/stats")
        assert stats.status_code == 200 and "history" in stats.json()

        # a forged cookie (same parts, another signature) is nobody
        kept = http.cookies[SESSION_COOKIE]
        forged = kept.rsplit(".", 1)[0] + ".AAAA"
        async with browser(broker) as other:
            other.cookies.set(SESSION_COOKIE, forged)
            assert (await other.get(f"{API}/stats")).status_code == 401

        logout = await http.post("/ui/logout")
        assert logout.status_code == 204
        assert 'tq_session=""' in logout.headers["set-cookie"] or "max-age=0" in (
            logout.headers["set-cookie"].lower()
        )
        assert SESSION_COOKIE not in http.cookies
        assert (await http.get(f"{API}/stats")).status_code == 401
        # a copy of the cookie kept from before the logout no longer works either
        async with browser(broker) as thief:
            thief.cookies.set(SESSION_COOKIE, kept)
            assert (await thief.get(f"{API}/stats")).status_code == 401


@pytest.mark.trio
async def test_bad_keys_workers_and_other_origins_are_refused(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, browser(broker) as http:
        assert broker.key is not None
        wrong = await http.post("/ui/login", json={"key": broker.key[:-2] + "xx"})
        assert wrong.status_code == 401 and "secret is wrong" in wrong.json()["detail"]
        assert "set-cookie" not in wrong.headers
        assert (await http.post("/ui/login", json={"key": "hello"})).status_code == 401
        assert (await http.post("/ui/login", content=b"key")).status_code == 400
        worker = await log_in_status(http, await new_key(broker, "worker"))
        assert worker == 403  # a worker key cannot read: no dashboard
        other = await http.post(
            "/ui/login", json={"key": broker.key}, headers={"Origin": "https://evil.example"}
        )
        assert other.status_code == 403 and SESSION_COOKIE not in http.cookies
        # a form post (no script) logs in too and goes back to the page
        form = await http.post("/ui/login", data={"key": broker.key})
        assert form.status_code == 303 and form.headers["location"] == "/"
        assert SESSION_COOKIE in http.cookies


async def log_in_status(http: httpx.AsyncClient, key: str) -> int:
    return (await http.post("/ui/login", json={"key": key})).status_code


@pytest.mark.trio
async def test_cookie_auth_needs_the_csrf_token_for_changes_and_keeps_roles(
    tmp_path: Path,
) -> None:
    async with running_broker(tmp_path) as broker, browser(broker) as http:
        about = await log_in(http, await new_key(broker, "producer"))
        listed = await http.get(f"{API}/tasks")
        assert listed.status_code == 200
        no_token = await http.post(f"{API}/tasks", json={"type": "sleep", "payload": 30})
        assert no_token.status_code == 403 and "X-CSRF-Token" in no_token.json()["detail"]
        bad = await http.post(
            f"{API}/tasks", json={"type": "sleep"}, headers={"X-CSRF-Token": "nope"}
        )
        assert bad.status_code == 403
        csrf = {"X-CSRF-Token": about["csrf"]}
        made = await http.post(f"{API}/tasks", json={"type": "sleep", "payload": 30}, headers=csrf)
        assert made.status_code == 201, made.text
        task_id = made.json()["id"]
        assert (await http.delete(f"{API}/tasks/{task_id}")).status_code == 403
        prio = await http.post(
            f"{API}/tasks/{task_id}/priority", json={"priority": "high"}, headers=csrf
        )
        assert prio.status_code == 200 and prio.json()["priority"] == 200
        # a producer may not retry (admin only), as over the wire
        assert (await http.post(f"{API}/tasks/{task_id}/retry", headers=csrf)).status_code == 403

        # a reader's cookie reads but cannot cancel, even with its token
        async with browser(broker) as reader:
            info = await log_in(reader, await new_key(broker, "reader"))
            assert info["may"] == {
                "cancel": False,
                "retry": False,
                "set_priority": False,
                "purge": False,
                "retry_many": False,
                "keys": False,
                "audit": False,
                "events": True,
            }
            assert (await reader.get(f"{API}/tasks/{task_id}")).status_code == 200
            refused = await reader.delete(
                f"{API}/tasks/{task_id}", headers={"X-CSRF-Token": info["csrf"]}
            )
            assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
            assert (await reader.get(f"{API}/keys")).status_code == 403
        cancelled = await http.delete(f"{API}/tasks/{task_id}", headers=csrf)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"

        # revoking the key ends its sessions at once
        async with broker.client() as admin:
            await admin.request({"t": "keys", "op": "revoke", "key_id": about["key_id"]})
        gone = await http.get(f"{API}/tasks")
        assert gone.status_code == 401 and "revoked" in gone.json()["detail"]


@pytest.mark.trio
async def test_pages_and_assets_carry_the_security_headers(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, browser(broker) as http:
        assets = [(f"/ui/{name}", media.split(";")[0]) for name, media in ASSETS.items()]
        shipped = {p.name for p in (Path(web.__file__).parent / "web").iterdir()}
        assert shipped == {"index.html", *ASSETS}  # every file is served, every asset shipped
        for path, media in [("/", "text/html"), *assets]:
            response = await http.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(media)
            assert response.headers["content-security-policy"] == CSP
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self';" in CSP and "unsafe" not in CSP
        assert (await http.get("/ui/nothing.js")).status_code == 404
        assert (await http.get("/ui/login")).status_code == 405  # POST only
        page = (await http.get("/")).text
        assert '<script type="module" src="/ui/app.js">' in page and "<style" not in page
        assert (await http.get("/ui/session")).status_code == 401


@pytest.mark.trio
async def test_the_event_stream_delivers_a_submit(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, browser(broker) as http:
        about = await log_in(http, broker.key or "")
        csrf = {"X-CSRF-Token": about["csrf"]}
        cookie = http.cookies[SESSION_COOKIE]
        with trio.fail_after(20):
            async with event_stream(broker, cookie, "?topics=tasks,counts") as sse:
                head = await read_until(sse, b"", b": connected")
                assert head.startswith(b"HTTP/1.1 200")
                assert b"content-type: text/event-stream" in head.lower()
                made = await http.post(
                    f"{API}/tasks", json={"type": "web-test", "queue": "sse"}, headers=csrf
                )
                assert made.status_code == 201
                data = await read_until(sse, head, b'"web-test"')
                data = await read_until(
                    sse,
                    data,
                    b"\n\n",
                )
                # the counts follow the change (a stream holds at most one counts event
                # queued, filled with the newest counts when its turn comes)
                data = await read_until(sse, data, b'"queues": {"sse"')
                data = await read_until(sse, data, b"\n\n")
        tasks = [e for topic, e in sse_events(data) if topic == "tasks"]
        assert tasks[0]["changes"][0]["type"] == "web-test"
        assert tasks[0]["changes"][0]["to"] == "pending"
        assert set(tasks[0]) == {"topic", "time", "changes", "more", "totals"}
        counts = [e for topic, e in sse_events(data) if topic == "counts"]
        assert counts[-1]["queues"]["sse"] == {"pending": 1}
        bad = await http.get(f"{API}/events", params={"topics": "gossip"})
        assert bad.status_code == 400 and "gossip" in bad.json()["detail"]
        async with browser(broker) as anonymous:
            assert (await anonymous.get(f"{API}/events")).status_code == 401


@pytest.mark.trio
async def test_the_event_stream_ends_when_the_broker_stops(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        async with browser(broker) as http:
            await log_in(http, broker.key or "")
            async with event_stream(broker, http.cookies[SESSION_COOKIE]) as sse:
                head = await read_until(sse, b"", b": connected")
                started = trio.current_time()
                broker.shutdown.set()
                with trio.fail_after(10):
                    rest = await read_until(sse, head, b"0\r\n\r\n")  # the last chunk
                assert trio.current_time() - started < 2.5  # before hypercorn's graceful cut
                assert rest.endswith(b"0\r\n\r\n")


@pytest.mark.trio
async def test_operator_routes_priority_purge_retry_many_keys_audit(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        from tq.worker.handlers import HandlerRegistry

        def boom(payload: Any) -> Any:
            raise ValueError(f"needle-{payload}")

        registry = HandlerRegistry()
        registry.register("boom", boom)

        made = await http.post(
            f"{API}/tasks",
            json=[{"type": "boom", "payload": i, "max_retries": 0} for i in range(3)],
        )
        assert made.status_code == 201
        async with running_worker(broker, registry):
            with trio.fail_after(20):
                while (await http.get(f"{API}/stats")).json()["queues"].get("default", {}).get(
                    "dead", 0
                ) < 3:
                    await trio.sleep(0.05)
        stats = (await http.get(f"{API}/stats")).json()
        last = stats["history"]["rows"][-1]
        assert len(stats["history"]["rows"]) == 60
        assert (last["submitted"], last["dead"], last["failed"], last["runs"]) == (3, 3, 3, 3)
        assert last["run_time"] >= 0 and last["start"] == int(time.time()) // 60 * 60

        bad_prio = await http.post(f"{API}/tasks/{made.json()['tasks'][0]['id']}/priority", json={})
        assert bad_prio.status_code == 400
        retried = await http.post(f"{API}/retry-many", json={"state": "dead", "limit": 2})
        assert retried.status_code == 200 and len(retried.json()["retried"]) == 2
        await http.post(f"{API}/tasks", json={"type": "later"})  # the newest task is kept
        dry = await http.post(
            f"{API}/purge", json={"states": ["dead"], "older_than": 0, "dry_run": True}
        )
        assert dry.json() == {"purged": 0, "matched": 1, "more": False}
        purged = await http.post(f"{API}/purge", json={"states": ["dead"], "older_than": 0})
        assert purged.json()["purged"] == 1
        keys = (await http.get(f"{API}/keys")).json()["keys"]
        assert {k["role"] for k in keys} == {"admin", "worker"}  # the first admin, the join key
        assert all("hash" not in k and "salt" not in k for k in keys)
        audit = (await http.get(f"{API}/audit", params={"limit": 2})).json()
        assert [e["action"] for e in audit["entries"]] == ["task.purge", "task.retry_many"]
        assert audit["next"] is not None
        assert (await http.get(f"{API}/audit", params={"limit": "x"})).status_code == 400
        huge = await http.get(f"{API}/audit", params={"before": str(2**70)})  # was a 500
        assert huge.status_code == 400 and "seq" in huge.json()["detail"]


@pytest.mark.trio
async def test_list_search_and_time_range_scan_with_a_cursor(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        first = [
            {"type": "t", "payload": {"n": i, "who": "Alice" if i % 3 == 0 else "bob"}}
            for i in range(30)
        ]
        assert (await http.post(f"{API}/tasks", json=first)).status_code == 201
        middle = time.time()
        await trio.sleep(0.01)
        later = [{"type": "t", "payload": {"n": 100 + i}} for i in range(5)]
        assert (await http.post(f"{API}/tasks", json=later)).status_code == 201

        async def every(**params: Any) -> list[Any]:
            found, cursor = [], None
            while True:
                query = {**params, **({"cursor": cursor} if cursor else {})}
                page = await http.get(f"{API}/tasks", params=query)
                assert page.status_code == 200, page.text
                found += [t["payload"]["n"] for t in page.json()["tasks"]]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    return found

        assert await every(search="alice", limit=4) == list(range(0, 30, 3))
        assert await every(search="ALICE", order="newest") == list(range(27, -1, -3))
        assert await every(since=middle) == list(range(100, 105))
        assert await every(until=middle, search="bob", limit=100) == [i for i in range(30) if i % 3]
        assert await every(search="nobody") == []
        async with broker.client() as client:  # the wire's list takes the same filters
            answer = await client.request(
                {"t": "query", "q": "list", "search": "alice", "since": 0, "limit": 100}
            )
        assert [t["payload"]["n"] for t in answer["tasks"]] == list(range(0, 30, 3))
        for params in ({"since": "yesterday"}, {"search": "x" * 201}, {"until": -1}):
            assert (await http.get(f"{API}/tasks", params=params)).status_code == 400


@pytest.mark.trio
async def test_a_search_reads_at_most_max_scan_tasks_per_page(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker, broker.http_client() as http:
        batch = [{"type": "t", "payload": i} for i in range(1000)]
        for _ in range(MAX_SCAN // 1000):
            assert (await http.post(f"{API}/tasks", json=batch)).status_code == 201
        await http.post(f"{API}/tasks", json={"type": "t", "payload": "the needle"})
        first = (await http.get(f"{API}/tasks", params={"search": "needle"})).json()
        assert first["tasks"] == [] and first["next_cursor"] is not None  # the scan goes on
        params = {"search": "needle", "cursor": first["next_cursor"]}
        second = (await http.get(f"{API}/tasks", params=params)).json()
        assert [t["payload"] for t in second["tasks"]] == ["the needle"]
        assert second["next_cursor"] is None


def test_the_hourly_history_keeps_sixty_minutes_per_queue() -> None:
    from types import SimpleNamespace

    from tq.broker.activity import Activity

    activity = Activity()
    start = 1_700_000_000.0 // 60 * 60
    activity.submitted([("a", "t"), ("b", "t")], start)
    done = SimpleNamespace(accepted=True, state="succeeded", queue="a", type="t", started_at=start)
    activity.reported([done], start + 90)  # the next minute, 90 s of run time
    rows = activity.history(start + 90).rows
    assert len(rows) == 60 and rows[-1].start == start + 60
    assert (rows[-2].submitted, rows[-1].succeeded) == (2, 1)
    assert (rows[-1].runs, rows[-1].run_time) == (1, 90.0)
    only_b = activity.history(start + 90, lambda q: q == "b").rows
    assert (only_b[-2].submitted, only_b[-1].runs, only_b[-1].run_time) == (1, 0, 0.0)
    later = activity.history(start + 3600 + 60).rows  # an hour on: both minutes gone
    assert sum(r.submitted + r.succeeded for r in later) == 0
    activity.submitted([("a", "t")], start + 7200)
    assert len(activity._minutes) == 1  # older buckets dropped as new ones come


@pytest.mark.trio
async def test_event_streams_are_capped_and_head_does_not_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "MAX_STREAMS", 1)
    async with running_broker(tmp_path) as broker, browser(broker) as http:
        await log_in(http, broker.key or "")
        cookie = http.cookies[SESSION_COOKIE]
        with trio.fail_after(20):
            head = await http.head(f"{API}/events")
            assert head.status_code == 200 and head.content == b""
            async with event_stream(broker, cookie) as first:
                await read_until(first, b"", b": connected")
                second = await http.get(f"{API}/events")
                assert second.status_code == 503 and "1 event streams" in second.json()["detail"]
            # the first stream's end frees its place (the broker sees the disconnect)
            while (await http.head(f"{API}/events")).status_code != 200:
                await trio.sleep(0.05)


@pytest.mark.trio
async def test_without_auth_the_page_needs_no_login(tmp_path: Path) -> None:
    async with running_broker(tmp_path, auth=False) as broker, browser(broker) as http:
        about = (await http.get("/ui/session")).json()
        assert about["auth"] is False and about["role"] == "admin" and about["csrf"] is None
        assert all(about["may"].values())
        assert (await http.post(f"{API}/tasks", json={"type": "echo"})).status_code == 201
        login = await http.post("/ui/login", json={"key": "anything"})
        assert login.status_code == 200 and "set-cookie" not in login.headers


@pytest.mark.trio
async def test_plain_http_cookie_is_not_secure_but_otherwise_the_same(tmp_path: Path) -> None:
    async with running_broker(tmp_path, insecure=True) as broker:
        assert broker.info.http is not None and broker.info.http.startswith("http://")
        async with httpx.AsyncClient(base_url=broker.info.http, timeout=30) as http:
            login = await http.post("/ui/login", json={"key": broker.key})
            assert login.status_code == 200, login.text
            cookie = login.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie
            assert "secure" not in cookie.replace("samesite", "")
            assert (await http.get(f"{API}/stats")).status_code == 200


def test_sessions_expire_and_a_restart_ends_them() -> None:
    from tq.http.web import SESSION_SECONDS, Sessions

    now = [1_700_000_000.0]
    sessions = Sessions(lambda: now[0])
    value, session = sessions.issue("00112233445566778899aabbccddeeff")
    assert sessions.read(value) == session
    for bad in ("", "a.b.c", value + "x", value.replace(".", ".1", 1), "é.1.2.3"):
        assert sessions.read(bad) is None, bad
    now[0] += SESSION_SECONDS - 1
    assert sessions.read(value) == session
    now[0] += 1
    assert sessions.read(value) is None  # expired
    now[0] -= SESSION_SECONDS
    assert Sessions(lambda: now[0]).read(value) is None  # another secret: a restarted broker
