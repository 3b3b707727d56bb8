"""Platforms and their API keys; holds remember the tool and quantity they were placed for.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 14:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "platforms",
        sa.Column("platform_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("platform_id", name=op.f("pk_platforms")),
        sa.UniqueConstraint("name", name=op.f("uq_platforms_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("platform_id", sa.String(length=40), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=100), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.CheckConstraint("length(digest) = 64", name=op.f("ck_api_keys_digest_is_sha256")),
        sa.ForeignKeyConstraint(
            ["platform_id"],
            ["platforms.platform_id"],
            name=op.f("fk_api_keys_platform_id_platforms"),
        ),
        sa.PrimaryKeyConstraint("prefix", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_platform_id"), "api_keys", ["platform_id"])
    # Plain ALTERs: SQLite adds a column with its CHECK in place, with no table rebuild.
    op.execute("ALTER TABLE holds ADD COLUMN tool VARCHAR(64)")
    op.execute(
        "ALTER TABLE holds ADD COLUMN quantity BIGINT "
        "CONSTRAINT ck_holds_quantity_positive CHECK (quantity IS NULL OR quantity > 0)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE holds DROP COLUMN quantity")
    op.execute("ALTER TABLE holds DROP COLUMN tool")
    op.drop_index(op.f("ix_api_keys_platform_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("platforms")
