"""Initial schema: alerts, incidents, dead letters, model versions, stream stats, offsets.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SEVERITY_IN = "('low', 'medium', 'high', 'critical')"


def _id() -> sa.Column:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True)


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "incidents",
        _id(),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("entity", sa.String(512), nullable=False),
        _ts("first_seen"),
        _ts("last_seen"),
        sa.Column("alert_count", sa.Integer(), nullable=False),
        sa.Column("max_severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.CheckConstraint(f"max_severity IN {SEVERITY_IN}", name="ck_incidents_max_severity"),
        sa.CheckConstraint("status IN ('open', 'resolved')", name="ck_incidents_status"),
        sa.PrimaryKeyConstraint("id", name="pk_incidents"),
    )
    op.create_index(
        "ix_incidents_pipeline_entity_last_seen", "incidents", ["pipeline", "entity", "last_seen"]
    )
    op.create_index("ix_incidents_pipeline_last_seen", "incidents", ["pipeline", "last_seen"])

    op.create_table(
        "alerts",
        _id(),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("record_id", sa.String(512), nullable=False),
        sa.Column("entity", sa.String(512)),
        _ts("event_time", nullable=True),
        _ts("ingest_time"),
        sa.Column("kafka_topic", sa.String(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        *(
            sa.Column(name, sa.Double())
            for name in ("vae_score", "vae_p", "flow_score", "flow_p", "gan_score", "gan_p")
        ),
        sa.Column("ensemble_score", sa.Double(), nullable=False),
        sa.Column("ensemble_p", sa.Double(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("fired_detectors", _json(), nullable=False),
        sa.Column("top_features", _json(), nullable=False),
        sa.Column("record", _json(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("incident_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite")),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
            name="fk_alerts_incident_id_incidents",
            ondelete="SET NULL",
        ),
        sa.UniqueConstraint(
            "pipeline",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            name="uq_alerts_position",
        ),
        sa.CheckConstraint(f"severity IN {SEVERITY_IN}", name="ck_alerts_severity"),
        sa.CheckConstraint(
            "status IN ('open', 'acknowledged', 'resolved')", name="ck_alerts_status"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_pipeline_ingest_time", "alerts", ["pipeline", "ingest_time"])
    op.create_index("ix_alerts_entity", "alerts", ["entity"])
    op.create_index("ix_alerts_incident_id", "alerts", ["incident_id"])

    op.create_table(
        "dead_letters",
        _id(),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("kafka_topic", sa.String(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("error_kind", sa.String(64), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint(
            "pipeline",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            name="uq_dead_letters_position",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index(
        "ix_dead_letters_pipeline_created_at", "dead_letters", ["pipeline", "created_at"]
    )

    op.create_table(
        "model_versions",
        _id(),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        _ts("created_at"),
        sa.Column("bundle_path", sa.String(4096), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        _ts("activated_at", nullable=True),
        sa.UniqueConstraint("pipeline", "version", name="uq_model_versions_pipeline_version"),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["pipeline"],
        unique=True,
        postgresql_where=sa.text("active"),
        sqlite_where=sa.text("active"),
    )

    op.create_table(
        "stream_stats",
        sa.Column("pipeline", sa.String(200), nullable=False),
        _ts("minute"),
        *(
            sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            for name in (
                "records_seen",
                "records_scored",
                "records_alerted",
                "records_dead_lettered",
            )
        ),
        *(
            sa.Column(name, sa.Double())
            for name in ("score_mean", "score_p50", "score_p90", "score_p99")
        ),
        sa.Column("latency_ms_sum", sa.Double(), nullable=False, server_default="0"),
        sa.Column("latency_count", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("latency_ms_max", sa.Double()),
        sa.PrimaryKeyConstraint("pipeline", "minute", name="pk_stream_stats"),
    )

    op.create_table(
        "consumer_offsets",
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("kafka_topic", sa.String(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint(
            "pipeline", "kafka_topic", "kafka_partition", name="pk_consumer_offsets"
        ),
    )


def downgrade() -> None:
    op.drop_table("consumer_offsets")
    op.drop_table("stream_stats")
    op.drop_index("uq_model_versions_one_active", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("dead_letters")
    op.drop_table("alerts")
    op.drop_table("incidents")
