"""A digest of each job's event, and how often the same (source, id) came with another body.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``event_digest`` (unknown for older jobs: they are never called conflicting) and the counts."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("event_digest", sa.String(64)))
        batch.add_column(sa.Column("conflicts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("conflict_at", sa.Float))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("conflict_at")
        batch.drop_column("conflicts")
        batch.drop_column("event_digest")
