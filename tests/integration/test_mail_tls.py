"""SMTP over TLS through a real aiosmtpd server: STARTTLS, smtps, certificates and AUTH.

The certificates come from a throwaway CA (trustme) that the client trusts only through
`SmtpSender(..., ca_file=...)`, which is what TALLY_SMTP_CA_FILE sets; no network needed.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme

from tally.adapters.mail import SmtpSender
from tally.service.ports import Email, MailRefused, MailTemporary
from tests.mailserver import Inbox, smtp_server

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
USER, PASSWORD = "tally@example.com", "s3cret:/@"  # URL-quoted in the URLs below
URL_LOGIN = "tally%40example.com:s3cret%3A%2F%40"
EMAIL = Email(
    "<ord_123.1@tally.test>",
    "Tally <credits@tally.test>",
    "ana@example.com",
    "Your credits",
    "Your code is ABCD-EFGH-JKMN-PQRS",
    "<p>Your code is ABCD-EFGH-JKMN-PQRS</p>",
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _server_context(ca: trustme.CA, host: str = "127.0.0.1") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    return context


@pytest.fixture
def starttls(ca: trustme.CA) -> Iterator[tuple[Inbox, int]]:
    """A submission server (port 587 style): STARTTLS required, then AUTH required."""
    with smtp_server(tls=_server_context(ca), login=(USER, PASSWORD)) as found:
        yield found


@pytest.fixture
def smtps(ca: trustme.CA) -> Iterator[tuple[Inbox, int]]:
    """An smtps server (port 465 style): TLS from the first byte, AUTH offered."""
    with smtp_server(tls=_server_context(ca), implicit_tls=True, login=(USER, PASSWORD)) as found:
        yield found


def test_smtp_upgrades_with_starttls_then_authenticates_with_the_url_credentials(
    starttls: tuple[Inbox, int], ca_file: Path
) -> None:
    inbox, port = starttls
    SmtpSender(f"smtp://{URL_LOGIN}@127.0.0.1:{port}", ca_file=ca_file).send(EMAIL, NOW)
    (received,) = inbox.messages
    assert received["Message-ID"] == "<ord_123.1@tally.test>"
    (version,) = inbox.tls_versions
    assert version is not None
    assert version.startswith("TLS")  # the server saw the message inside TLS
    assert inbox.logins == [USER]  # and AUTH, which aiosmtpd refuses over plain text


def test_smtps_speaks_tls_from_the_start_and_delivers(
    smtps: tuple[Inbox, int], ca_file: Path
) -> None:
    inbox, port = smtps
    SmtpSender(f"smtps://{URL_LOGIN}@127.0.0.1:{port}", ca_file=ca_file).send(EMAIL, NOW)
    (received,) = inbox.messages
    assert received["Message-ID"] == "<ord_123.1@tally.test>"
    (version,) = inbox.tls_versions
    assert version is not None
    assert version.startswith("TLS")
    assert inbox.logins == [USER]


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
@pytest.mark.parametrize(
    "trust", ["another CA", "the system's CAs", "a certificate for another host"]
)
def test_a_certificate_the_client_does_not_trust_sends_nothing_and_is_retried(
    scheme: str, trust: str, ca: trustme.CA, tmp_path: Path
) -> None:
    """An untrusted certificate (a misconfiguration, or someone in the middle) must never
    carry the message or the password. It raises MailTemporary, like an outage: the worker
    retries with backoff, so mail goes out once the operator fixes the certificate or
    TALLY_SMTP_CA_FILE, while the failures show in the worker's log."""
    ca_file: Path | None = tmp_path / "ca.pem"
    if trust == "another CA":
        trustme.CA().cert_pem.write_to_path(str(ca_file))
    elif trust == "the system's CAs":
        ca_file = None
    else:
        ca.cert_pem.write_to_path(str(ca_file))
    host = "mail.example.com" if trust == "a certificate for another host" else "127.0.0.1"
    server = smtp_server(
        tls=_server_context(ca, host), implicit_tls=scheme == "smtps", login=(USER, PASSWORD)
    )
    with server as (inbox, port):
        sender = SmtpSender(f"{scheme}://{URL_LOGIN}@127.0.0.1:{port}", ca_file=ca_file)
        with pytest.raises(MailTemporary, match="certificate verify failed"):
            sender.send(EMAIL, NOW)
        assert inbox.messages == []
        assert inbox.logins == []


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_wrong_credentials_are_refused_and_nothing_is_sent(
    scheme: str, ca: trustme.CA, ca_file: Path
) -> None:
    server = smtp_server(
        tls=_server_context(ca), implicit_tls=scheme == "smtps", login=(USER, PASSWORD)
    )
    with server as (inbox, port):
        sender = SmtpSender(f"{scheme}://{USER}:wrong@127.0.0.1:{port}", ca_file=ca_file)
        with pytest.raises(MailRefused, match="535"):
            sender.send(EMAIL, NOW)
        assert inbox.messages == []


def test_a_missing_ca_file_fails_when_the_sender_is_made(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SmtpSender("smtps://mail.example.com", ca_file=tmp_path / "missing.pem")
