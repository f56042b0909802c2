"""jobs, results and deliveries: analysing series and returning results

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_fk", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("series_fk", sa.Integer(), sa.ForeignKey("series.id"), nullable=False),
        sa.Column("route", sa.String(64), nullable=True),
        sa.Column("pipeline", sa.String(64), nullable=True),
        sa.Column("destinations", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timings", sa.Text(), nullable=False),
        sa.Column("node_process", sa.String(300), nullable=True),
    )
    op.create_index("ix_jobs_study_fk", "jobs", ["study_fk"])
    op.create_index("ix_jobs_series_fk", "jobs", ["series_fk"])
    op.create_index("ix_jobs_status", "jobs", ["status", "id"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_fk", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True, unique=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_results_job_fk", "results", ["job_fk"])
    op.create_index("ix_results_series_instance_uid", "results", ["series_instance_uid"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("result_fk", sa.Integer(), sa.ForeignKey("results.id"), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("node_process", sa.String(300), nullable=True),
    )
    op.create_index("ix_deliveries_result_fk", "deliveries", ["result_fk"])
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("results")
    op.drop_table("jobs")
