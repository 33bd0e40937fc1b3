"""One job per chat message.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ux_jobs_request", "jobs", ["channel", "chat_id", "request_message_id"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_request", table_name="jobs")
