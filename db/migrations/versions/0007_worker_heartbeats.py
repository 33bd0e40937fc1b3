"""Reliability: worker heartbeats (the reconciler hands a dead worker's jobs to another) and
when a job's result was delivered (a redelivered task never sends it twice).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_worker_heartbeats")),
    )
    # A plain nullable column: added in place, no table rebuild.
    op.add_column("jobs", sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    # SQLite drops the column by rebuilding the table: with AUTOINCREMENT again (as 0004
    # made it), or ids of deleted jobs would be given to new ones.
    with op.batch_alter_table(
        "jobs", table_kwargs={"sqlite_autoincrement": True} if sqlite else {}
    ) as jobs:
        jobs.drop_column("delivered_at")
    op.drop_table("worker_heartbeats")
