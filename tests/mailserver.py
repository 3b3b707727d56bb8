"""A real SMTP server for tests (aiosmtpd on a free local port) that keeps what it receives."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support import free_port


class Inbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.refuse = False  # answer 550, as a server that will not take the message
        #: Per message: the TLS version of the session that carried it (None: plain text)
        #: and the user it authenticated as (None: no AUTH).
        self.tls_versions: list[str | None] = []
        self.logins: list[str | None] = []
        #: Per message: the envelope's recipients (RCPT TO), as the server was told them.
        self.recipients: list[list[str]] = []
        #: Addresses refused at RCPT TO, with the answer to give ("550 5.1.1 ...": no such
        #: mailbox; "451 ...": greylisted).
        self.refuse_recipients: dict[str, str] = {}

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse_recipients:
            return self.refuse_recipients[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refuse:
            return "550 mailbox unavailable"
        parsed = message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.recipients.append(list(envelope.rcpt_tos))
        assert server.transport is not None
        tls = server.transport.get_extra_info("ssl_object")
        self.tls_versions.append(tls.version() if tls is not None else None)
        login = session.auth_data if session.authenticated else None
        self.logins.append(login.login.decode() if isinstance(login, LoginPassword) else None)
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 20) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} emails arrived"
            time.sleep(0.1)
        return self.messages


class Credentials:
    """An aiosmtpd authenticator that knows one user; anything else gets 535."""

    def __init__(self, user: str, password: str) -> None:
        self.login = LoginPassword(user.encode(), password.encode())

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        # handled=False: aiosmtpd itself answers a failure, with 535
        return AuthResult(success=data == self.login, handled=False, auth_data=data)


@contextmanager
def smtp_server(
    *,
    tls: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    login: tuple[str, str] | None = None,
) -> Iterator[tuple[Inbox, int]]:
    """(the inbox, the port) of an SMTP server that runs until the block ends.

    With `tls` (a server context), it offers STARTTLS and refuses mail until the client
    upgrades, or with `implicit_tls` speaks TLS from the first byte (smtps). With `login`
    (user, password), AUTH is required and, as aiosmtpd does by default, refused over plain
    text; aiosmtpd counts only STARTTLS as TLS, so with implicit TLS AUTH is offered but
    not required."""
    inbox = Inbox()
    port = free_port()
    options: dict[str, Any] = {}
    if tls is not None and implicit_tls:
        options["ssl_context"] = tls
    elif tls is not None:
        options.update(tls_context=tls, require_starttls=True)
    if login is not None:
        options.update(authenticator=Credentials(*login), auth_required=not implicit_tls)
        if implicit_tls:
            options["auth_require_tls"] = False
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()
