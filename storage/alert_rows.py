"""Alert rows as the store writes them: the per-alert part of the hot write path.

An alert row is a list in ``ALERT_COLUMNS`` order (no dict or object per alert), with the JSON
columns still as Python values: they are encoded while the row is written (``json_values``), by
msgspec to bytes for PostgreSQL's binary COPY, to text for SQLAlchemy's executemany.

Positional on purpose: a slots dataclass per alert, turned into a tuple for COPY, costs
0.38-0.46 us more per alert to build and encode (on 3.3-3.8 us; ``python bench/storage_rows.py``,
line "row + COPY values", five quiet runs), ~6% of the ~6-8 us of client CPU per alert in
bench/storage.py's ``new`` scenario. The indexes below name the columns the store reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage import schema as s
from storage.engine import utc
from storage.records import SEVERITIES, AlertRecord
from storage.sanitize import clean_float, clean_text

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


def alert_row(a: AlertRecord) -> list[Any]:
    """An alert as a list in ``ALERT_COLUMNS`` order: texts cleaned, times UTC, numbers as
    floats; the JSON columns still as Python values (encoded by ``json_values`` at write time)."""
    if a.severity not in SEVERITY_RANK:
        raise ValueError(
            f"alert {a.record_id!r} at {a.kafka_topic}/{a.kafka_partition}/{a.kafka_offset}: "
            f"severity {a.severity!r} is not one of {', '.join(SEVERITIES)}"
        )
    return [
        clean_text(a.pipeline, s.PIPELINE_LEN),
        clean_text(a.record_id, s.RECORD_ID_LEN),
        None if a.entity is None else clean_text(a.entity, s.ENTITY_LEN),
        None if a.event_time is None else utc(a.event_time),
        utc(a.ingest_time),
        clean_text(a.kafka_topic, s.TOPIC_LEN),
        int(a.kafka_partition),
        int(a.kafka_offset),
        clean_text(a.model_version, s.MODEL_VERSION_LEN),
        clean_float(a.vae_score),
        clean_float(a.vae_p),
        clean_float(a.flow_score),
        clean_float(a.flow_p),
        clean_float(a.gan_score),
        clean_float(a.gan_p),
        float(a.ensemble_score),
        float(a.ensemble_p),
        a.severity,
        a.fired_detectors,
        a.top_features,
        a.record if a.record is not None else {},
        "open",  # status
        None,  # incident_id: set by the incident grouping
    ]


def json_values(row: list[Any], encode: Callable[[Any], Any]) -> list[Any]:
    """A copy of an alert row with its JSON columns encoded (clean JSON, see sanitize.py).

    A copy, so that a retried batch starts again from the Python values."""
    values = row.copy()
    values[FIRED] = _fired_json(values[FIRED], encode)
    values[TOP_FEATURES] = encode(values[TOP_FEATURES])
    values[RECORD] = encode(values[RECORD])
    return values


# The few distinct detector lists, encoded once each: saves ~0.15 us per alert on the COPY path
# (0.14 instead of 0.29 us; bench/storage_rows.py, "detector list"), ~2% of the ~6-8 us of client
# CPU per alert of bench/storage.py's ``new`` scenario, and more on the executemany path.
_FIRED_JSON: dict[tuple[Callable[[Any], Any], tuple[str, ...]], Any] = {}


def _fired_json(fired: Any, encode: Callable[[Any], Any]) -> Any:
    key = (encode, tuple(fired))
    encoded = _FIRED_JSON.get(key)
    if encoded is None:
        encoded = encode(list(key[1]))
        if len(_FIRED_JSON) < 64:  # bounded, should the lists ever vary
            _FIRED_JSON[key] = encoded
    return encoded


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
