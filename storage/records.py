"""Plain records handed from the service loop to the store: no SQLAlchemy, no Kafka.

``streams`` builds one ``SinkBatch`` per micro-batch; ``AlertStore.write_batch`` writes all of it
in one transaction. Kafka positions are plain strings and integers here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from storage.sanitize import JSONText

SEVERITIES = ("low", "medium", "high", "critical")


@dataclass(slots=True)
class AlertRecord:
    pipeline: str
    record_id: str
    entity: str | None
    event_time: datetime | None
    ingest_time: datetime
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    model_version: str
    ensemble_score: float
    ensemble_p: float
    severity: str
    # Per-detector score and p-value; a detector not in the model is None.
    vae_score: float | None = None
    vae_p: float | None = None
    flow_score: float | None = None
    flow_p: float | None = None
    gan_score: float | None = None
    gan_p: float | None = None
    fired_detectors: list[str] = field(default_factory=list)
    top_features: list[dict[str, Any]] = field(default_factory=list)
    # The record's fields, or its JSON as it arrived when that is clean (``JSONText``).
    record: dict[str, Any] | JSONText = field(default_factory=dict)


@dataclass(slots=True)
class DeadLetterRecord:
    pipeline: str
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    raw: bytes
    error_kind: str  # short machine-readable reason: invalid_json, missing_field, wrong_type, ...
    error_message: str  # names the field or the position at fault
    created_at: datetime


@dataclass(slots=True)
class StreamStatRecord:
    """One batch's contribution to a (pipeline, minute) row; counts add up across batches."""

    pipeline: str
    minute: datetime
    records_seen: int = 0
    records_scored: int = 0
    records_alerted: int = 0
    records_dead_lettered: int = 0
    score_mean: float | None = None
    score_p50: float | None = None
    score_p90: float | None = None
    score_p99: float | None = None
    latency_ms_sum: float = 0.0
    latency_count: int = 0
    latency_ms_max: float | None = None


@dataclass(slots=True)
class OffsetRecord:
    pipeline: str
    kafka_topic: str
    kafka_partition: int
    next_offset: int  # the offset of the next record to read (Kafka's committed-offset meaning)
    # Offset of the first record of this batch in this partition. Optional; when given, the store
    # can scale the batch's statistics down by the share of records another consumer already
    # wrote (offset fencing), instead of only dropping them when the whole batch is stale.
    first_offset: int | None = None


@dataclass(slots=True)
class ReservoirRecord:
    """A scored record sampled for retraining (storage.reservoir)."""

    pipeline: str
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    priority: float  # the reservoir keeps the highest priorities (streams.reservoir)
    alerted: bool
    model_version: str
    sampled_at: datetime
    event_time: datetime | None = None
    record: dict[str, Any] | JSONText = field(default_factory=dict)  # as AlertRecord.record


@dataclass(slots=True)
class SinkBatch:
    pipeline: str
    alerts: list[AlertRecord] = field(default_factory=list)
    dead_letters: list[DeadLetterRecord] = field(default_factory=list)
    stats: list[StreamStatRecord] = field(default_factory=list)
    offsets: list[OffsetRecord] = field(default_factory=list)
    # Reservoir candidates and the reservoir's size and retention (0: no reservoir).
    reservoir: list[ReservoirRecord] = field(default_factory=list)
    reservoir_size: int = 0
    reservoir_retention_s: float = 0.0


@dataclass(slots=True)
class WriteResult:
    alerts_written: int  # new alert rows (replays and fenced records are not counted)
    dead_letters_written: int
    incidents_opened: int
    records_fenced: int  # records dropped because the stored offset was already past them
    # The lowest priority the full reservoir keeps (None: not full, or nothing sampled).
    reservoir_threshold: float | None = None


@dataclass(slots=True)
class ModelVersionRecord:
    pipeline: str
    version: str
    bundle_path: str
    bundle_sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    active: bool = False
    activated_at: datetime | None = None

    @classmethod
    def of_bundle(cls, pipeline: str, model: Any, root: Path, **metrics: Any) -> ModelVersionRecord:
        """The record of a loaded ``AnomalyModel``'s bundle at ``root``: the identity of the very
        bytes that were verified (reading manifest.json again could register a manifest swapped in
        meanwhile), its metrics less the training history, plus ``metrics``."""
        sha = model.bundle_sha256_
        return cls(
            pipeline=pipeline,
            version=str(model.version or sha[:12]),
            bundle_path=str(root),
            bundle_sha256=sha,
            metrics={k: v for k, v in model.metrics_.items() if k != "training"} | metrics,
        )
