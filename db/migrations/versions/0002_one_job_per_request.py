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
    # Before this revision an edited or repeated message could make a second job: keep the
    # oldest job of each message as the message's job, and detach the others from it.
    op.execute(
        """
        UPDATE jobs SET request_message_id = NULL
        WHERE request_message_id IS NOT NULL AND id NOT IN (
            SELECT first_id FROM (
                SELECT MIN(id) AS first_id FROM jobs
                GROUP BY channel, chat_id, request_message_id
            ) AS firsts
        )
        """
    )
    op.create_index(
        "ux_jobs_request", "jobs", ["channel", "chat_id", "request_message_id"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_request", table_name="jobs")
