"""The store: SQLAlchemy 2 models, Alembic migrations and the unit of work.

The database is the source of truth for every job; the broker only carries job ids.
"""
