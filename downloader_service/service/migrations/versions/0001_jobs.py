"""The jobs table: one row per accepted event.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the jobs table and its indexes."""
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("run_at", sa.Float, nullable=False),
        sa.Column("retry_from", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("files", sa.Text, nullable=False),
        sa.Column("lease_owner", sa.String(200)),
        sa.Column("lease_expires", sa.Float),
        sa.Column("attempt_path", sa.Text),
        sa.Column("cart_url", sa.Text),
        sa.Column("download_path", sa.Text),
        sa.Column("host", sa.String(255)),
        sa.Column("result", sa.Text),
        sa.Column("error_kind", sa.String(64)),
        sa.Column("error_detail", sa.Text),
        sa.Column("error_retryable", sa.Boolean),
        sa.Column("error_context", sa.Text),
        sa.Column("removed_at", sa.Float),
        sa.UniqueConstraint("source", "event_id", name="uq_jobs_source_event_id"),
    )
    op.create_index("ix_jobs_state_run_at", "jobs", ["state", "run_at"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])


def downgrade() -> None:
    """Drop the jobs table."""
    op.drop_table("jobs")
