"""Email through a real SMTP server (aiosmtpd) and the dev mailbox."""

from __future__ import annotations

import dataclasses
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


def test_the_envelope_names_exactly_the_one_stored_address(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    SmtpSender(f"smtp://127.0.0.1:{port}").send(_email(), NOW)
    assert inbox.recipients == [["ana@example.com"]]
    (received,) = inbox.messages
    assert received["To"] == "ana@example.com"
    assert received["Cc"] is None
    assert received["Bcc"] is None


@pytest.mark.parametrize(
    "address",
    [
        "ana@example.com, eve@evil.example",  # a list
        "ana@example.com;eve@evil.example",
        "Ana <eve@evil.example>",  # a display name naming another mailbox
        "eve@evil.example (ana@example.com)",  # a comment
        "ana@example.com\r\nBcc: eve@evil.example",  # a header injection
        "ana@example.com\nBcc: eve@evil.example",
        "ana@example.com\r\n\r\nforged body",
        " ana@example.com",
        "ana@",
        "",
    ],
)
def test_an_unusable_address_refuses_the_message_and_sends_nothing(
    smtp: tuple[Inbox, int], tmp_path: Path, address: str
) -> None:
    inbox, port = smtp
    email = dataclasses.replace(_email(), to=address)
    with pytest.raises(MailRefused, match="unusable recipient address"):
        SmtpSender(f"smtp://127.0.0.1:{port}").send(email, NOW)
    with pytest.raises(MailRefused, match="unusable recipient address"):
        MailboxSender(tmp_path / "mailbox").send(email, NOW)
    assert inbox.messages == []
    assert inbox.recipients == []
    assert MailboxSender(tmp_path / "mailbox").messages() == []


def test_a_line_break_in_the_subject_cannot_start_a_header(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    email = dataclasses.replace(_email(), subject="Your credits\r\nBcc: eve@evil.example")
    SmtpSender(f"smtp://127.0.0.1:{port}").send(email, NOW)
    (received,) = inbox.messages
    assert received["Subject"] == "Your credits Bcc: eve@evil.example"
    assert received["Bcc"] is None
    assert inbox.recipients == [["ana@example.com"]]


def test_a_recipient_refused_with_550_is_final(
    smtp: tuple[Inbox, int],
) -> None:
    inbox, port = smtp
    inbox.refuse_recipients["ana@example.com"] = "550 5.1.1 no such mailbox here"
    sender = SmtpSender(f"smtp://127.0.0.1:{port}")
    with pytest.raises(MailRefused) as refused:
        sender.send(_email(), NOW)
    assert str(refused.value) == "recipient refused: 550 5.1.1 no such mailbox here"
    assert inbox.messages == []


def test_a_refusal_at_rcpt_that_is_temporary_is_retried(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    inbox.refuse_recipients["ana@example.com"] = "451 4.7.1 greylisted, come back later"
    with pytest.raises(MailTemporary) as later:
        SmtpSender(f"smtp://127.0.0.1:{port}").send(_email(), NOW)
    assert str(later.value) == "recipient refused for now: 451 4.7.1 greylisted, come back later"
    del inbox.refuse_recipients["ana@example.com"]
    SmtpSender(f"smtp://127.0.0.1:{port}").send(_email(), NOW)
    assert inbox.recipients == [["ana@example.com"]]
