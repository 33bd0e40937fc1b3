"""Styles, avatars and result buttons: what a job was made from, and one job per trigger.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as users:
        users.add_column(sa.Column("default_style", sa.String(length=64), nullable=True))
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("trigger", sa.String(length=128), nullable=True))
        jobs.add_column(sa.Column("negative_prompt", sa.Text(), nullable=False, server_default=""))
        jobs.add_column(sa.Column("style", sa.String(length=64), nullable=True))
        jobs.add_column(sa.Column("strength", sa.Float(), nullable=True))
        jobs.add_column(sa.Column("lora", sa.Text(), nullable=True))
        jobs.add_column(sa.Column("lora_scale", sa.Float(), nullable=False, server_default="1.0"))
        jobs.add_column(sa.Column("input_path", sa.Text(), nullable=True))
        jobs.add_column(sa.Column("parent_job_id", sa.Integer(), nullable=True))
        jobs.add_column(sa.Column("parent_index", sa.Integer(), nullable=True))
        jobs.create_foreign_key("fk_jobs_parent_job_id_jobs", "jobs", ["parent_job_id"], ["id"])
    # Jobs so far came from messages; one detached from its message by 0002 keeps its id.
    op.execute(
        "UPDATE jobs SET trigger = CASE WHEN request_message_id IS NULL "
        "THEN 'job:' || CAST(id AS VARCHAR(20)) "
        "ELSE 'message:' || CAST(request_message_id AS VARCHAR(20)) END"
    )
    with op.batch_alter_table("jobs") as jobs:
        jobs.alter_column("trigger", existing_type=sa.String(length=128), nullable=False)
        jobs.drop_index("ux_jobs_request")
        jobs.create_index("ux_jobs_trigger", ["channel", "chat_id", "trigger"], unique=True)


def downgrade() -> None:
    # Presses of one result's buttons share its message: keep the oldest job on it.
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
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ux_jobs_trigger")
        jobs.create_index(
            "ux_jobs_request", ["channel", "chat_id", "request_message_id"], unique=True
        )
        jobs.drop_constraint("fk_jobs_parent_job_id_jobs", type_="foreignkey")
        for column in (
            "parent_index",
            "parent_job_id",
            "input_path",
            "lora_scale",
            "lora",
            "strength",
            "style",
            "negative_prompt",
            "trigger",
        ):
            jobs.drop_column(column)
    with op.batch_alter_table("users") as users:
        users.drop_column("default_style")
