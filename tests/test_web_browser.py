"""The web dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

A broker process and a worker process on loopback (TLS, API keys), as an
operator would run them. Playwright's sync API runs its own event loop, so
this is a plain (not trio) test; the broker is a subprocess.

Without /usr/bin/chromium (``apt-get install chromium``) or the ``playwright``
package the test skips, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from tq.testing import BrokerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS_TYPE = "<img/src=x/onerror=alert(1)>"
WAIT_MS = 15_000
PENDING_OR_RUNNING = re.compile("^(pending|running)$")


def _require_browser() -> Any:
    """The playwright sync API module, or a skip (a failure under CI) saying what is missing."""
    missing = None
    if not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        missing = missing or "the playwright package is missing (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    return sync_api


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_the_dashboard_in_chromium(tmp_path: Path) -> None:
    sync_api = _require_browser()
    expect = sync_api.expect
    dialogs: list[str] = []
    with BrokerProcess(tmp_path / "broker") as broker, broker.http_client() as api:
        broker.start_worker("--concurrency", "2")
        broker.wait_for_workers(1)
        with broker.client() as admin:
            reader_key = admin.request({"t": "keys", "op": "create", "role": "reader"})["key"]
        api.post("/api/v1/tasks", json=[{"type": "echo", "payload": {"n": i}} for i in range(6)])
        failed = api.post(
            "/api/v1/tasks", json={"type": "fail", "payload": "boom", "max_retries": 0}
        )
        xss = api.post("/api/v1/tasks", json={"type": XSS_TYPE, "payload": {"html": XSS_TYPE}})
        xss_id = xss.json()["id"]
        # a paused queue and a capped one show their status on the overview, even empty
        assert api.post("/api/v1/queues/held/pause").status_code == 200
        capped = api.put("/api/v1/caps/queue/throttled", json={"concurrency": 5, "rate": "30/m"})
        assert capped.status_code == 200, capped.text

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(
                    ignore_https_errors=True, viewport={"width": 1280, "height": 800}
                )
                page = context.new_page()
                page.set_default_timeout(WAIT_MS)
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

                # log in with the admin key, through the form, from the keyboard
                page.goto(f"{broker.http}/")
                expect(page.get_by_label("API key")).to_be_focused()
                page.keyboard.type(broker.key or "")
                page.keyboard.press("Enter")
                expect(page.get_by_role("heading", name="Overview")).to_be_visible()
                expect(page.get_by_text("RuntimeError: boom")).to_be_visible()  # a failure
                expect(page.get_by_role("cell", name="connected", exact=True)).to_be_visible()
                expect(page.get_by_role("cell", name="paused", exact=True)).to_be_visible()
                expect(
                    page.get_by_role("cell", name="cap: 5 running, cap: 30/m", exact=True)
                ).to_be_visible()
                page.screenshot(path=str(tmp_path / "dashboard-1280x800.png"))

                # a task submitted elsewhere appears in the list, live (no reload)
                page.get_by_role("link", name="Tasks", exact=True).click()
                expect(page.get_by_role("heading", name="Tasks")).to_be_visible()
                page.evaluate("window.stillTheSamePage = true")
                page.locator("body[data-live=open]").wait_for(state="attached")
                made = api.post("/api/v1/tasks", json={"type": "sleep", "payload": 30})
                task_id = made.json()["id"]
                expect(page.get_by_role("link", name=f"task {task_id}")).to_be_visible()
                assert page.evaluate("window.stillTheSamePage") is True

                # the XSS type is text: visible as written, no element made, no dialog
                expect(page.get_by_role("cell", name=XSS_TYPE, exact=True)).to_be_visible()
                assert page.locator("main img").count() == 0

                # filter by type
                page.get_by_label("Type").fill("sleep")
                page.get_by_role("button", name="Apply filters").click()
                expect(page).to_have_url(f"{broker.http}/#/tasks?type=sleep")
                expect(page.get_by_role("link", name=f"task {task_id}")).to_be_visible()
                expect(page.get_by_role("cell", name="echo", exact=True)).to_have_count(0)

                # open it (keyboard), cancel it, retry it (each confirmed)
                page.get_by_role("link", name=f"task {task_id}").focus()
                page.keyboard.press("Enter")
                expect(page.get_by_role("heading", name=f"Task {task_id}")).to_be_visible()
                page.get_by_role("button", name="Cancel task").click()
                expect(page.get_by_role("dialog")).to_contain_text(f"Cancel task {task_id}?")
                page.keyboard.press("Escape")  # changed my mind: nothing happens
                expect(page.get_by_role("dialog")).to_be_hidden()
                assert api.get(f"/api/v1/tasks/{task_id}").json()["state"] != "cancelled"
                page.get_by_role("button", name="Cancel task").click()
                page.get_by_role("button", name="Confirm").click()
                expect(page.locator(".facts .state")).to_have_text("cancelled")
                assert api.get(f"/api/v1/tasks/{task_id}").json()["state"] == "cancelled"
                page.get_by_role("button", name="Retry task").click()
                page.get_by_role("button", name="Confirm").click()
                expect(page.locator(".facts .state")).to_have_text(PENDING_OR_RUNNING)
                assert api.get(f"/api/v1/tasks/{task_id}").json()["state"] in (
                    "pending",
                    "running",
                )

                # the XSS task's own page: type and payload as text
                page.goto(f"{broker.http}/#/tasks/{xss_id}")
                expect(page.locator(".facts")).to_contain_text(XSS_TYPE)
                expect(page.locator("pre.json")).to_contain_text(XSS_TYPE)
                assert page.locator("main img").count() == 0

                # bulk: retry every dead task, after a confirmation that counts them
                page.goto(f"{broker.http}/#/tasks?state=dead")
                expect(page.get_by_role("cell", name="RuntimeError: boom")).to_be_visible()
                page.get_by_role("button", name="Retry all matching…").click()
                expect(page.get_by_role("dialog")).to_contain_text("Retry 1 matching task(s)?")
                page.get_by_role("button", name="Confirm").click()
                expect(page.get_by_role("status")).to_contain_text("Retry: 1 done.")
                audit = api.get("/api/v1/audit", params={"limit": 20}).json()["entries"]
                retried = [e["target"] for e in audit if e["action"] == "task.retry"]
                assert failed.json()["id"] in retried

                # a phone-sized screen
                page.set_viewport_size({"width": 390, "height": 844})
                page.goto(f"{broker.http}/#/")
                expect(page.get_by_text("RuntimeError: boom")).to_be_visible()
                page.screenshot(path=str(tmp_path / "dashboard-390x844.png"))

                # a reader sees the tasks but no action
                reader = browser.new_context(ignore_https_errors=True).new_page()
                reader.set_default_timeout(WAIT_MS)
                reader.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                reader.goto(f"{broker.http}/")
                reader.get_by_label("API key").fill(reader_key)
                reader.get_by_role("button", name="Log in").click()
                expect(reader.get_by_text("(reader)")).to_be_visible()
                reader.goto(f"{broker.http}/#/tasks/{xss_id}")
                expect(reader.locator(".facts .state")).to_have_text("pending")
                assert reader.get_by_role("button").all_inner_texts() == ["Log out"]
                reader.goto(f"{broker.http}/#/tasks")
                expect(reader.get_by_role("link", name=f"task {xss_id}")).to_be_visible()
                buttons = reader.get_by_role("button").all_inner_texts()
                assert sorted(buttons) == ["Apply filters", "Log out"]
                expect(reader.get_by_role("link", name="Keys")).to_be_hidden()

                # the broker goes away: the page says so
                broker.stop()
                expect(page.locator("#banner")).to_be_visible()
                expect(page.locator("#banner")).to_contain_text("Disconnected")
            finally:
                browser.close()
    assert dialogs == []
    assert png_size(tmp_path / "dashboard-1280x800.png") == (1280, 800)
    assert png_size(tmp_path / "dashboard-390x844.png") == (390, 844)
