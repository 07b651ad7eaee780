"""How many files each job has, so that reading a job's state never parses its files.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``file_count`` and fill it in from each job's ``files`` (a JSON array)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("file_count", sa.Integer))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE jobs SET file_count = json_array_length(files::json)")
    else:
        op.execute("UPDATE jobs SET file_count = json_array_length(files)")


def downgrade() -> None:
    """Drop it."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("file_count")
