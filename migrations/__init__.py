"""Alembic migrations for clapq."""
