"""Wire adapters from settings: the one place that knows which database and clock Tally uses."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from tally.adapters import catalog_file, payments, refunds
from tally.adapters.db.engine import Database, connect
from tally.adapters.db.uow import SqlUnitOfWork
from tally.adapters.mail import MailboxSender, SmtpSender, Templates
from tally.config import Settings
from tally.domain import codes
from tally.domain.catalog import Catalog
from tally.domain.errors import ConfigurationInvalid
from tally.service.group_commit import GroupCommit
from tally.service.issuing import Links
from tally.service.ports import Clock, Mailer, RefundGateway

SECRET_FILE = Path("var/secret.key")
#: The sandbox's stand-in for Gumroad's seller id, so its pings pass the same checks.
SANDBOX_SELLER_ID = "sandbox-seller"


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class Tally:
    settings: Settings
    database: Database
    clock: Clock
    group: GroupCommit
    catalog: Catalog
    secret_key: str = field(repr=False, default="")

    @cached_property
    def pepper(self) -> bytes:
        return codes.pepper(self.secret_key)

    @cached_property
    def links(self) -> Links:
        base = self.settings.public_url
        # The Message-ID's right side: the public host, or `localhost` for an address literal
        # such as `[::1]`, which makes no valid Message-ID domain.
        host = urlsplit(base).hostname or ""
        domain = host if host and ":" not in host else "localhost"
        return Links(
            redeem_url=f"{base}/redeem",
            lost_code_url=f"{base}/lost-code",
            mail_from=self.settings.mail_from,
            mail_domain=domain,
        )

    @cached_property
    def mailer(self) -> Mailer:
        if self.settings.smtp_url:
            return SmtpSender(self.settings.smtp_url, self.settings.smtp_ca_file)
        return MailboxSender(self.settings.mailbox_dir)

    @cached_property
    def templates(self) -> Templates:
        return Templates()

    @property
    def sandbox_token(self) -> str:
        """The path token of the sandbox's own pings to the Gumroad webhook, derived from the
        secret key; none when the sandbox is off (always in production)."""
        if not self.settings.sandbox:
            return ""
        mac = hmac.new(self.secret_key.encode(), b"sandbox webhook", hashlib.sha256)
        return mac.hexdigest()[:32]

    def webhook_processor(self, token: str) -> str | None:
        """Whose Gumroad-format ping this is, by the secret its path token matches (compared
        in constant time): `gumroad` for TALLY_GUMROAD_WEBHOOK_TOKEN, `sandbox` for the
        sandbox's own token, None for anything else. TALLY_PAYMENTS, which only says where
        checkout sends buyers, never decides it: a real sale is never a sandbox order."""
        gumroad = payments.matches_secret(token, self.settings.gumroad_webhook_token)
        sandbox = payments.matches_secret(token, self.sandbox_token)
        if gumroad:
            return "gumroad"
        return "sandbox" if sandbox else None

    def seller_id(self, processor: str) -> str:
        """The `seller_id` a ping to `processor` (from webhook_processor) must carry."""
        if processor == "gumroad":
            return self.settings.gumroad_seller_id
        return SANDBOX_SELLER_ID if processor == "sandbox" and self.settings.sandbox else ""

    # --- refunds and disputes
    @cached_property
    def refund_gateway(self) -> RefundGateway:
        """Where refunds go: each order is refunded by the processor that sold it."""
        return refunds.gateway(self.settings)

    def uow(self) -> SqlUnitOfWork:
        """A unit of work whose changes share transactions with concurrent ones."""
        return SqlUnitOfWork(self.database, self.clock, self.group)

    def close(self) -> None:
        self.database.dispose()


def group_commit(database: Database, clock: Clock) -> GroupCommit:
    """SQLite has one writer, so one batch at a time; on PostgreSQL two batches in flight
    overlap one's Python with the other's round trips (measured by bench/ledger.py)."""
    leaders = 2 if database.dialect == "postgresql" else 1
    return GroupCommit(lambda: SqlUnitOfWork(database, clock), max_leaders=leaders)


def bootstrap(settings: Settings | None = None, *, clock: Clock = system_clock) -> Tally:
    settings = settings or Settings.from_env()
    settings.check()
    database = connect(settings.database_url, pool_size=settings.pool_size)
    group = group_commit(database, clock)
    catalog = catalog_file.load(settings.config_path)
    return Tally(settings, database, clock, group, catalog, secret_key(settings))


def secret_key(settings: Settings) -> str:
    """TALLY_SECRET_KEY; in development, one generated once into ./var/secret.key."""
    if settings.secret_key:
        return settings.secret_key
    if settings.production:
        raise ConfigurationInvalid("TALLY_ENV=production needs TALLY_SECRET_KEY")
    if not SECRET_FILE.exists():
        SECRET_FILE.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first
            fd = os.open(SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(32))
    return SECRET_FILE.read_text().strip()
