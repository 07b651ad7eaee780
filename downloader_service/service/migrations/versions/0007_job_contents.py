"""Each job's files and event in a table of their own, out of the row every update rewrites.

SQLite writes a whole new record for any UPDATE of a row: with the event and its files in
``jobs``, each claim, lease renewal and state change of a job of 76,000 files read and wrote
17 MB again (and held it twice in memory while doing so). PostgreSQL keeps large values aside
(TOAST) but copies the row's other columns all the same. Written once, the files are read
when the job is claimed and the event when its download is published: ``job_contents``, the
event its last column.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Make ``job_contents``, move every job's files and event into it, drop them from ``jobs``."""
    op.create_table(
        "job_contents",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("files", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
    )
    op.execute("INSERT INTO job_contents (job_id, files, event) SELECT id, files, event FROM jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("files")
        batch.drop_column("event")


def downgrade() -> None:
    """Put them back into ``jobs``."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("event", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("files", sa.Text, nullable=False, server_default="[]"))
    op.execute(
        "UPDATE jobs SET event = (SELECT event FROM job_contents WHERE job_id = jobs.id), "
        "files = (SELECT files FROM job_contents WHERE job_id = jobs.id) "
        "WHERE id IN (SELECT job_id FROM job_contents)"
    )
    op.drop_table("job_contents")
