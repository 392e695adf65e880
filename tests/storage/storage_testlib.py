"""Builders of realistic sink batches for the storage tests (no mocks: plain records)."""

from __future__ import annotations

import multiprocessing as mp
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.records import (
    AlertRecord,
    DeadLetterRecord,
    OffsetRecord,
    SinkBatch,
    StreamStatRecord,
)

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def alert(
    offset: int,
    *,
    pipeline: str = "cards",
    topic: str = "tx",
    partition: int = 0,
    entity: str | None = "card-1",
    event_time: datetime | None = None,
    ingest_time: datetime | None = None,
    severity: str = "high",
    record: dict | None = None,
) -> AlertRecord:
    when = event_time if event_time is not None else T0 + timedelta(seconds=offset)
    return AlertRecord(
        pipeline=pipeline,
        record_id=f"rec-{partition}-{offset}",
        entity=entity,
        event_time=when,
        ingest_time=ingest_time or when + timedelta(milliseconds=50),
        kafka_topic=topic,
        kafka_partition=partition,
        kafka_offset=offset,
        model_version="v1",
        ensemble_score=10.0 + offset % 7,
        ensemble_p=0.0001,
        severity=severity,
        vae_score=1.5,
        vae_p=0.001,
        flow_score=2.5,
        flow_p=0.002,
        gan_score=0.5,
        gan_p=0.3,
        fired_detectors=["vae", "flow"],
        top_features=[{"feature": "amount", "value": 999.0, "contribution": 0.8}],
        record=record if record is not None else {"id": f"rec-{offset}", "amount": 999.0},
    )


def dead_letter(offset: int, *, pipeline: str = "cards", topic: str = "tx", partition: int = 0):
    return DeadLetterRecord(
        pipeline=pipeline,
        kafka_topic=topic,
        kafka_partition=partition,
        kafka_offset=offset,
        raw=b'{"amount": "oops"\xff',
        error_kind="invalid_json",
        error_message=f"offset {offset}: not valid JSON",
        created_at=T0 + timedelta(seconds=offset),
    )


def range_batch(
    first: int,
    end: int,
    *,
    pipeline: str = "cards",
    topic: str = "tx",
    partition: int = 0,
    alert_every: int = 3,
    dead_every: int = 10,
    entity_of=lambda offset: f"card-{offset % 4}",
    with_first_offset: bool = True,
) -> SinkBatch:
    """The batch a consumer writes after reading offsets [first, end) of one partition."""
    alerts = [
        alert(o, pipeline=pipeline, topic=topic, partition=partition, entity=entity_of(o))
        for o in range(first, end)
        if o % alert_every == 0 and o % dead_every != 0
    ]
    dead = [
        dead_letter(o, pipeline=pipeline, topic=topic, partition=partition)
        for o in range(first, end)
        if o % dead_every == 0
    ]
    n = end - first
    stats = StreamStatRecord(
        pipeline=pipeline,
        minute=T0,
        records_seen=n,
        records_scored=n - len(dead),
        records_alerted=len(alerts),
        records_dead_lettered=len(dead),
        score_mean=1.0,
        score_p50=0.8,
        score_p90=2.0,
        score_p99=5.0,
        latency_ms_sum=12.5 * n,
        latency_count=n,
        latency_ms_max=40.0,
    )
    offsets = OffsetRecord(
        pipeline, topic, partition, end, first_offset=first if with_first_offset else None
    )
    return SinkBatch(
        pipeline=pipeline, alerts=alerts, dead_letters=dead, stats=[stats], offsets=[offsets]
    )


def table_rows(store: Any, name: str, order_by: str = "") -> list[tuple]:
    """Every row of a table, as tuples, for before/after comparisons."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        sql = f"SELECT * FROM {name}" + (f" ORDER BY {order_by}" if order_by else "")
        return [tuple(r) for r in conn.execute(text(sql))]


def reservoir_row(pipeline: str, offset: int, sampled_at: datetime) -> dict[str, Any]:
    """A reservoir row to insert by hand (``insert(schema.reservoir)``), as a migration or a
    tool other than the service would leave it."""
    return dict(
        pipeline=pipeline, kafka_topic="tx", kafka_partition=0, kafka_offset=offset,
        priority=1.0, alerted=False, model_version="v1", event_time=sampled_at,
        sampled_at=sampled_at, record={"id": str(offset)},
    )  # fmt: skip


def run_together(target: Any, args: list[tuple]) -> None:
    """``target(*a, start, errors)`` in one forked process per ``a``, all released at once;
    fails with the errors the processes reported. Fork only after this process has closed
    its connections: the children open their own."""
    ctx = mp.get_context("fork")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, errors)) for a in args]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
    assert all(p.exitcode == 0 for p in procs), [errors.get() for _ in range(errors.qsize())]


def reservoir_counts(store: Any) -> dict[str, int]:
    """``reservoir_counts`` as stored: pipeline -> its count of reservoir rows."""
    return dict(table_rows(store, "reservoir_counts"))
