"""Settings from the environment (docs/rules.md §6). Read when asked for, never at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tally.domain.errors import ConfigurationInvalid

DEFAULT_DATABASE_URL: Final = "sqlite:///./var/tally.db"
WORKER_MODES: Final = ("inline", "off")
PAYMENTS: Final = ("sandbox", "gumroad", "stripe")
ENVS: Final = ("development", "production")
#: What each real processor needs before production may sell through it.
PROCESSOR_SETTINGS: Final = {
    "gumroad": (
        ("gumroad_webhook_token", "TALLY_GUMROAD_WEBHOOK_TOKEN"),
        ("gumroad_seller_id", "TALLY_GUMROAD_SELLER_ID"),
    ),
    "stripe": (
        ("stripe_webhook_secret", "TALLY_STRIPE_WEBHOOK_SECRET"),
        ("stripe_api_key", "TALLY_STRIPE_API_KEY"),
    ),
}


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    pool_size: int = 10
    #: The catalog file; None: ./tally.toml if present, else the built-in default.
    config_path: Path | None = None
    #: `inline`: `tally serve` runs the worker's jobs in-process; `off`: run `tally worker`.
    worker: str = "inline"
    #: `production` turns off development conveniences (the dev mailbox, a generated secret).
    env: str = "development"
    #: Keys the HMAC of redemption codes; generated into ./var/secret.key in development.
    secret_key: str = ""
    #: Where people reach Tally's pages (links in emails, the sandbox's own webhook).
    public_url: str = "http://127.0.0.1:8000"
    #: `sandbox` (the default), `gumroad` or `stripe`: where /checkout sends buyers.
    payments: str = "sandbox"
    smtp_url: str | None = None
    #: A PEM file of the CAs to trust for the SMTP server instead of the system's
    #: (TALLY_SMTP_CA_FILE), for a server whose certificate a private CA signed.
    smtp_ca_file: Path | None = None
    mail_from: str = "Tally <credits@localhost>"
    mailbox_dir: Path = Path("var/mailbox")
    gumroad_webhook_token: str = ""
    gumroad_seller_id: str = ""
    gumroad_access_token: str | None = None
    gumroad_api_base: str = "https://api.gumroad.com"
    stripe_webhook_secret: str = ""
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    #: Failed redemptions allowed per account and per client address per hour (rule 11).
    redeem_failures_per_hour: int = 10
    # --- lost codes and reconciliation
    #: /lost-code requests allowed per client address per hour (TALLY_LOST_CODE_PER_HOUR).
    lost_code_requests_per_hour: int = 5
    #: How often the worker asks the processors for sales Tally missed, in seconds
    #: (TALLY_RECONCILE_INTERVAL_SECONDS; default hourly, 0 turns the job off).
    reconcile_interval_seconds: int = 3600
    # --- rate limits that hold (rule 11; see service/limits.py)
    #: Failed redemptions and code look-ups per platform per hour, all its accounts and
    #: addresses together (TALLY_REDEEM_FAILURES_PER_PLATFORM_PER_HOUR).
    redeem_failures_per_platform_per_hour: int = 1000
    #: Failed redemptions on the public /redeem page per hour, all visitors together
    #: (TALLY_REDEEM_PAGE_FAILURES_PER_HOUR).
    redeem_page_failures_per_hour: int = 1000

    @classmethod
    def from_env(cls) -> Settings:
        worker = os.environ.get("TALLY_WORKER", "inline")
        if worker not in WORKER_MODES:
            raise ConfigurationInvalid(f"TALLY_WORKER is one of {', '.join(WORKER_MODES)}")
        config = os.environ.get("TALLY_CONFIG")
        smtp_ca_file = os.environ.get("TALLY_SMTP_CA_FILE")
        env = os.environ.get("TALLY_ENV", "development")
        payments = os.environ.get("TALLY_PAYMENTS", "sandbox")
        if payments not in PAYMENTS:
            raise ConfigurationInvalid(f"TALLY_PAYMENTS is one of {', '.join(PAYMENTS)}")
        return cls(
            database_url=os.environ.get("TALLY_DATABASE_URL") or DEFAULT_DATABASE_URL,
            pool_size=_number("TALLY_DB_POOL_SIZE", 10),
            config_path=Path(config) if config else None,
            worker=worker,
            env=env,
            secret_key=os.environ.get("TALLY_SECRET_KEY", ""),
            public_url=os.environ.get("TALLY_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/"),
            payments=payments,
            smtp_url=os.environ.get("TALLY_SMTP_URL") or None,
            smtp_ca_file=Path(smtp_ca_file) if smtp_ca_file else None,
            mail_from=os.environ.get("TALLY_MAIL_FROM", "Tally <credits@localhost>"),
            mailbox_dir=Path(os.environ.get("TALLY_MAILBOX_DIR", "var/mailbox")),
            gumroad_webhook_token=os.environ.get("TALLY_GUMROAD_WEBHOOK_TOKEN", ""),
            gumroad_seller_id=os.environ.get("TALLY_GUMROAD_SELLER_ID", ""),
            gumroad_access_token=os.environ.get("TALLY_GUMROAD_ACCESS_TOKEN") or None,
            gumroad_api_base=os.environ.get(
                "TALLY_GUMROAD_API_BASE", "https://api.gumroad.com"
            ).rstrip("/"),
            stripe_webhook_secret=os.environ.get("TALLY_STRIPE_WEBHOOK_SECRET", ""),
            stripe_api_key=os.environ.get("TALLY_STRIPE_API_KEY") or None,
            stripe_api_base=os.environ.get("TALLY_STRIPE_API_BASE") or None,
            redeem_failures_per_hour=_number("TALLY_REDEEM_FAILURES_PER_HOUR", 10),
            lost_code_requests_per_hour=_number("TALLY_LOST_CODE_PER_HOUR", 5),
            reconcile_interval_seconds=_number("TALLY_RECONCILE_INTERVAL_SECONDS", 3600, minimum=0),
            redeem_failures_per_platform_per_hour=_number(
                "TALLY_REDEEM_FAILURES_PER_PLATFORM_PER_HOUR", 1000
            ),
            redeem_page_failures_per_hour=_number("TALLY_REDEEM_PAGE_FAILURES_PER_HOUR", 1000),
        )

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def sandbox(self) -> bool:
        """Whether the sandbox runs: its checkout, its own webhook token, its local refunds.
        Never in production, whatever TALLY_PAYMENTS says."""
        return self.env == "development" and self.payments == "sandbox"

    def check(self) -> None:
        """Refuse settings Tally must not start with: ConfigurationInvalid naming every
        missing or wrong setting. Production sells only through a real processor, because
        the sandbox's checkout creates paid orders for anyone who asks."""
        if self.env not in ENVS:
            raise ConfigurationInvalid(
                f"TALLY_ENV is {' or '.join(ENVS)}, not {self.env[:40]!r}", setting="TALLY_ENV"
            )
        if self.payments not in PAYMENTS:
            raise ConfigurationInvalid(
                f"TALLY_PAYMENTS is one of {', '.join(PAYMENTS)}", setting="TALLY_PAYMENTS"
            )
        if not self.production:
            return
        missing: list[str] = [] if self.secret_key else ["TALLY_SECRET_KEY"]
        needs = list(missing)
        processor = PROCESSOR_SETTINGS.get(self.payments)
        if processor is None:
            missing.append("TALLY_PAYMENTS")
            needs.append("TALLY_PAYMENTS set to gumroad or stripe (the sandbox is for development)")
        else:
            absent = [name for field, name in processor if not getattr(self, field)]
            missing.extend(absent)
            if absent:
                needs.append(f"{' and '.join(absent)} for TALLY_PAYMENTS={self.payments}")
        if not self.smtp_url:
            # Without it codes land in files on the server's disk and no buyer gets one.
            missing.append("TALLY_SMTP_URL")
            needs.append("TALLY_SMTP_URL (codes reach buyers by email)")
        if missing:
            raise ConfigurationInvalid(
                f"TALLY_ENV=production needs {'; '.join(needs)}", missing=missing
            )


def _number(name: str, default: int, *, minimum: int = 1) -> int:
    """A whole number from the environment, at least `minimum` (a limit of 0 would refuse
    everyone): anything else stops start-up with the setting's name, never a traceback."""
    text = os.environ.get(name, str(default)).strip()
    if not text.isascii() or not text.isdigit() or int(text) < minimum:
        raise ConfigurationInvalid(
            f"{name} is a whole number of at least {minimum}, got {text[:40]!r}", setting=name
        )
    return int(text)
