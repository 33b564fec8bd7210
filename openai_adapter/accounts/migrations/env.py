"""Alembic environment: the connection is handed in by store.migrate() (no alembic.ini)."""
from alembic import context

from openai_adapter.accounts.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `llm-admin migrate` (openai_adapter.accounts.store.migrate)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
