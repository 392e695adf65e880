"""One micro-batch as the scoring service holds it, and what it writes of it: the ``SinkBatch``
(alerts, dead letters, per-minute statistics, next offsets) and the scores topic's messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import numpy as np

from anomaly.config import DETECTOR_NAMES
from storage.records import (
    AlertRecord,
    DeadLetterRecord,
    OffsetRecord,
    SinkBatch,
    StreamStatRecord,
)
from storage.sanitize import JSONText
from streams.decode import DecodedBatch, Rejected

# Detectors with their own score columns in the alerts table (the knn members' scores reach
# the scores topic and the ensemble, not columns of their own).
DETECTORS = ("vae", "flow", "gan")


@dataclass(slots=True)
class Message:
    """The parts of a confluent_kafka.Message the loop needs (read once, in C, per batch)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    timestamp_ms: int | None


def build_sink_batch(
    cfg: Any,
    messages: list[Message],
    decoded: DecodedBatch,
    result: Any,
    version: str,
    ingest: datetime,
    record_fields: Callable[[bytes | None], dict[str, Any] | JSONText],
) -> tuple[SinkBatch, list[tuple[bytes, bytes]], np.ndarray | None]:
    """What one scored batch writes: the ``SinkBatch``, the scores topic's (key, value) messages
    and each scored record's seconds from its event time to ``ingest`` (``None`` without a
    time field or without scored records). ``result`` is ``None`` when nothing was scored;
    ``record_fields`` gives the stored fields of an alert's record."""
    s = cfg.schema
    pipeline = cfg.name
    alerts: list[AlertRecord] = []
    scores_out: list[tuple[bytes, bytes]] = []
    latencies: np.ndarray | None = None
    ensemble = None
    if result is not None:
        ensemble = result.columns["ensemble"]
        ids = decoded.frame[s.id_field].to_numpy(dtype=object)
        times = decoded.frame[s.time_field] if s.time_field else None
        if times is not None:
            # Seconds from the event to ingest (the commit time is added by the caller).
            event_s = times.to_numpy("datetime64[ns]").astype(np.int64) / 1e9
            latencies = ingest.timestamp() - event_s
        alerts = _alerts(
            pipeline, version, s.entity_field, messages, decoded, result, ids, times, ingest,
            record_fields,
        )  # fmt: skip
        if cfg.kafka.scores_topic:
            scores_out = _score_messages(pipeline, version, ids, times, result)
    dead = _dead_letters(pipeline, messages, decoded.rejected, ingest)
    offsets = _offsets(pipeline, messages)
    stat = _stream_stat(
        pipeline, len(messages), decoded.n_valid, len(alerts), len(dead), ensemble, latencies,
        ingest,
    )  # fmt: skip
    batch = SinkBatch(
        pipeline=pipeline, alerts=alerts, dead_letters=dead, stats=[stat], offsets=offsets
    )
    return batch, scores_out, latencies


def _alerts(
    pipeline: str,
    version: str,
    entity_field: str | None,
    messages: list[Message],
    decoded: DecodedBatch,
    result: Any,
    ids: np.ndarray,
    times: Any,
    ingest: datetime,
    record_fields: Callable[[bytes | None], dict[str, Any] | JSONText],
) -> list[AlertRecord]:
    """One ``AlertRecord`` per scored row over the threshold."""
    columns = result.columns
    alert_rows = np.flatnonzero(result.is_alert)
    # The alert rows' entities and event times in one lookup each, not one per alert.
    entities = _entities(decoded.frame, entity_field, alert_rows)
    event_times = (
        times.iloc[alert_rows].dt.to_pydatetime().tolist()
        if times is not None
        else [None] * len(alert_rows)
    )
    alerts: list[AlertRecord] = []
    for k, row in enumerate(alert_rows.tolist()):
        i = int(decoded.index[row])
        msg = messages[i]
        alerts.append(
            AlertRecord(
                pipeline=pipeline,
                record_id=str(ids[row]),
                entity=entities[k],
                event_time=event_times[k],
                ingest_time=ingest,
                kafka_topic=msg.topic,
                kafka_partition=msg.partition,
                kafka_offset=msg.offset,
                model_version=version,
                ensemble_score=float(columns["ensemble"][row]),
                ensemble_p=float(columns["ensemble_p"][row]),
                severity=str(result.severity[row]),
                **_detector_scores(columns, row),
                fired_detectors=list(result.fired[row]),
                top_features=list(result.top_features[row]),
                record=record_fields(msg.value),
            )
        )
    return alerts


