"""Alembic's entry point: run the job store's migrations on the connection the store hands over.

``JobStore.upgrade`` opens the transaction (and, on PostgreSQL, takes an advisory lock so
that replicas starting together upgrade one after the other) and passes its connection in.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    version_table=context.config.get_main_option("version_table") or "downloader_schema_version",
    # SQLite alters tables by copying them; batch mode lets one migration serve both engines.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
