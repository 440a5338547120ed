"""Alembic environment. Run through `license-broker migrate` (broker.storage.db.migrate), which hands
over an open connection; `alembic` on the command line is not needed."""

from __future__ import annotations

from alembic import context

from broker.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `license-broker migrate`")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
