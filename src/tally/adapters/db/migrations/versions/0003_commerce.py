"""Commerce: orders, codes, the outbox, unmatched pings, redemption failures.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 15:09:47.719105
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("processor", sa.String(length=16), nullable=False),
        sa.Column("sale_id", sa.String(length=128), nullable=False),
        sa.Column("order_number", sa.String(length=128), nullable=False),
        sa.Column("package_id", sa.String(length=64), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("validity", sa.String(length=64), nullable=False),
        sa.Column("expires_at", _TIME, nullable=True),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("gifter_email", sa.String(length=320), nullable=True),
        sa.Column("is_test", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("purchased_at", _TIME, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.CheckConstraint(
            "processor IN ('gumroad', 'stripe', 'sandbox')", name=op.f("ck_orders_processor_known")
        ),
        sa.CheckConstraint(
            "status IN ('fulfilled', 'refunded', 'disputed')", name=op.f("ck_orders_status_known")
        ),
        sa.CheckConstraint(
            "credits > 0 AND quantity > 0 AND price >= 0", name=op.f("ck_orders_amounts_positive")
        ),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_orders")),
        sa.UniqueConstraint("processor", "sale_id", name=op.f("uq_orders_processor_sale_id")),
    )
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.create_index("ix_orders_email", ["email"], unique=False)
        batch_op.create_index("ix_orders_order_number", ["order_number"], unique=False)

    op.create_table(
        "redemption_failures",
        sa.Column("failure_id", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("failure_id", name=op.f("pk_redemption_failures")),
    )
    with op.batch_alter_table("redemption_failures", schema=None) as batch_op:
        batch_op.create_index("ix_redemption_failures_subject_at", ["subject", "at"], unique=False)

    op.create_table(
        "unmatched_pings",
        sa.Column("ping_id", sa.String(length=40), nullable=False),
        sa.Column("processor", sa.String(length=16), nullable=False),
        sa.Column("sale_id", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("payload", _JSON, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("ping_id", name=op.f("pk_unmatched_pings")),
    )
    op.create_table(
        "outbox",
        sa.Column("message_id", sa.String(length=40), nullable=False),
        sa.Column("cause", sa.String(length=128), nullable=False),
        sa.Column("template", sa.String(length=32), nullable=False),
        sa.Column("to_email", sa.String(length=320), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("context", _JSON, nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", _TIME, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("sent_at", _TIME, nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed')", name=op.f("ck_outbox_status_known")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.order_id"], name=op.f("fk_outbox_order_id_orders")
        ),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("cause", name=op.f("uq_outbox_cause")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_outbox_due",
            ["next_attempt_at"],
            unique=False,
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.create_index(batch_op.f("ix_outbox_order_id"), ["order_id"], unique=False)

    op.create_table(
        "codes",
        sa.Column("code_id", sa.String(length=40), nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("last4", sa.String(length=4), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("redeemed_at", _TIME, nullable=True),
        sa.Column("account_id", sa.String(length=128), nullable=True),
        sa.Column("lot_id", sa.String(length=40), nullable=True),
        sa.Column("voided_at", _TIME, nullable=True),
        sa.CheckConstraint(
            "(status = 'redeemed') = (lot_id IS NOT NULL AND account_id IS NOT NULL AND redeemed_at IS NOT NULL)",
            name=op.f("ck_codes_redeemed_iff_lot"),
        ),
        sa.CheckConstraint(
            "(status = 'void') = (voided_at IS NOT NULL)", name=op.f("ck_codes_void_iff_voided_at")
        ),
        sa.CheckConstraint(
            "status IN ('issued', 'redeemed', 'void')", name=op.f("ck_codes_status_known")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.account_id"], name=op.f("fk_codes_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(["lot_id"], ["lots.lot_id"], name=op.f("fk_codes_lot_id_lots")),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.order_id"], name=op.f("fk_codes_order_id_orders")
        ),
        sa.PrimaryKeyConstraint("code_id", name=op.f("pk_codes")),
        sa.UniqueConstraint("digest", name=op.f("uq_codes_digest")),
    )
    with op.batch_alter_table("codes", schema=None) as batch_op:
        batch_op.create_index("ix_codes_last4", ["last4"], unique=False)
        batch_op.create_index(batch_op.f("ix_codes_order_id"), ["order_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("codes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_codes_order_id"))
        batch_op.drop_index("ix_codes_last4")

    op.drop_table("codes")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_order_id"))
        batch_op.drop_index(
            "ix_outbox_due",
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )

    op.drop_table("outbox")
    op.drop_table("unmatched_pings")
    with op.batch_alter_table("redemption_failures", schema=None) as batch_op:
        batch_op.drop_index("ix_redemption_failures_subject_at")

    op.drop_table("redemption_failures")
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_index("ix_orders_order_number")
        batch_op.drop_index("ix_orders_email")

    op.drop_table("orders")
