"""The Notifications subscription guard: who guards it now, what it saw, and the gaps it found.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``subscription_guard`` (a leased row per guard) and ``subscription_gaps``."""
    op.create_table(
        "subscription_guard",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("owner", sa.String(200)),
        sa.Column("lease_expires", sa.Float),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "subscription_gaps",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("subscription", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target_url", sa.Text, nullable=False),
        sa.Column("disabled_at", sa.String(40), nullable=False),
        sa.Column("enabled_at", sa.String(40)),
        sa.Column("error", sa.Text),
        sa.Column("window_start", sa.String(40), nullable=False),
        sa.Column("window_end", sa.String(40)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.Float, nullable=False),
        sa.Column("closed_at", sa.Float),
        sa.Column("note", sa.Text),
        sa.UniqueConstraint("subscription", "disabled_at", name="uq_gaps_subscription_disabled_at"),
    )
    op.create_index("ix_gaps_state", "subscription_gaps", ["state"])


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("subscription_gaps")
    op.drop_table("subscription_guard")
