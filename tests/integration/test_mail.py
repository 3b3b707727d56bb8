"""Email through a real SMTP server (aiosmtpd) and the dev mailbox."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tally.adapters.mail import MailboxSender, SmtpSender, Templates
from tally.service.ports import Email, MailRefused, MailTemporary
from tests.mailserver import Inbox, smtp_server
from tests.support import free_port

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
CONTEXT = {
    "package_name": "Pro",
    "credits": 25,
    "expires_at": "2028-11-21",
    "code": "ABCD-EFGH-JKMN-PQRS",
    "redeem_url": "http://127.0.0.1:8000/redeem",
    "lost_code_url": "http://127.0.0.1:8000/lost-code",
    "order_number": "ord_123",
    "gifter_email": "giver@example.com",
}


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    with smtp_server() as found:
        yield found


def _email(kind: str = "purchase_code") -> Email:
    text, html = Templates().render(kind, "Your credits", CONTEXT)
    return Email(
        "<ord_123.1@tally.test>",
        "Tally <credits@tally.test>",
        "ana@example.com",
        "Your credits",
        text,
        html,
    )


@pytest.mark.parametrize("kind", ["purchase_code", "gift_code", "replacement_code"])
def test_each_template_says_credits_validity_code_and_how_to_redeem(kind: str) -> None:
    text, html = Templates().render(kind, "Subject", CONTEXT)
    for part in (text, html):
        assert "25 credits" in part
        assert "2028-11-21" in part
        assert "ABCD-EFGH-JKMN-PQRS" in part
        assert "http://127.0.0.1:8000/redeem" in part
    if kind == "gift_code":
        assert "giver@example.com" in text


def test_html_is_escaped() -> None:
    _, html = Templates().render("gift_code", "S", {**CONTEXT, "gifter_email": "<b>x</b>"})
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;" in html


def test_smtp_delivers_text_and_html_with_the_stable_message_id(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    SmtpSender(f"smtp://127.0.0.1:{port}").send(_email(), NOW)
    (received,) = inbox.messages
    assert received["Message-ID"] == "<ord_123.1@tally.test>"
    assert received["To"] == "ana@example.com"
    body = received.get_body(("plain",))
    assert body is not None
    assert "ABCD-EFGH-JKMN-PQRS" in body.get_content()
    assert received.get_body(("html",)) is not None


def test_a_refusal_is_final_and_an_outage_is_temporary(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    inbox.refuse = True
    with pytest.raises(MailRefused):
        SmtpSender(f"smtp://127.0.0.1:{port}").send(_email(), NOW)
    with pytest.raises(MailTemporary):
        SmtpSender(f"smtp://127.0.0.1:{free_port()}").send(_email(), NOW)


def test_smtp_urls_are_checked() -> None:
    assert SmtpSender("smtps://u%40x:p@mail.example.com").port == 465
    sender = SmtpSender("smtp://user:secret@mail.example.com:587")
    assert (sender.host, sender.port, sender.user, sender.password) == (
        "mail.example.com",
        587,
        "user",
        "secret",
    )
    with pytest.raises(ValueError, match="TALLY_SMTP_URL"):
        SmtpSender("http://mail.example.com")


def test_the_dev_mailbox_keeps_one_file_per_message(tmp_path: Path) -> None:
    mailbox = MailboxSender(tmp_path / "mailbox")
    mailbox.send(_email(), NOW)
    mailbox.send(_email(), NOW)  # a resend of the same message replaces it
    (message,) = mailbox.messages()
    assert message["Message-ID"] == "<ord_123.1@tally.test>"
