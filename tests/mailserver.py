"""A real SMTP server for tests (aiosmtpd on a free local port) that keeps what it receives."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from tests.support import free_port


class Inbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.refuse = False  # answer 550, as a server that will not take the message

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.refuse:
            return "550 mailbox unavailable"
        parsed = message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 20) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} emails arrived"
            time.sleep(0.1)
        return self.messages


@contextmanager
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    """(the inbox, the port) of an SMTP server that runs until the block ends."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()
