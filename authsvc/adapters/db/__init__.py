"""Storage adapter: SQLAlchemy Core tables, repositories and Alembic migrations."""
