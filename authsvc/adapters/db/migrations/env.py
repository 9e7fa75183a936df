"""Alembic environment: runs migrations on the URL given by authsvc (no alembic.ini)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from authsvc.adapters.db.tables import metadata

config = context.config
target_metadata = metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
