"""Reservoir: a bounded sample of recent scored records for ``anomaly retrain``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reservoir",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("kafka_topic", sa.String(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.Double(), nullable=False),
        sa.Column("alerted", sa.Boolean(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True)),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reservoir"),
        sa.UniqueConstraint(
            "pipeline",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            name="uq_reservoir_position",
        ),
    )
    op.create_index("ix_reservoir_pipeline_priority", "reservoir", ["pipeline", "priority"])
    op.create_index("ix_reservoir_pipeline_sampled_at", "reservoir", ["pipeline", "sampled_at"])


def downgrade() -> None:
    op.drop_index("ix_reservoir_pipeline_sampled_at", table_name="reservoir")
    op.drop_index("ix_reservoir_pipeline_priority", table_name="reservoir")
    op.drop_table("reservoir")