def _dead_letters(
    pipeline: str, messages: list[Message], rejected: list[Rejected], ingest: datetime
) -> list[DeadLetterRecord]:
    return [
        DeadLetterRecord(
            pipeline=pipeline,
            kafka_topic=messages[r.index].topic,
            kafka_partition=messages[r.index].partition,
            kafka_offset=messages[r.index].offset,
            raw=messages[r.index].value or b"",
            error_kind=r.error_kind,
            error_message=r.error_message,
            created_at=ingest,
        )
        for r in rejected
    ]


def _stream_stat(
    pipeline: str,
    seen: int,
    scored: int,
    alerted: int,
    dead_lettered: int,
    ensemble: np.ndarray | None,
    latencies: np.ndarray | None,
    ingest: datetime,
) -> StreamStatRecord:
    """The batch's share of its minute's statistics (summed per minute by the store)."""
    stat = StreamStatRecord(
        pipeline=pipeline,
        minute=ingest.replace(second=0, microsecond=0),
        records_seen=seen,
        records_scored=scored,
        records_alerted=alerted,
        records_dead_lettered=dead_lettered,
    )
    if ensemble is not None and len(ensemble):
        stat.score_mean = float(ensemble.mean())
        p50, p90, p99 = np.quantile(ensemble, [0.5, 0.9, 0.99])
        stat.score_p50, stat.score_p90, stat.score_p99 = float(p50), float(p90), float(p99)
    if latencies is not None and len(latencies):
        ms = latencies * 1000.0
        stat.latency_ms_sum = float(ms.sum())
        stat.latency_count = len(ms)
        stat.latency_ms_max = float(ms.max())
    return stat


def _entities(frame: Any, entity_field: str | None, rows: np.ndarray) -> list[str | None]:
    if not entity_field:
        return [None] * len(rows)
    values = frame[entity_field].to_numpy(dtype=object)[rows].tolist()
    return [None if v is None or v != v else str(v) for v in values]


def _detector_scores(columns: dict[str, np.ndarray], row: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in DETECTORS:
        score, p = columns.get(name), columns.get(f"{name}_p")
        out[f"{name}_score"] = None if score is None else _finite(score[row])
        out[f"{name}_p"] = None if p is None else _finite(p[row])
    return out


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


_ENCODE = msgspec.json.Encoder().encode


def partition_bounds(
    messages: list[Message],
) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
    """The first and the last offset of each (topic, partition) in ``messages``, in the order
    the partitions first appear (a partition's records come in offset order)."""
    first: dict[tuple[str, int], int] = {}
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        if key not in first:
            first[key] = m.offset
        last[key] = m.offset
    return first, last


def _offsets(pipeline: str, messages: list[Message]) -> list[OffsetRecord]:
    first, last = partition_bounds(messages)
    return [
        OffsetRecord(pipeline, t, p, next_offset=last[(t, p)] + 1, first_offset=first[(t, p)])
        for (t, p) in first
    ]


def _score_messages(
    pipeline: str, version: str, ids: np.ndarray, times: Any, result: Any
) -> list[tuple[bytes, bytes]]:
    n = len(ids)
    columns = result.columns
    names = [c for c in (*DETECTOR_NAMES, "ensemble") if c in columns]
    values = {c: columns[c].tolist() for c in names} | {
        f"{c}_p": columns[f"{c}_p"].tolist() for c in names
    }
    event_times = (
        times.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").tolist() if times is not None else [None] * n
    )
    alert = result.is_alert.tolist()
    severity = result.severity.tolist()
    out = []
    for i in range(n):
        record_id, kafka_key = _id_and_key(str(ids[i]))
        body = {"record_id": record_id, "pipeline": pipeline, "model_version": version}
        for key, col in values.items():
            body[key] = col[i]
        body["alert"] = alert[i]
        body["severity"] = severity[i]
        body["event_time"] = event_times[i]
        out.append((kafka_key, _ENCODE(body)))
    return out


def _id_and_key(record_id: str) -> tuple[str, bytes]:
    """A score's record id and its Kafka key (the id's UTF-8). The decoders reject an id with a
    lone surrogate (``\\ud800``); should one get through anyway, it is written as its escape,
    not left to stop the service with a UnicodeEncodeError on the worker thread."""
    try:
        return record_id, record_id.encode()
    except UnicodeEncodeError:
        escaped = record_id.encode("utf-8", "backslashreplace").decode("utf-8")
        return escaped, escaped.encode()
