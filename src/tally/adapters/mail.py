"""Email: templates rendered with Jinja2, sent over SMTP or dropped in the local dev mailbox.

`SmtpSender` speaks to any SMTP server named by `TALLY_SMTP_URL` (`smtp://user:pass@host:587`
upgrades with STARTTLS when the server offers it; `smtps://host:465` is TLS from the start).
The server's certificate is always verified, against the system's CAs or, when
`TALLY_SMTP_CA_FILE` names a PEM file, against that file's CAs only (a private mail server).
`MailboxSender` writes each message as an .eml file under ./var/mailbox, the page
`/dev/mailbox` shows them. Both raise `MailTemporary` (retry later) or `MailRefused` (do not).

Each message goes to exactly one address: the stored one, parsed by the email package as one
bare addr-spec (`recipient`), given to the server as the only envelope recipient and written
into the headers by the `email` policy, never as raw text. A display name, a list, a comment or
a line break in stored data refuses that message; it can never add a recipient or a header.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import ssl
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from tally.service.ports import Email, MailRefused, MailTemporary

TEMPLATES: Final = ("purchase_code", "gift_code", "replacement_code", "refund")
SMTP_TIMEOUT_SECONDS: Final = 30
MAILBOX_LIST_MAX: Final = 200
_MESSAGE_ID: Final = re.compile(r"<[A-Za-z0-9._-]{1,100}@[A-Za-z0-9.-]{1,100}>")


def recipient(address: str) -> Address:
    """The one address a message goes to. Anything but a single bare addr-spec, exactly as
    stored (a display name, a comma list, a comment, CR or LF, surrounding spaces), is
    refused for good: the message fails, and nothing is guessed from it."""
    try:
        parsed = Address(addr_spec=address)
    except Exception as error:  # the email package raises several kinds on malformed input
        raise MailRefused(f"unusable recipient address {address!r}: {error}") from error
    if parsed.addr_spec != address or not parsed.domain:
        raise MailRefused(f"unusable recipient address {address!r}: not one bare address")
    return parsed


def mime(email: Email, now: datetime) -> EmailMessage:
    """The message for `email`, with every header built by the email package's policy, which
    refuses CR and LF in a value instead of letting it start a header of its own."""
    if not _MESSAGE_ID.fullmatch(email.message_id):
        raise MailRefused(f"unusable Message-ID {email.message_id!r}")
    message = EmailMessage(policy=policy.default)
    message["Message-ID"] = email.message_id
    message["Date"] = format_datetime(now.astimezone(UTC))
    message["From"] = email.sender
    message["To"] = recipient(email.to)
    message["Subject"] = " ".join(email.subject.split())  # one line, whatever it held
    message.set_content(email.text)
    message.add_alternative(email.html, subtype="html")
    return message


class Templates:
    """The three messages of docs/rules.md §4 (a code, a gift, a replacement), in text and HTML."""

    def __init__(self) -> None:
        self._env = Environment(
            loader=PackageLoader("tally", "templates/email"),
            autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
            undefined=StrictUndefined,  # a missing value is a bug, not a blank in an email
            keep_trailing_newline=True,
        )

    def render(self, kind: str, subject: str, context: dict[str, Any]) -> tuple[str, str]:
        """(text, html) of one message."""
        assert kind in TEMPLATES, kind
        values = {**context, "subject": subject}
        text = self._env.get_template(f"{kind}.txt.j2").render(values)
        html = self._env.get_template(f"{kind}.html.j2").render(values)
        return text, html


class SmtpSender:
    def __init__(self, url: str, ca_file: Path | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("TALLY_SMTP_URL is smtp://[user:pass@]host[:port] or smtps://...")
        self.tls = parts.scheme == "smtps"
        self.host = parts.hostname
        self.port = parts.port or (465 if self.tls else 25)
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        # Made once: a missing or unreadable CA file is a configuration error, not a retry.
        self.context = ssl.create_default_context(cafile=ca_file)

    def send(self, email: Email, now: datetime) -> None:
        context = self.context
        message = mime(email, now)  # MailRefused before any connection when it cannot be sent
        to = recipient(email.to).addr_spec
        sender = _sender(message)
        try:
            if self.tls:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=SMTP_TIMEOUT_SECONDS, context=context
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=SMTP_TIMEOUT_SECONDS)
            with smtp:
                smtp.ehlo()
                if not self.tls and smtp.has_extn("starttls"):
                    smtp.starttls(context=context)
                    smtp.ehlo()
                if self.user is not None:
                    smtp.login(self.user, self.password or "")
                # The envelope names the one recipient itself: smtplib would otherwise take
                # every address it finds in the To, Cc and Bcc headers.
                smtp.send_message(message, from_addr=sender, to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as error:
            # The server refused the recipient at RCPT: 5xx is for good (no such mailbox),
            # 4xx is for now (greylisting, a full mailbox).
            answers = list(error.recipients.values())
            reason = "; ".join(f"{code} {_text(words)}" for code, words in answers)
            if answers and all(500 <= code < 600 for code, _ in answers):
                raise MailRefused(f"recipient refused: {reason}") from error
            raise MailTemporary(f"recipient refused for now: {reason}") from error
        except smtplib.SMTPNotSupportedError as error:
            raise MailRefused(f"the mail server cannot carry this address: {error}") from error
        except smtplib.SMTPResponseException as error:
            answer = f"{error.smtp_code} {_text(error.smtp_error)}"
            if 500 <= error.smtp_code < 600:
                raise MailRefused(answer) from error
            raise MailTemporary(answer) from error
        except (smtplib.SMTPException, OSError) as error:
            raise MailTemporary(str(error)[:200]) from error


class MailboxSender:
    """The development mailbox: one .eml file per message, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(self, email: Email, now: datetime) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = _file_name(email.message_id)
        partial = self.directory / f".{name}.tmp"
        partial.write_bytes(mime(email, now).as_bytes(policy=policy.SMTP))
        os.replace(partial, self.directory / name)  # a resend replaces, never duplicates

    def messages(self) -> list[EmailMessage]:
        """Newest first."""
        if not self.directory.exists():
            return []
        files = sorted(self.directory.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True)
        parser = BytesParser(policy=policy.default)
        found = []
        for path in files[:MAILBOX_LIST_MAX]:
            with contextlib.suppress(OSError):
                message = parser.parsebytes(path.read_bytes())
                assert isinstance(message, EmailMessage)
                found.append(message)
        return found


def _sender(message: EmailMessage) -> str:
    """The envelope sender: the From header's one address (TALLY_MAIL_FROM)."""
    found = message["From"].addresses
    if len(found) != 1 or not found[0].addr_spec:
        raise MailRefused("TALLY_MAIL_FROM must name one address")
    return str(found[0].addr_spec)


def _text(words: bytes | str) -> str:
    """A server's answer as text, one line."""
    text = words.decode("utf-8", "replace") if isinstance(words, bytes) else str(words)
    return " ".join(text.split())[:200]


def _file_name(message_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", message_id.strip("<>")) + ".eml"
