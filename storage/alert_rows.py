"""Alert rows as the store writes them: the per-alert part of the hot write path.

An alert row is a list in ``ALERT_COLUMNS`` order (no dict or object per alert), with the JSON
columns still as Python values: they are encoded while the row is written (``json_values``), by
msgspec to bytes for PostgreSQL's binary COPY, to text for SQLAlchemy's executemany.
POSITIONAL_ROWS_FIGURE
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage import schema as s
from storage.engine import utc
from storage.records import SEVERITIES, AlertRecord
from storage.sanitize import clean_text

SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}
# Columns of an alert row as the store writes them (id and incident_id are set by the database).
ALERT_COLUMNS = (
    "pipeline",
    "record_id",
    "entity",
    "event_time",
    "ingest_time",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "model_version",
    "vae_score",
    "vae_p",
    "flow_score",
    "flow_p",
    "gan_score",
    "gan_p",
    "ensemble_score",
    "ensemble_p",
    "severity",
    "fired_detectors",
    "top_features",
    "record",
    "status",
    "incident_id",
)
# The index of each column in a row.
_COLUMN = {name: i for i, name in enumerate(ALERT_COLUMNS)}
PIPELINE, ENTITY, TOPIC = _COLUMN["pipeline"], _COLUMN["entity"], _COLUMN["kafka_topic"]
PARTITION, OFFSET, SEVERITY = (
    _COLUMN["kafka_partition"],
    _COLUMN["kafka_offset"],
    _COLUMN["severity"],
)
EVENT_TIME, INGEST_TIME = _COLUMN["event_time"], _COLUMN["ingest_time"]
FIRED, TOP_FEATURES, RECORD = (
    _COLUMN["fired_detectors"],
    _COLUMN["top_features"],
    _COLUMN["record"],
)
INCIDENT_ID = _COLUMN["incident_id"]

# PostgreSQL's binary COPY of alert rows (see writes.AlertWriter._copy_alerts). The JSON columns
# are ``json`` there (text stored as is, migration 0002), so their binary COPY form is the UTF-8
# bytes msgspec produces: declared as bytea, psycopg passes them through untouched.
COPY_TYPES = [
    *("text", "text", "text", "timestamptz", "timestamptz", "text", "int4", "int8", "text"),
    *("float8",) * 8,
    "text",
    *("bytea",) * 3,
    "text",
    "int8",
]
ALERT_COPY = f"COPY alerts ({', '.join(ALERT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"

_PIPELINE_LEN, _RECORD_ID_LEN, _ENTITY_LEN = s.PIPELINE_LEN, s.RECORD_ID_LEN, s.ENTITY_LEN
_TOPIC_LEN, _MODEL_VERSION_LEN = s.TOPIC_LEN, s.MODEL_VERSION_LEN


def alert_row(a: AlertRecord) -> list[Any]:
    """An alert as a list in ``ALERT_COLUMNS`` order: texts cleaned, times UTC, numbers as
    floats; the JSON columns still as Python values (encoded by ``json_values`` at write time)."""
    # Runs once per alert on the hot path: plain expressions, no helper calls where avoidable.
    if a.severity not in SEVERITY_RANK:
        raise ValueError(
            f"alert {a.record_id!r} at {a.kafka_topic}/{a.kafka_partition}/{a.kafka_offset}: "
            f"severity {a.severity!r} is not one of {', '.join(SEVERITIES)}"
        )
    entity, event_time, record = a.entity, a.event_time, a.record
    vae_score, vae_p, flow_score, flow_p = a.vae_score, a.vae_p, a.flow_score, a.flow_p
    gan_score, gan_p = a.gan_score, a.gan_p
    return [
        clean_text(a.pipeline, _PIPELINE_LEN),
        clean_text(a.record_id, _RECORD_ID_LEN),
        None if entity is None else clean_text(entity, _ENTITY_LEN),
        None if event_time is None else utc(event_time),
        utc(a.ingest_time),
        clean_text(a.kafka_topic, _TOPIC_LEN),
        int(a.kafka_partition),
        int(a.kafka_offset),
        clean_text(a.model_version, _MODEL_VERSION_LEN),
        None if vae_score is None else float(vae_score),
        None if vae_p is None else float(vae_p),
        None if flow_score is None else float(flow_score),
        None if flow_p is None else float(flow_p),
        None if gan_score is None else float(gan_score),
        None if gan_p is None else float(gan_p),
        float(a.ensemble_score),
        float(a.ensemble_p),
        a.severity,
        a.fired_detectors,
        a.top_features,
        record if record is not None else {},
        "open",  # status
        None,  # incident_id: set by the incident grouping
    ]


_FIRED_JSON: dict[tuple[Callable[[Any], Any], tuple[str, ...]], Any] = {}


def _fired_json(fired: Any, encode: Callable[[Any], Any]) -> Any:
    """The few distinct detector lists, encoded once each."""
    key = (encode, tuple(fired))
    encoded = _FIRED_JSON.get(key)
    if encoded is None:
        encoded = encode(list(key[1]))
        if len(_FIRED_JSON) < 64:
            _FIRED_JSON[key] = encoded
    return encoded


def json_values(row: list[Any], encode: Callable[[Any], Any]) -> list[Any]:
    """A copy of an alert row with its JSON columns encoded (clean JSON, see sanitize.py).

    A copy, so that a retried batch starts again from the Python values."""
    values = row.copy()
    values[FIRED] = _fired_json(values[FIRED], encode)
    values[TOP_FEATURES] = encode(values[TOP_FEATURES])
    values[RECORD] = encode(values[RECORD])
    return values


def position(row: list[Any]) -> tuple[str, str, int, int]:
    """(pipeline, topic, partition, offset): the row's unique key."""
    return (row[PIPELINE], row[TOPIC], row[PARTITION], row[OFFSET])


def in_order(rows: list[list[Any]]) -> bool:
    """Do the rows come from one partition with strictly rising offsets (the usual batch)?"""
    first = rows[0]
    pipeline, topic, partition, prev = first[PIPELINE], first[TOPIC], first[PARTITION], -1
    for row in rows:
        offset = row[OFFSET]
        if (
            offset <= prev
            or row[PARTITION] != partition
            or row[TOPIC] != topic
            or row[PIPELINE] != pipeline
        ):
            return False
        prev = offset
    return True
