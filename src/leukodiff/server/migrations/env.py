"""Alembic environment: run on the connection `Database.migrate` hands over (or a URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from leukodiff.server.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as own_connection:
        _run(own_connection)


def _run(connection) -> None:
    # render_as_batch: SQLite can only ALTER tables by copying them; Alembic does that for us.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
