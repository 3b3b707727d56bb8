"""Tables. The database holds every rule it can hold: CHECKs on amounts and states, unique keys
for idempotency and journal order, foreign keys, and triggers that keep the journal append-only.

All of one account's rows carry `account_id`, so a PostgreSQL-compatible distributed SQL engine
can partition by it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator

from tally.domain.commerce import CodeStatus, OrderStatus
from tally.domain.model import MAX_PENDING_HOLDS, SOURCES, EntryType, HoldStatus


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. PostgreSQL stores `timestamptz`; SQLite stores naive UTC
    text, which sorts and compares correctly because every value has the same form."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert value.tzinfo is not None, "naive datetimes are refused at the edges"
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Json = JSON().with_variant(JSONB(), "postgresql")
ID = String(40)


def _in(column: str, values: tuple[str, ...] | list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

accounts = Table(
    "accounts",
    metadata,
    Column("account_id", String(128), primary_key=True),
    Column("email", String(320)),
    Column("debt", BigInteger, nullable=False, server_default="0"),
    Column("entry_seq", BigInteger, nullable=False, server_default="0"),
    Column("pending_holds", Integer, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint("debt >= 0", name="debt_not_negative"),
    CheckConstraint(
        f"pending_holds BETWEEN 0 AND {MAX_PENDING_HOLDS}", name="pending_holds_within_limit"
    ),
    CheckConstraint("entry_seq >= 0", name="entry_seq_not_negative"),
)

lots = Table(
    "lots",
    metadata,
    Column("lot_id", ID, primary_key=True),
    Column("account_id", String(128), ForeignKey("accounts.account_id"), nullable=False),
    Column("source", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("remaining", BigInteger, nullable=False),
    # remaining > 0, kept as its own column so the open-lot indexes do not name `remaining`:
    # a spend then updates `remaining` alone and leaves the indexes untouched (fewer pages per
    # commit on SQLite, HOT updates on PostgreSQL). The CHECK keeps the two in step.
    Column("is_open", Boolean(create_constraint=False), nullable=False),
    Column("expires_at", UTCDateTime),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime, nullable=False),
    Column("voided_at", UTCDateTime),
    Column("reason", Text),
    Column("metadata", Json),
    # The platform that granted it (null: Tally itself); its metadata is shown only to it.
    Column("platform_id", String(64)),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("remaining BETWEEN 0 AND amount", name="remaining_within_amount"),
    CheckConstraint("is_open = (remaining > 0)", name="open_iff_remaining"),
    CheckConstraint("voided_at IS NULL OR remaining = 0", name="void_lot_is_empty"),
    CheckConstraint("expires_at IS NULL OR expires_at > created_at", name="expires_after_created"),
    CheckConstraint(_in("source", SOURCES), name="source_known"),
    Index("ix_lots_account_id", "account_id"),
    # Open lots are what spending and balances read: keep that read independent of history.
    Index(
        "ix_lots_open",
        "account_id",
        sqlite_where=text("is_open = 1"),
        postgresql_where=text("is_open"),
    ),
    Index(
        "ix_lots_due",
        "expires_at",
        sqlite_where=text("is_open = 1"),
        postgresql_where=text("is_open"),
    ),
)

holds = Table(
    "holds",
    metadata,
    Column("hold_id", ID, primary_key=True),
    Column("account_id", String(128), ForeignKey("accounts.account_id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("captured", BigInteger, nullable=False, server_default="0"),
    Column("status", String(16), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("metadata", Json),
    Column("tool", String(64)),
    Column("quantity", BigInteger),
    # The platform that placed it (null: Tally itself): the only one that may capture or
    # release it.
    Column("platform_id", String(64)),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("captured BETWEEN 0 AND amount", name="captured_within_amount"),
    CheckConstraint("quantity IS NULL OR quantity > 0", name="quantity_positive"),
    CheckConstraint(_in("status", [s.value for s in HoldStatus]), name="status_known"),
    CheckConstraint(
        "(status = 'captured' AND captured > 0) OR (status <> 'captured' AND captured = 0)",
        name="captured_iff_status",
    ),
    Index(
        "ix_holds_pending",
        "account_id",
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
    Index(
        "ix_holds_due",
        "expires_at",
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
)

hold_allocations = Table(
    "hold_allocations",
    metadata,
    Column("hold_id", ID, ForeignKey("holds.hold_id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("lot_id", ID, ForeignKey("lots.lot_id"), nullable=False),
    Column("account_id", String(128), nullable=False),
    Column("amount", BigInteger, nullable=False),
    PrimaryKeyConstraint("hold_id", "position"),
    UniqueConstraint("hold_id", "lot_id"),
    CheckConstraint("amount > 0", name="amount_positive"),
)

_LOT_TYPES = ("grant", "hold", "release", "capture", "debit", "expire", "void")
entries = Table(
    "entries",
    metadata,
    Column("entry_id", ID, primary_key=True),
    Column("account_id", String(128), ForeignKey("accounts.account_id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("type", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("lot_id", ID, ForeignKey("lots.lot_id")),
    Column("hold_id", ID, ForeignKey("holds.hold_id")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("idempotency_key", String(255)),
    Column("platform_id", String(64)),
    Column("reason", Text),
    Column("metadata", Json),
    UniqueConstraint("account_id", "seq"),
    CheckConstraint("seq > 0", name="seq_positive"),
    CheckConstraint(_in("type", [t.value for t in EntryType]), name="type_known"),
    CheckConstraint(
        "amount > 0 OR (type = 'adjustment' AND amount <> 0)", name="amount_sign_by_type"
    ),
    CheckConstraint(f"NOT ({_in('type', _LOT_TYPES)}) OR lot_id IS NOT NULL", name="needs_lot"),
    CheckConstraint(
        "NOT (type IN ('hold', 'release', 'capture')) OR hold_id IS NOT NULL", name="needs_hold"
    ),
    Index(
        "ix_entries_hold_id",
        "hold_id",
        sqlite_where=text("hold_id IS NOT NULL"),
        postgresql_where=text("hold_id IS NOT NULL"),
    ),
    # SQLite: the primary key is the table (one B-tree, not a rowid table plus an index), so a
    # journal append dirties one page fewer. Entry ids are time-ordered: appends stay at the end.
    sqlite_with_rowid=False,
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(64), nullable=False),
    Column("key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("response", Json, nullable=False),
    Column("account_id", String(128)),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("scope", "key"),
    sqlite_with_rowid=False,
)

# --- platforms and their API keys -----------------------------------------------------------------

platforms = Table(
    "platforms",
    metadata,
    Column("platform_id", ID, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("prefix", String(32), primary_key=True),
    Column("platform_id", ID, ForeignKey("platforms.platform_id"), nullable=False, index=True),
    # SHA-256 of the whole key; the plaintext is never stored.
    Column("digest", String(64), nullable=False),
    Column("scopes", String(100), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
    CheckConstraint("length(digest) = 64", name="digest_is_sha256"),
)


# --- commerce: orders, codes, the outbox ----------------------------------------------------------

orders = Table(
    "orders",
    metadata,
    Column("order_id", ID, primary_key=True),
    Column("processor", String(16), nullable=False),
    Column("sale_id", String(128), nullable=False),
    Column("order_number", String(128), nullable=False),
    Column("package_id", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("credits", BigInteger, nullable=False),  # drawn once for a surprise pack
    Column("price", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("validity", String(64), nullable=False),  # the package's, as sold
    Column("expires_at", UTCDateTime),  # purchase date + validity; null: never
    Column("email", String(320), nullable=False),
    Column("gifter_email", String(320)),
    Column("is_test", Boolean(create_constraint=False), nullable=False),
    Column("status", String(16), nullable=False),
    Column("purchased_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Rule 5 for processors: one order per sale, however often the ping arrives.
    UniqueConstraint("processor", "sale_id"),
    CheckConstraint(_in("processor", ["gumroad", "stripe", "sandbox"]), name="processor_known"),
    CheckConstraint(_in("status", [s.value for s in OrderStatus]), name="status_known"),
    CheckConstraint("credits > 0 AND quantity > 0 AND price >= 0", name="amounts_positive"),
    Index("ix_orders_email", "email"),
    Index("ix_orders_email_lower", func.lower(text("email"))),
    Index("ix_orders_order_number", "order_number"),
)

codes = Table(
    "codes",
    metadata,
    Column("code_id", ID, primary_key=True),
    Column("order_id", ID, ForeignKey("orders.order_id"), nullable=False, index=True),
    # `v1:` + HMAC-SHA256 of the normalised code; the plaintext is never stored here.
    Column("digest", String(80), nullable=False, unique=True),
    Column("last4", String(4), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("redeemed_at", UTCDateTime),
    Column("account_id", String(128), ForeignKey("accounts.account_id")),
    Column("lot_id", ID, ForeignKey("lots.lot_id")),
    Column("voided_at", UTCDateTime),
    CheckConstraint(_in("status", [s.value for s in CodeStatus]), name="status_known"),
    CheckConstraint(
        "(status = 'redeemed') = (lot_id IS NOT NULL AND account_id IS NOT NULL "
        "AND redeemed_at IS NOT NULL)",
        name="redeemed_iff_lot",
    ),
    CheckConstraint("(status = 'void') = (voided_at IS NOT NULL)", name="void_iff_voided_at"),
    Index("ix_codes_last4", "last4"),
    # Rule 10: at most one code that redeems per order (a reissue voids the old one first).
    Index(
        "uq_codes_one_issued_per_order",
        "order_id",
        unique=True,
        sqlite_where=text("status = 'issued'"),
        postgresql_where=text("status = 'issued'"),
    ),
)

outbox = Table(
    "outbox",
    metadata,
    Column("message_id", ID, primary_key=True),
    # Why the message exists ("code:<code_id>"): one message per cause, never two sends.
    Column("cause", String(128), nullable=False, unique=True),
    Column("template", String(32), nullable=False),
    Column("to_email", String(320), nullable=False),
    Column("subject", String(200), nullable=False),
    # What the template needs; holds the plaintext code until the message is sent.
    Column("context", Json, nullable=False),
    Column("order_id", ID, ForeignKey("orders.order_id"), index=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    Column("last_error", String(500)),
    CheckConstraint(_in("status", ["pending", "sent", "failed"]), name="status_known"),
    Index(
        "ix_outbox_due",
        "next_attempt_at",
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
)

unmatched_pings = Table(
    "unmatched_pings",
    metadata,
    Column("ping_id", ID, primary_key=True),
    Column("processor", String(16), nullable=False),
    Column("sale_id", String(128)),
    Column("reason", String(200), nullable=False),
    Column("payload", Json, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

#: Failed redemption attempts, per subject (`account:<id>` or `address:<ip>`): the rate limit
#: is a count over the last hour, shared by every process through the database.
redemption_failures = Table(
    "redemption_failures",
    metadata,
    Column("failure_id", ID, primary_key=True),
    Column("subject", String(200), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_redemption_failures_subject_at", "subject", "at"),
)


# --- refunds and disputes -------------------------------------------------------------------------

#: What an order gave back (rules 8 and 9). Appended here rather than in the orders table above so
#: the migration that adds them (0004) reads alongside. `credits_taken` counts every credit taken
#: back (voided code value, voided or clawed back lot credits, and debt); `credits_owed` is the
#: part of it that became debt because it was spent already.
for _column in (
    Column("payment_ref", String(128)),  # Stripe: the session's payment_intent
    Column("refunded_amount", BigInteger, nullable=False, server_default="0"),  # minor units
    Column("credits_taken", BigInteger, nullable=False, server_default="0"),
    Column("credits_owed", BigInteger, nullable=False, server_default="0"),
    Column("refunded_at", UTCDateTime),
    Column("disputed_at", UTCDateTime),
    Column("refund_reason", String(500)),
):
    orders.append_column(_column)
for _check, _name in (
    ("refunded_amount >= 0", "refunded_amount_not_negative"),
    ("credits_taken BETWEEN 0 AND credits", "credits_taken_within_credits"),
    ("credits_owed BETWEEN 0 AND credits_taken", "credits_owed_within_taken"),
    ("status <> 'refunded' OR refunded_at IS NOT NULL", "refunded_has_time"),
    ("status <> 'disputed' OR disputed_at IS NOT NULL", "disputed_has_time"),
):
    orders.append_constraint(CheckConstraint(_check, name=_name))
Index("ix_orders_payment_ref", orders.c.payment_ref)  # charges name the payment intent

PROCESSOR_EVENT_KINDS = ("refund", "dispute", "dispute_won", "dispute_lost")

#: Refunds and disputes the processors reported, once each (the processor's event id, or for
#: Gumroad, which sends none, the resource and sale). `pending` until the sale they are about
#: is known; fulfilling that sale applies them in the same transaction.
processor_events = Table(
    "processor_events",
    metadata,
    Column("event_id", ID, primary_key=True),
    Column("processor", String(16), nullable=False),
    Column("event_key", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("sale_id", String(128)),
    Column("payment_ref", String(128)),
    Column("dispute_ref", String(128)),
    Column("refunded_amount", BigInteger),  # Stripe's running total, minor units
    Column("charge_amount", BigInteger),
    Column("order_id", ID, ForeignKey("orders.order_id")),
    Column("status", String(16), nullable=False),
    Column("credits_taken", BigInteger, nullable=False, server_default="0"),
    Column("credits_restored", BigInteger, nullable=False, server_default="0"),
    Column("code_voided", Boolean(create_constraint=False), nullable=False, server_default="0"),
    # A dispute: of credits_taken, what came out of lots and what became debt (the rest had
    # expired or been voided before); a won dispute restores exactly those, once.
    Column("credits_from_lots", BigInteger, nullable=False, server_default="0"),
    Column("credits_owed", BigInteger, nullable=False, server_default="0"),
    Column("restored_lot_id", ID),
    Column("restored_at", UTCDateTime),
    Column("payload", Json, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("applied_at", UTCDateTime),
    UniqueConstraint("processor", "event_key"),
    CheckConstraint(_in("processor", ["gumroad", "stripe", "sandbox"]), name="processor_known"),
    CheckConstraint(_in("kind", PROCESSOR_EVENT_KINDS), name="kind_known"),
    CheckConstraint(_in("status", ["pending", "applied"]), name="status_known"),
    CheckConstraint(
        "(status = 'applied') = (applied_at IS NOT NULL AND order_id IS NOT NULL)",
        name="applied_iff_order",
    ),
    CheckConstraint("sale_id IS NOT NULL OR payment_ref IS NOT NULL", name="names_a_sale"),
    CheckConstraint(
        "credits_taken >= 0 AND credits_restored >= 0 AND "
        "(refunded_amount IS NULL OR refunded_amount >= 0)",
        name="amounts_not_negative",
    ),
    CheckConstraint(
        "credits_from_lots >= 0 AND credits_owed >= 0 AND "
        "credits_from_lots + credits_owed <= credits_taken",
        name="taken_within_taken",
    ),
    Index("ix_processor_events_sale_id", "sale_id"),
    Index("ix_processor_events_payment_ref", "payment_ref"),
    Index("ix_processor_events_order_id", "order_id"),
)


# --- the support console: staff, their sessions, their actions ------------------------------------

staff = Table(
    "staff",
    metadata,
    Column("staff_id", ID, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    # argon2id in PHC form (`$argon2id$v=19$m=...`); the password itself is never stored.
    Column("password_hash", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("disabled_at", UTCDateTime),
    CheckConstraint("email = lower(email)", name="email_lower_case"),
    CheckConstraint("password_hash LIKE '$argon2%'", name="password_hash_argon2"),
)

staff_sessions = Table(
    "staff_sessions",
    metadata,
    # SHA-256 of the session token: the cookie's value is never stored.
    Column("digest", String(64), primary_key=True),
    Column("staff_id", ID, ForeignKey("staff.staff_id"), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),  # absolute; idle expiry is from last_seen_at
    CheckConstraint("length(digest) = 64", name="digest_is_sha256"),
    CheckConstraint("expires_at > created_at", name="expires_after_created"),
    CheckConstraint("last_seen_at >= created_at", name="seen_after_created"),
)

#: Console actions that write no journal entry (resending an email), with who and why; one per
#: idempotency key, so a double submit has one effect.
staff_actions = Table(
    "staff_actions",
    metadata,
    Column("action_id", ID, primary_key=True),
    Column("staff_id", ID, ForeignKey("staff.staff_id"), nullable=False),
    Column("action", String(32), nullable=False),
    Column("subject", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("staff_id", "action", "idempotency_key"),
    CheckConstraint("action IN ('resend', 'refund', 'reissue')", name="action_known"),
    CheckConstraint("length(reason) BETWEEN 1 AND 500", name="reason_given"),
)

# --- the append-only journal, enforced by the database --------------------------------------------

_SQLITE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries "
    "BEGIN SELECT RAISE(ABORT, 'entries are immutable'); END",
    "CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries "
    "BEGIN SELECT RAISE(ABORT, 'entries are immutable'); END",
)
_POSTGRES_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION tally_entries_immutable() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'entries are immutable'; END $$",
    "CREATE TRIGGER entries_immutable BEFORE UPDATE OR DELETE ON entries "
    "FOR EACH ROW EXECUTE FUNCTION tally_entries_immutable()",
    "CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries "
    "FOR EACH STATEMENT EXECUTE FUNCTION tally_entries_immutable()",
)


def install_journal_triggers(connection: Connection) -> None:
    """Called by the migration and by `metadata.create_all` (tests) alike."""
    statements = _SQLITE_TRIGGERS if connection.dialect.name == "sqlite" else _POSTGRES_TRIGGERS
    for statement in statements:
        connection.exec_driver_sql(statement)


@event.listens_for(entries, "after_create")
def _after_entries_create(target: Table, connection: Connection, **_: Any) -> None:
    install_journal_triggers(connection)
