"""Drift windows: one row per pipeline and closed window of anomaly.monitoring.drift.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "drift_windows",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(128)),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("alerts", sa.BigInteger(), nullable=False),
        sa.Column("expected_alert_rate", sa.Double()),
        sa.Column("alert_rate_p", sa.Double()),
        sa.Column("ks_stat", sa.Double()),
        sa.Column("ks_p", sa.Double()),
        sa.Column("top_features", _json(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("reasons", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drift_windows"),
    )
    op.create_index(
        "ix_drift_windows_pipeline_window_start", "drift_windows", ["pipeline", "window_start"]
    )


def downgrade() -> None:
    op.drop_index("ix_drift_windows_pipeline_window_start", table_name="drift_windows")
    op.drop_table("drift_windows")
