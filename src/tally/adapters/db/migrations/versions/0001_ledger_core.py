"""Ledger core: accounts, lots, holds, the journal and idempotency keys.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21 12:00:32.061687
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SQLITE_TRIGGERS = (
    "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries "
    "BEGIN SELECT RAISE(ABORT, 'entries are immutable'); END",
    "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries "
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


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("debt", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("entry_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pending_holds", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("debt >= 0", name=op.f("ck_accounts_debt_not_negative")),
        sa.CheckConstraint(
            "pending_holds BETWEEN 0 AND 1000",
            name=op.f("ck_accounts_pending_holds_within_limit"),
        ),
        sa.CheckConstraint("entry_seq >= 0", name=op.f("ck_accounts_entry_seq_not_negative")),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_accounts")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "response",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("account_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_idempotency_keys")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "holds",
        sa.Column("hold_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("captured", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.CheckConstraint(
            "(status = 'captured' AND captured > 0) OR (status <> 'captured' AND captured = 0)",
            name=op.f("ck_holds_captured_iff_status"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'captured', 'released', 'expired')",
            name=op.f("ck_holds_status_known"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_holds_amount_positive")),
        sa.CheckConstraint(
            "captured BETWEEN 0 AND amount", name=op.f("ck_holds_captured_within_amount")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.account_id"], name=op.f("fk_holds_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("hold_id", name=op.f("pk_holds")),
    )
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.create_index(
            "ix_holds_due",
            ["expires_at"],
            unique=False,
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.create_index(
            "ix_holds_pending",
            ["account_id"],
            unique=False,
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )

    op.create_table(
        "lots",
        sa.Column("lot_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("is_open", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.CheckConstraint(
            "source IN ('purchase', 'gift', 'membership', 'promotional', 'support', 'refund')",
            name=op.f("ck_lots_source_known"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_lots_amount_positive")),
        sa.CheckConstraint(
            "expires_at IS NULL OR expires_at > created_at",
            name=op.f("ck_lots_expires_after_created"),
        ),
        sa.CheckConstraint(
            "remaining BETWEEN 0 AND amount", name=op.f("ck_lots_remaining_within_amount")
        ),
        sa.CheckConstraint("is_open = (remaining > 0)", name=op.f("ck_lots_open_iff_remaining")),
        sa.CheckConstraint(
            "voided_at IS NULL OR remaining = 0", name=op.f("ck_lots_void_lot_is_empty")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.account_id"], name=op.f("fk_lots_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("lot_id", name=op.f("pk_lots")),
    )
    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.create_index(
            "ix_lots_due",
            ["expires_at"],
            unique=False,
            sqlite_where=sa.text("is_open = 1"),
            postgresql_where=sa.text("is_open"),
        )
        batch_op.create_index("ix_lots_account_id", ["account_id"], unique=False)
        batch_op.create_index(
            "ix_lots_open",
            ["account_id"],
            unique=False,
            sqlite_where=sa.text("is_open = 1"),
            postgresql_where=sa.text("is_open"),
        )

    op.create_table(
        "entries",
        sa.Column("entry_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("lot_id", sa.String(length=40), nullable=True),
        sa.Column("hold_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("platform_id", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.CheckConstraint(
            "NOT (type IN ('grant', 'hold', 'release', 'capture', 'debit', 'expire', 'void')) OR lot_id IS NOT NULL",
            name=op.f("ck_entries_needs_lot"),
        ),
        sa.CheckConstraint(
            "NOT (type IN ('hold', 'release', 'capture')) OR hold_id IS NOT NULL",
            name=op.f("ck_entries_needs_hold"),
        ),
        sa.CheckConstraint(
            "amount > 0 OR (type = 'adjustment' AND amount <> 0)",
            name=op.f("ck_entries_amount_sign_by_type"),
        ),
        sa.CheckConstraint(
            "type IN ('grant', 'hold', 'capture', 'release', 'debit', 'expire', 'void', 'clawback', 'adjustment')",
            name=op.f("ck_entries_type_known"),
        ),
        sa.CheckConstraint("seq > 0", name=op.f("ck_entries_seq_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.account_id"], name=op.f("fk_entries_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["hold_id"], ["holds.hold_id"], name=op.f("fk_entries_hold_id_holds")
        ),
        sa.ForeignKeyConstraint(["lot_id"], ["lots.lot_id"], name=op.f("fk_entries_lot_id_lots")),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_entries")),
        sa.UniqueConstraint("account_id", "seq", name=op.f("uq_entries_account_id_seq")),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_entries_hold_id",
            ["hold_id"],
            unique=False,
            sqlite_where=sa.text("hold_id IS NOT NULL"),
            postgresql_where=sa.text("hold_id IS NOT NULL"),
        )

    op.create_table(
        "hold_allocations",
        sa.Column("hold_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("lot_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=128), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_hold_allocations_amount_positive")),
        sa.ForeignKeyConstraint(
            ["hold_id"], ["holds.hold_id"], name=op.f("fk_hold_allocations_hold_id_holds")
        ),
        sa.ForeignKeyConstraint(
            ["lot_id"], ["lots.lot_id"], name=op.f("fk_hold_allocations_lot_id_lots")
        ),
        sa.PrimaryKeyConstraint("hold_id", "position", name=op.f("pk_hold_allocations")),
        sa.UniqueConstraint("hold_id", "lot_id", name=op.f("uq_hold_allocations_hold_id_lot_id")),
    )
    # The journal is append-only: the database refuses to change or delete an entry.
    statements = _SQLITE_TRIGGERS if op.get_bind().dialect.name == "sqlite" else _POSTGRES_TRIGGERS
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS entries_immutable ON entries")
        op.execute("DROP TRIGGER IF EXISTS entries_no_truncate ON entries")
        op.execute("DROP FUNCTION IF EXISTS tally_entries_immutable()")
    op.drop_table("hold_allocations")
    with op.batch_alter_table("entries", schema=None) as batch_op:
        batch_op.drop_index("ix_entries_hold_id")

    op.drop_table("entries")
    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.drop_index("ix_lots_account_id")
        batch_op.drop_index(
            "ix_lots_open",
            sqlite_where=sa.text("is_open = 1"),
            postgresql_where=sa.text("is_open"),
        )
        batch_op.drop_index(
            "ix_lots_due",
            sqlite_where=sa.text("is_open = 1"),
            postgresql_where=sa.text("is_open"),
        )

    op.drop_table("lots")
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_holds_pending",
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.drop_index(
            "ix_holds_due",
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )

    op.drop_table("holds")
    op.drop_table("idempotency_keys")
    op.drop_table("accounts")
