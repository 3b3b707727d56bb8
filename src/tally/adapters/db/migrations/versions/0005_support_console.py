"""The support console: staff members, their sessions, and the actions they take that write no
journal entry.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 17:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "staff",
        sa.Column("staff_id", sa.String(length=40), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("disabled_at", _TIME, nullable=True),
        sa.CheckConstraint("email = lower(email)", name=op.f("ck_staff_email_lower_case")),
        sa.CheckConstraint(
            "password_hash LIKE '$argon2%'", name=op.f("ck_staff_password_hash_argon2")
        ),
        sa.PrimaryKeyConstraint("staff_id", name=op.f("pk_staff")),
        sa.UniqueConstraint("email", name=op.f("uq_staff_email")),
    )
    op.create_table(
        "staff_sessions",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("staff_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("last_seen_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.CheckConstraint("length(digest) = 64", name=op.f("ck_staff_sessions_digest_is_sha256")),
        sa.CheckConstraint(
            "expires_at > created_at", name=op.f("ck_staff_sessions_expires_after_created")
        ),
        sa.CheckConstraint(
            "last_seen_at >= created_at", name=op.f("ck_staff_sessions_seen_after_created")
        ),
        sa.ForeignKeyConstraint(
            ["staff_id"], ["staff.staff_id"], name=op.f("fk_staff_sessions_staff_id_staff")
        ),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_staff_sessions")),
    )
    op.create_index(op.f("ix_staff_sessions_staff_id"), "staff_sessions", ["staff_id"])
    op.create_table(
        "staff_actions",
        sa.Column("action_id", sa.String(length=40), nullable=False),
        sa.Column("staff_id", sa.String(length=40), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.CheckConstraint(
            "action IN ('resend', 'refund', 'reissue')", name=op.f("ck_staff_actions_action_known")
        ),
        sa.CheckConstraint(
            "length(reason) BETWEEN 1 AND 500", name=op.f("ck_staff_actions_reason_given")
        ),
        sa.ForeignKeyConstraint(
            ["staff_id"], ["staff.staff_id"], name=op.f("fk_staff_actions_staff_id_staff")
        ),
        sa.PrimaryKeyConstraint("action_id", name=op.f("pk_staff_actions")),
        sa.UniqueConstraint(
            "staff_id",
            "action",
            "idempotency_key",
            name=op.f("uq_staff_actions_staff_id_action_idempotency_key"),
        ),
    )


def downgrade() -> None:
    op.drop_table("staff_actions")
    op.drop_index(op.f("ix_staff_sessions_staff_id"), table_name="staff_sessions")
    op.drop_table("staff_sessions")
    op.drop_table("staff")
