"""The built-in web chat: accounts, one-time sign-in links, sessions, messages and their
change feed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "web_accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_web_accounts_name")),
        sqlite_autoincrement=True,
    )
    for table in ("web_sign_in_links", "web_sessions"):
        columns: list[sa.schema.SchemaItem] = [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("account_id", sa.Integer(), nullable=False),
            sa.Column("token_hash", sa.String(length=64), nullable=False),
        ]
        if table == "web_sessions":
            columns += [
                sa.Column("csrf_token", sa.String(length=64), nullable=False),
                sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
                sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
            ]
        else:
            columns += [
                sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
                sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
            ]
        op.create_table(
            table,
            *columns,
            sa.ForeignKeyConstraint(
                ["account_id"],
                ["web_accounts.id"],
                name=op.f(f"fk_{table}_account_id_web_accounts"),
                ondelete="CASCADE",
            ),
            sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
            sa.UniqueConstraint("token_hash", name=op.f(f"uq_{table}_token_hash")),
        )
        op.create_index(f"ix_{table}_account_id", table, ["account_id"])
    op.create_table(
        "web_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("from_bot", sa.Boolean(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("images", sa.JSON(), nullable=False),
        sa.Column("spoiler", sa.Boolean(), nullable=False),
        sa.Column("buttons", sa.JSON(), nullable=False),
        sa.Column("attachment", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("reply_to", sa.BigInteger(), nullable=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_messages")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_web_messages_chat_id_id", "web_messages", ["chat_id", "id"])
    op.create_table(
        "web_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_changes")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_web_changes_chat_id", "web_changes", ["chat_id"])


def downgrade() -> None:
    op.drop_index("ix_web_changes_chat_id", table_name="web_changes")
    op.drop_table("web_changes")
    op.drop_index("ix_web_messages_chat_id_id", table_name="web_messages")
    op.drop_table("web_messages")
    for table in ("web_sessions", "web_sign_in_links"):
        op.drop_index(f"ix_{table}_account_id", table_name=table)
        op.drop_table(table)
    op.drop_table("web_accounts")
