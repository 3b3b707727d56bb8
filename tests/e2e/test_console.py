"""The support console in a real browser (Chromium driven by Playwright) against a real
`tally serve`: a staff member made by `tally staff create`, an order bought through the sandbox
checkout, then sign-in, search by email, reissue and refund from the order page, and the
defences: redirects without a session, cookie flags, one answer for a wrong password, the
sign-in rate limit, and a cross-site form post refused with 403 and no effect."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tally.service import staff
from tests.conftest import DATABASES
from tests.e2e.server import TALLY, Server, running
from tests.e2e.test_browser import browser  # noqa: F401 (the Chromium fixture)
from tests.support import free_port

EMAIL = "sam@support.example"
PASSWORD = "correct horse battery"
BUYER = "buyer@example.com"


@pytest.fixture(scope="module", params=DATABASES)
def console(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("console")
    env = {"TALLY_SECRET_KEY": "console-secret", "TALLY_MAILBOX_DIR": str(directory / "mail")}
    with running(request.param, directory, env=env, port=free_port()) as server:
        made = subprocess.run(
            [TALLY, "staff", "create", EMAIL, "--password-stdin"],
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            env=server.env,
            cwd=server.directory,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        assert "stf_" in made.stdout
        again = subprocess.run(
            [TALLY, "staff", "create", EMAIL, "--password-stdin"],
            input="short\n",
            capture_output=True,
            text=True,
            env=server.env,
            cwd=server.directory,
            timeout=60,
            check=False,
        )
        assert again.returncode == 1
        assert "invalid_input" in again.stderr  # 12 characters at least, checked first
        yield server


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


def _sign_in(page: Page, server: Server, password: str = PASSWORD, email: str = EMAIL) -> None:
    page.goto(f"{server.base_url}/admin/sign-in")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("#sign-in")


def _buy(page: Page, server: Server, email: str) -> None:
    page.goto(f"{server.base_url}/checkout/popular")
    page.fill("#email", email)
    page.click("#pay")
    expect(page.locator("#paid")).to_contain_text(email)


@pytest.mark.slow
def test_sign_in_find_an_order_by_email_reissue_its_code_and_refund_it(
    console: Server, page: Page
) -> None:
    _buy(page, console, BUYER)

    page.goto(f"{console.base_url}/admin")  # no session: to the sign-in page, and back after
    expect(page).to_have_url(f"{console.base_url}/admin/sign-in?next=%2Fadmin")
    _sign_in(page, console, password="not the password")
    expect(page.locator("#error")).to_have_text("The email or the password is wrong.")
    _sign_in(page, console)
    expect(page).to_have_url(f"{console.base_url}/admin")
    expect(page.locator("#who")).to_have_text(EMAIL)
    expect(page.locator("#chart")).to_be_visible()
    expect(page.locator("#chart-table tbody tr")).to_have_count(staff.CHART_DAYS)

    session = next(c for c in page.context.cookies() if c["name"] == "tally_admin_session")
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["path"] == "/admin"
    assert session["secure"] is False  # plain http here; https or production sets it

    page.fill("#q", BUYER.upper())
    page.click("#search")
    expect(page.locator("h1")).to_contain_text("Order")
    expect(page.locator("#status")).to_have_text("fulfilled")
    expect(page.locator("#code")).to_contain_text("issued")
    expect(page.locator("#emails")).to_contain_text("purchase_code")
    old_last4 = page.locator("#code").inner_text().split()[0]

    page.fill("#reissue-reason", "the buyer lost the email")
    page.click("#reissue button")
    expect(page.locator("#done")).to_contain_text("A new code was issued")
    expect(page.locator("#codes")).to_contain_text("void")
    expect(page.locator("#emails")).to_contain_text("replacement_code")
    assert page.locator("#code").inner_text().split()[0] != old_last4

    page.fill("#refund-reason", "asked within 30 days")
    page.click("#refund button")
    expect(page.locator("#done")).to_have_text("Order refunded.")
    expect(page.locator("#status")).to_have_text("refunded")
    expect(page.locator("#code")).to_contain_text("void")

    page.fill("#refund-reason", "again")  # a refusal is a readable message, not a 500
    page.click("#refund button")
    expect(page.locator("#error")).to_contain_text("already_refunded")

    page.click("#sign-out")
    expect(page).to_have_url(f"{console.base_url}/admin/sign-in")
    page.goto(f"{console.base_url}/admin/orders/ord_00000000000000000000000000")
    expect(page).to_have_url(
        f"{console.base_url}/admin/sign-in?next=%2Fadmin%2Forders%2Ford_00000000000000000000000000"
    )


class _Attacker(BaseHTTPRequestHandler):
    """Another origin's page: a form that posts to the console, without the CSRF token."""

    target = ""

    def do_GET(self) -> None:
        body = (
            "<!doctype html><html><body>"
            f'<form id="attack" method="post" action="{self.target}">'
            '<input type="hidden" name="amount" value="1000">'
            '<input type="hidden" name="reason" value="free credits">'
            '<input type="hidden" name="key" value="attack-1">'
            '<button type="submit" id="go">Win a prize</button></form></body></html>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.slow
def test_a_cross_site_form_post_without_the_token_is_refused_and_changes_nothing(
    console: Server, page: Page, tmp_path: Path
) -> None:
    console.cli("grant", "victim", "5", "--reason", "stock")
    _sign_in(page, console)
    expect(page.locator("#who")).to_have_text(EMAIL)
    target = f"{console.base_url}/admin/accounts/victim/grant"

    _Attacker.target = target
    attacker = ThreadingHTTPServer(("127.0.0.1", free_port()), _Attacker)
    thread = threading.Thread(target=attacker.serve_forever, daemon=True)
    thread.start()
    try:
        # Another port is another origin but the same site: the Strict cookie is sent, so
        # the origin check and the token are what refuse it.
        page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
        with page.expect_response(target) as posted:
            page.click("#go")
        assert posted.value.status == 403
        expect(page.locator("#error")).to_contain_text("csrf_rejected")
    finally:
        attacker.shutdown()
        attacker.server_close()
        thread.join()

    # The signed-in browser's own cookie, no token: refused as well.
    answer = page.context.request.post(
        target, form={"amount": "1000", "reason": "free", "key": "attack-2"}
    )
    assert answer.status == 403

    page.goto(f"{console.base_url}/admin/accounts/victim")
    expect(page.locator("#available")).to_have_text("5")
    expect(page.locator("#journal tbody tr")).to_have_count(1)


@pytest.mark.slow
def test_sign_in_is_rate_limited_after_five_failures(console: Server, page: Page) -> None:
    guessed = "nobody@support.example"  # the limit holds for unknown emails too
    for _ in range(staff.SIGN_IN_ATTEMPTS_PER_EMAIL):
        _sign_in(page, console, password="wrong wrong wrong", email=guessed)
        expect(page.locator("#error")).to_have_text("The email or the password is wrong.")
    with page.expect_response(lambda r: r.request.method == "POST") as answered:
        _sign_in(page, console, password="wrong wrong wrong", email=guessed)
    assert answered.value.status == 429
    assert int(answered.value.headers["retry-after"]) > 0
    expect(page.locator("h1")).to_have_text("Too many attempts")
    expect(page.locator("#retry")).to_contain_text("seconds")
