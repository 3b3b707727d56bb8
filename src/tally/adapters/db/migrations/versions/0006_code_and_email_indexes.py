"""One live code per order, checked by the database; orders found by email in any case.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 18:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ISSUED = sa.text("status = 'issued'")


def upgrade() -> None:
    # Rule 10: a reissue voids the old code before it issues the new one, so an order never
    # has two codes that redeem; the database refuses a second one whatever the code does.
    with op.batch_alter_table("codes", schema=None) as batch_op:
        batch_op.create_index(
            "uq_codes_one_issued_per_order",
            ["order_id"],
            unique=True,
            sqlite_where=_ISSUED,
            postgresql_where=_ISSUED,
        )
    # Support and /lost-code look orders up by email however it was typed.
    op.create_index("ix_orders_email_lower", "orders", [sa.text("lower(email)")], unique=False)


def downgrade() -> None:
    op.drop_index("ix_orders_email_lower", table_name="orders")
    with op.batch_alter_table("codes", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_codes_one_issued_per_order", sqlite_where=_ISSUED, postgresql_where=_ISSUED
        )
