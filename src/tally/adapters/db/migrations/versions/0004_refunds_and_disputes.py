"""Refunds and disputes: what orders owe back, and processor events kept until their sale arrives.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 17:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

_ORDER_CHECKS = (
    ("refunded_amount >= 0", "refunded_amount_not_negative"),
    ("credits_taken BETWEEN 0 AND credits", "credits_taken_within_credits"),
    ("credits_owed BETWEEN 0 AND credits_taken", "credits_owed_within_taken"),
    ("status <> 'refunded' OR refunded_at IS NOT NULL", "refunded_has_time"),
    ("status <> 'disputed' OR disputed_at IS NOT NULL", "disputed_has_time"),
)


#: SQLite cannot add a table CHECK without copying the table, and copying `orders` under the
#: foreign keys of codes and the outbox fails (the DROP counts as deleting referenced rows).
#: So there each CHECK rides on the column it guards: SQLite lets a column's CHECK read the
#: row's other columns, and tests it against the rows already there.
_SQLITE_COLUMNS = (
    "payment_ref VARCHAR(128)",
    "refunded_amount BIGINT DEFAULT '0' NOT NULL CONSTRAINT ck_orders_refunded_amount_not_negative "
    "CHECK (refunded_amount >= 0)",
    "credits_taken BIGINT DEFAULT '0' NOT NULL CONSTRAINT ck_orders_credits_taken_within_credits "
    "CHECK (credits_taken BETWEEN 0 AND credits)",
    "credits_owed BIGINT DEFAULT '0' NOT NULL CONSTRAINT ck_orders_credits_owed_within_taken "
    "CHECK (credits_owed BETWEEN 0 AND credits_taken)",
    "refunded_at DATETIME CONSTRAINT ck_orders_refunded_has_time "
    "CHECK (status <> 'refunded' OR refunded_at IS NOT NULL)",
    "disputed_at DATETIME CONSTRAINT ck_orders_disputed_has_time "
    "CHECK (status <> 'disputed' OR disputed_at IS NOT NULL)",
    "refund_reason VARCHAR(500)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for column in _SQLITE_COLUMNS:
            op.execute(f"ALTER TABLE orders ADD COLUMN {column}")
    else:
        op.add_column("orders", sa.Column("payment_ref", sa.String(length=128), nullable=True))
        for name in ("refunded_amount", "credits_taken", "credits_owed"):
            op.add_column(
                "orders", sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)
            )
        op.add_column("orders", sa.Column("refunded_at", _TIME, nullable=True))
        op.add_column("orders", sa.Column("disputed_at", _TIME, nullable=True))
        op.add_column("orders", sa.Column("refund_reason", sa.String(length=500), nullable=True))
        for check, name in _ORDER_CHECKS:
            op.create_check_constraint(op.f(f"ck_orders_{name}"), "orders", check)
    op.create_index("ix_orders_payment_ref", "orders", ["payment_ref"], unique=False)

    op.create_table(
        "processor_events",
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("processor", sa.String(length=16), nullable=False),
        sa.Column("event_key", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sale_id", sa.String(length=128), nullable=True),
        sa.Column("payment_ref", sa.String(length=128), nullable=True),
        sa.Column("dispute_ref", sa.String(length=128), nullable=True),
        sa.Column("refunded_amount", sa.BigInteger(), nullable=True),
        sa.Column("charge_amount", sa.BigInteger(), nullable=True),
        sa.Column("order_id", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("credits_taken", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("credits_restored", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("code_voided", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("credits_from_lots", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("credits_owed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("restored_lot_id", sa.String(length=40), nullable=True),
        sa.Column("restored_at", _TIME, nullable=True),
        sa.Column("payload", _JSON, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("applied_at", _TIME, nullable=True),
        sa.CheckConstraint(
            "processor IN ('gumroad', 'stripe', 'sandbox')",
            name=op.f("ck_processor_events_processor_known"),
        ),
        sa.CheckConstraint(
            "kind IN ('refund', 'dispute', 'dispute_won', 'dispute_lost')",
            name=op.f("ck_processor_events_kind_known"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'applied')", name=op.f("ck_processor_events_status_known")
        ),
        sa.CheckConstraint(
            "(status = 'applied') = (applied_at IS NOT NULL AND order_id IS NOT NULL)",
            name=op.f("ck_processor_events_applied_iff_order"),
        ),
        sa.CheckConstraint(
            "sale_id IS NOT NULL OR payment_ref IS NOT NULL",
            name=op.f("ck_processor_events_names_a_sale"),
        ),
        sa.CheckConstraint(
            "credits_taken >= 0 AND credits_restored >= 0 AND "
            "(refunded_amount IS NULL OR refunded_amount >= 0)",
            name=op.f("ck_processor_events_amounts_not_negative"),
        ),
        sa.CheckConstraint(
            "credits_from_lots >= 0 AND credits_owed >= 0 AND "
            "credits_from_lots + credits_owed <= credits_taken",
            name=op.f("ck_processor_events_taken_within_taken"),
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.order_id"],
            name=op.f("fk_processor_events_order_id_orders"),
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_processor_events")),
        sa.UniqueConstraint(
            "processor", "event_key", name=op.f("uq_processor_events_processor_event_key")
        ),
    )
    with op.batch_alter_table("processor_events", schema=None) as batch_op:
        batch_op.create_index("ix_processor_events_sale_id", ["sale_id"], unique=False)
        batch_op.create_index("ix_processor_events_payment_ref", ["payment_ref"], unique=False)
        batch_op.create_index("ix_processor_events_order_id", ["order_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("processor_events", schema=None) as batch_op:
        batch_op.drop_index("ix_processor_events_order_id")
        batch_op.drop_index("ix_processor_events_payment_ref")
        batch_op.drop_index("ix_processor_events_sale_id")
    op.drop_table("processor_events")

    # SQLite copies `orders` to drop columns with CHECKs: downgrade it before orders exist,
    # or with foreign keys off.
    op.drop_index("ix_orders_payment_ref", table_name="orders")
    with op.batch_alter_table("orders", schema=None) as batch_op:
        for _, name in reversed(_ORDER_CHECKS):
            batch_op.drop_constraint(op.f(f"ck_orders_{name}"), type_="check")
        for name in (
            "refund_reason",
            "disputed_at",
            "refunded_at",
            "credits_owed",
            "credits_taken",
            "refunded_amount",
            "payment_ref",
        ):
            batch_op.drop_column(name)
