"""Alembic environment: the URL comes from the config or DATABASE_URL."""

import os

from alembic import context
from sqlalchemy import create_engine, pool

from clapq.db import normalise_url
from clapq.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
if not url:
    raise SystemExit("clapq: DATABASE_URL must be set to run migrations")


def run_migrations_online() -> None:
    engine = create_engine(normalise_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata)
        with context.begin_transaction():
            if wait_ms := config.attributes.get("lock_timeout_ms"):  # clapq.db.migrate's, which tries again
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(wait_ms)}")
            context.run_migrations()
    engine.dispose()


run_migrations_online()
