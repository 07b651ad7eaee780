"""Jobs whose worker died: an index to claim them, and how many times it happened.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the index a claim of an expired lease walks, and the deaths counter."""
    op.create_index("ix_jobs_state_lease_expires", "jobs", ["state", "lease_expires"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("deaths", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deaths")
    op.drop_index("ix_jobs_state_lease_expires", "jobs")
