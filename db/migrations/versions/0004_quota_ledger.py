"""Quotas and fairness: accounts and their append-only ledger; what each job cost; result
checksums; when a job was handed to the broker; job ids never reused.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("daily_limit", sa.Integer(), nullable=True),
        sa.Column("lock_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("key", name=op.f("uq_accounts_key")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_ledger_entries_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_ledger_entries_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index(
        "ux_ledger_job_kind", "ledger_entries", ["account_id", "job_id", "kind"], unique=True
    )
    op.create_index("ix_ledger_account_day", "ledger_entries", ["account_id", "day"])
    sqlite = op.get_bind().dialect.name == "sqlite"
    # On SQLite the table is rebuilt with AUTOINCREMENT, so that ids of deleted jobs (/forget)
    # are never given to new ones; PostgreSQL's sequences never reuse them anyway.
    with op.batch_alter_table(
        "jobs",
        recreate="always" if sqlite else "auto",
        table_kwargs={"sqlite_autoincrement": True} if sqlite else {},
    ) as jobs:
        jobs.add_column(sa.Column("cost", sa.Integer(), nullable=False, server_default="0"))
        jobs.add_column(sa.Column("result_checksums", sa.JSON(), nullable=True))
        jobs.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("published_at")
        jobs.drop_column("result_checksums")
        jobs.drop_column("cost")
    op.drop_index("ix_ledger_account_day", table_name="ledger_entries")
    op.drop_index("ux_ledger_job_kind", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_table("accounts")
