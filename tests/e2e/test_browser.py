"""The sandbox purchase in a real browser (Chromium driven by Playwright): choose a package,
pay, open the mailbox, redeem the code, see the credits."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.conftest import DATABASES
from tests.e2e.server import running
from tests.support import free_port, require_service

CHROMIUM = os.environ.get("TALLY_TEST_CHROMIUM") or shutil.which("chromium")
CODE = re.compile(r"[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_service(
        "Chromium is not installed (Debian package `chromium`, or TALLY_TEST_CHROMIUM)"
        if CHROMIUM is None
        else None
    )
    assert CHROMIUM is not None
    with sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield found
        finally:
            found.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", DATABASES)
def test_buy_in_the_sandbox_read_the_mail_and_redeem(
    browser: Browser, kind: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "TALLY_WORKER": "inline",
        "TALLY_SECRET_KEY": "browser-secret",
        "TALLY_MAILBOX_DIR": str(tmp_path / "mailbox"),
    }
    with running(kind, tmp_path, env=env, port=port) as server:
        page = browser.new_page()
        page.goto(f"{server.base_url}/checkout/popular")
        expect(page.locator("h1")).to_contain_text("Popular")
        page.fill("#email", "reader@example.com")
        page.click("#pay")
        expect(page.locator("#paid")).to_contain_text("reader@example.com")

        page.click("#mailbox")
        for _ in range(100):  # the worker sends within a couple of seconds
            if page.locator("article.message").count():
                break
            page.wait_for_timeout(200)
            page.reload()
        message = page.locator("article.message").first
        expect(message).to_contain_text("10 credits")
        found = CODE.search(message.inner_text())
        assert found, message.inner_text()

        page.goto(f"{server.base_url}/redeem")
        page.fill("#code", found.group(0).lower())
        page.fill("#account", "reader@example.com")
        page.click("button[type=submit]")
        expect(page.locator("#result")).to_contain_text("10 credits")
        expect(page.locator("#available")).to_have_text("10")

        page.goto(f"{server.base_url}/redeem")  # the same code again: one generic answer
        page.fill("#code", found.group(0))
        page.fill("#account", "someone@example.com")
        page.click("button[type=submit]")
        expect(page.locator("#error")).to_contain_text("not valid or was used")
        page.close()
