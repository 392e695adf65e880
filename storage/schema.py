"""The SQL schema (docs/architecture.md, "SQL schema"): SQLAlchemy Core tables.

Alembic migrations in ``storage/migrations/versions`` create exactly these tables; a test compares
the migrated database with this metadata, so the two cannot drift apart.

- JSON columns are JSONB on PostgreSQL and JSON (text) on SQLite, except the alert columns
  (``_json_text``): plain ``json`` on PostgreSQL, written verbatim (migration 0002).
- Times are ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL. SQLite has no time zones: ``UTCDateTime``
  stores naive UTC there and hands back aware UTC datetimes on both dialects.
- Text columns that hold values from outside (record ids, entities, error messages) have limits
  that the store enforces by truncating before it writes (PostgreSQL would reject the batch).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

from storage.records import SEVERITIES

ALERT_STATUSES = ("open", "acknowledged", "resolved")
INCIDENT_STATUSES = ("open", "resolved")
VERDICTS = ("true_positive", "false_positive")

# Length limits of text columns (characters). Longer values are truncated by the store.
PIPELINE_LEN = 200  # = anomaly.config.PIPELINE_NAME_MAX_LEN, the names a config accepts
TOPIC_LEN = 255  # Kafka allows 249
RECORD_ID_LEN = 512
ENTITY_LEN = 512
MODEL_VERSION_LEN = 128
ERROR_KIND_LEN = 64
ERROR_MESSAGE_LEN = 8000
BUNDLE_PATH_LEN = 4096
SHA256_LEN = 64
VERDICT_BY_LEN = 128
VERDICT_NOTE_LEN = 2000

# Stable constraint names, so migrations can refer to them on both dialects.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both dialects; naive input is taken to be UTC already."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json() -> Any:
    return JSON().with_variant(JSONB(), "postgresql")


def _json_text() -> Any:
    # The alert hot path: PostgreSQL validates ``json`` and stores the text as is, while ``jsonb``
    # converts every value (a third of the server's work per alert row, see bench/storage.py).
    # Nothing filters or indexes these columns; queries that take them apart cast to jsonb.
    return JSON()


def _partial_index(name: str | None, *columns: str, where: str, unique: bool = False) -> Index:
    """An index over the rows where ``where`` holds, on both dialects (both support it)."""
    return Index(
        name, *columns, unique=unique, postgresql_where=text(where), sqlite_where=text(where)
    )


def _kafka_position() -> list[Column[Any]]:
    """Where a record was read: its topic, partition and offset (alerts, dead letters, the
    reservoir; each table keys its rows on them with the pipeline)."""
    return [
        Column("kafka_topic", String(TOPIC_LEN), nullable=False),
        Column("kafka_partition", Integer, nullable=False),
        Column("kafka_offset", BigInteger, nullable=False),
    ]


def _unique_position(name: str) -> UniqueConstraint:
    """At most one row per pipeline and Kafka position (``_kafka_position``)."""
    return UniqueConstraint("pipeline", "kafka_topic", "kafka_partition", "kafka_offset", name=name)


def _id() -> Column[int]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGSERIAL.
    return Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


incidents = Table(
    "incidents",
    metadata,
    _id(),
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    Column("entity", String(ENTITY_LEN), nullable=False),
    Column("first_seen", UTCDateTime(), nullable=False),
    Column("last_seen", UTCDateTime(), nullable=False),
    Column("alert_count", Integer, nullable=False),
    Column("max_severity", String(16), nullable=False),
    Column("status", String(16), nullable=False, server_default="open"),
    CheckConstraint(_in("max_severity", SEVERITIES), name="max_severity"),
    CheckConstraint(_in("status", INCIDENT_STATUSES), name="status"),
    Index(None, "pipeline", "entity", "last_seen"),
    Index(None, "pipeline", "last_seen"),
    # The open incidents, which the notifier reads every cycle (migration 0005).
    _partial_index("ix_incidents_open", "pipeline", where="status = 'open'"),
)

alerts = Table(
    "alerts",
    metadata,
    _id(),
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    Column("record_id", String(RECORD_ID_LEN), nullable=False),
    Column("entity", String(ENTITY_LEN)),
    Column("event_time", UTCDateTime()),
    Column("ingest_time", UTCDateTime(), nullable=False),
    *_kafka_position(),
    Column("model_version", String(MODEL_VERSION_LEN), nullable=False),
    Column("vae_score", Double),
    Column("vae_p", Double),
    Column("flow_score", Double),
    Column("flow_p", Double),
    Column("gan_score", Double),
    Column("gan_p", Double),
    Column("ensemble_score", Double, nullable=False),
    Column("ensemble_p", Double, nullable=False),
    Column("severity", String(16), nullable=False),
    Column("fired_detectors", _json_text(), nullable=False),
    Column("top_features", _json_text(), nullable=False),
    Column("record", _json_text(), nullable=False),
    Column("status", String(16), nullable=False, server_default="open"),
    Column("incident_id", ForeignKey("incidents.id", ondelete="SET NULL")),
    _unique_position("uq_alerts_position"),
    CheckConstraint(_in("severity", SEVERITIES), name="severity"),
    CheckConstraint(_in("status", ALERT_STATUSES), name="status"),
    Index(None, "pipeline", "ingest_time"),
    # Partial: alerts without an entity (or incident) are never looked up by it, and cost two
    # index insertions less (migration 0002). Equality lookups imply NOT NULL and use them.
    _partial_index(None, "entity", where="entity IS NOT NULL"),
    _partial_index(None, "incident_id", where="incident_id IS NOT NULL"),
)

# An analyst's verdict on an alert (``anomaly alerts ack --verdict``), at most one per alert (a
# later verdict replaces it). A table of its own rather than columns on ``alerts``: the alert
# write path (storage/writes.py) neither writes nor indexes anything more, and pruning an alert
# deletes its verdict (ON DELETE CASCADE, migration 0003).
verdicts = Table(
    "verdicts",
    metadata,
    Column(
        "alert_id",
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("alerts.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("verdict", String(16), nullable=False),
    Column("verdict_by", String(VERDICT_BY_LEN), nullable=False),
    Column("verdict_at", UTCDateTime(), nullable=False),
    Column("note", Text),
    CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    _id(),
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    *_kafka_position(),
    Column("raw", LargeBinary, nullable=False),
    Column("error_kind", String(ERROR_KIND_LEN), nullable=False),
    Column("error_message", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    _unique_position("uq_dead_letters_position"),
    Index(None, "pipeline", "created_at"),
)

model_versions = Table(
    "model_versions",
    metadata,
    _id(),
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    Column("version", String(MODEL_VERSION_LEN), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("bundle_path", String(BUNDLE_PATH_LEN), nullable=False),
    Column("bundle_sha256", String(SHA256_LEN), nullable=False),
    Column("metrics", _json(), nullable=False),
    Column("active", Boolean, nullable=False, server_default=text("false")),
    Column("activated_at", UTCDateTime()),
    UniqueConstraint("pipeline", "version"),
    # At most one active version per pipeline (a partial unique index on both dialects).
    _partial_index("uq_model_versions_one_active", "pipeline", where="active", unique=True),
)

stream_stats = Table(
    "stream_stats",
    metadata,
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    Column("minute", UTCDateTime(), nullable=False),
    Column("records_seen", BigInteger, nullable=False, server_default="0"),
    Column("records_scored", BigInteger, nullable=False, server_default="0"),
    Column("records_alerted", BigInteger, nullable=False, server_default="0"),
    Column("records_dead_lettered", BigInteger, nullable=False, server_default="0"),
    Column("score_mean", Double),
    Column("score_p50", Double),
    Column("score_p90", Double),
    Column("score_p99", Double),
    Column("latency_ms_sum", Double, nullable=False, server_default="0"),
    Column("latency_count", BigInteger, nullable=False, server_default="0"),
    Column("latency_ms_max", Double),
    PrimaryKeyConstraint("pipeline", "minute"),
)

consumer_offsets = Table(
    "consumer_offsets",
    metadata,
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    Column("kafka_topic", String(TOPIC_LEN), nullable=False),
    Column("kafka_partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("pipeline", "kafka_topic", "kafka_partition"),
)

# What the Alertmanager notifier last sent for an incident (migration 0005; the notifier):
# a row per incident that was sent at least once. ``labels`` is the label set sent (a new one
# resolves the old in Alertmanager), ``alert_count`` the incident's count at that send.
NOTIFICATION_STATES = ("firing", "resolved")

incident_notifications = Table(
    "incident_notifications",
    metadata,
    Column(
        "incident_id",
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("incidents.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("state", String(16), nullable=False),
    Column("labels", _json(), nullable=False),
    Column("alert_count", Integer, nullable=False),
    Column("first_sent_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=False),
    CheckConstraint(_in("state", NOTIFICATION_STATES), name="state"),
    # The incidents sent firing and not yet resolved, which the notifier reads every cycle.
    _partial_index("ix_incident_notifications_firing", "incident_id", where="state = 'firing'"),
)

# One row per pipeline and closed drift window (anomaly.monitoring.drift, migration 0004).
drift_windows = Table(
    "drift_windows",
    metadata,
    _id(),
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    Column("model_version", String(MODEL_VERSION_LEN)),
    Column("window_start", UTCDateTime(), nullable=False),
    Column("window_end", UTCDateTime(), nullable=False),
    Column("records", BigInteger, nullable=False),
    Column("alerts", BigInteger, nullable=False),
    Column("expected_alert_rate", Double),
    # NULL: fewer records than drift.min_records, no tests run.
    Column("alert_rate_p", Double),
    Column("ks_stat", Double),
    Column("ks_p", Double),
    # [{"feature": name, "psi": value}, ...], highest PSI first.
    Column("top_features", _json(), nullable=False),
    Column("drifted", Boolean, nullable=False),
    Column("reasons", _json(), nullable=False),
    Index(None, "pipeline", "window_start"),
)

# A sample of recent scored records (alerting or not: ``alerted``) for ``anomaly retrain``
# (migration 0006): the rows of the highest ``priority`` (streams.reservoir), at most
# retraining.reservoir_size per pipeline, written in the batch transaction (storage.reservoir).
reservoir = Table(
    "reservoir",
    metadata,
    _id(),
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    *_kafka_position(),
    Column("priority", Double, nullable=False),
    Column("alerted", Boolean, nullable=False),
    Column("model_version", String(MODEL_VERSION_LEN), nullable=False),
    Column("event_time", UTCDateTime()),
    Column("sampled_at", UTCDateTime(), nullable=False),
    Column("record", _json_text(), nullable=False),
    _unique_position("uq_reservoir_position"),
    Index(None, "pipeline", "priority"),
    Index(None, "pipeline", "sampled_at"),
)

# How many reservoir rows each pipeline has (migration 0007): kept by the batch that changes them
# (and by prune), under this row's lock, so a batch knows whether the reservoir is full without
# walking its (pipeline, priority) index (storage.reservoir).
reservoir_counts = Table(
    "reservoir_counts",
    metadata,
    Column("pipeline", String(PIPELINE_LEN), nullable=False),
    Column("n_rows", BigInteger, nullable=False),
    PrimaryKeyConstraint("pipeline"),
)

TABLES = (
    alerts,
    incidents,
    verdicts,
    dead_letters,
    model_versions,
    stream_stats,
    consumer_offsets,
    incident_notifications,
    drift_windows,
    reservoir,
    reservoir_counts,
)
