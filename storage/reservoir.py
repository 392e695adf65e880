"""The retraining reservoir in SQL (migration 0006): written with the batch, read by retrain.

``write_reservoir`` runs inside ``AlertWriter``'s batch transaction, after the offsets are locked,
and only for a batch with candidates (``SinkBatch.reservoir``; most batches have none once the
reservoir is full, see streams.reservoir). It

1. locks the pipeline's row of ``reservoir_counts`` (migration 0007), which holds how many rows
   the reservoir has: every change to a pipeline's reservoir rows takes this lock first, so the
   count is exact and concurrent writers (other partitions' consumers, ``prune``, which counts
   the rows anew) change them one after another;
2. drops candidates below their partition's stored next offset (the alerts' fencing rule: a
   replayed or zombie batch samples nothing) and inserts the rest with ON CONFLICT DO NOTHING on
   the Kafka position (a record is in the reservoir at most once);
3. deletes the pipeline's rows sampled more than ``retention_s`` ago;
4. keeps the ``reservoir_size`` rows of the highest priority: deletes as many of the lowest as
   the count is over (a walk of that many entries of the (pipeline, priority) index) and stores
   the new count.

It returns the lowest priority kept once the reservoir is full (``None`` before): the service
samples only records above it from then on. Before the count, a batch found out whether the
reservoir was full by walking ``reservoir_size`` index entries, on every batch until it was.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, exists, func, select

from storage import schema as s
from storage.engine import Database, utc
from storage.offsets import StoredOffsets
from storage.records import SinkBatch
from storage.sanitize import clean_text, json_text


def write_reservoir(
    db: Database, conn: Connection, batch: SinkBatch, stored: StoredOffsets
) -> float | None:
    t = s.reservoir
    pipeline = batch.pipeline
    count = _lock_count(db, conn, pipeline)
    rows = [
        (
            r.pipeline,
            clean_text(r.kafka_topic, s.TOPIC_LEN),
            int(r.kafka_partition),
            int(r.kafka_offset),
            float(r.priority),
            bool(r.alerted),
            clean_text(r.model_version, s.MODEL_VERSION_LEN),
            r.event_time,
            r.sampled_at,
            json_text(r.record),
        )
        for r in batch.reservoir
        if not _fenced(r.pipeline, r.kafka_topic, r.kafka_partition, r.kafka_offset, stored)
    ]
    changed = 0
    if rows:  # else a replay: nothing to add, the threshold is still worth returning
        changed += _insert(conn, rows)
        if batch.reservoir_retention_s > 0:
            newest = max(utc(row[_SAMPLED_AT]) for row in rows)
            cutoff = newest - timedelta(seconds=batch.reservoir_retention_s)
            changed -= conn.execute(
                delete(t).where(t.c.pipeline == pipeline, t.c.sampled_at < cutoff)
            ).rowcount
    excess = count + changed - batch.reservoir_size
    if excess > 0:
        lowest = (
            select(t.c.id)
            .where(t.c.pipeline == pipeline)
            .order_by(t.c.priority)
            .limit(excess)
            .scalar_subquery()
        )
        changed -= conn.execute(delete(t).where(t.c.id.in_(lowest))).rowcount
    if changed:
        count += changed
        _store_count(db, conn, pipeline, count)
    if count < batch.reservoir_size:
        return None
    lowest_kept = conn.execute(select(func.min(t.c.priority)).where(t.c.pipeline == pipeline))
    value = lowest_kept.scalar()
    return None if value is None else float(value)


def _lock_count(db: Database, conn: Connection, pipeline: str) -> int:
    """The pipeline's reservoir row count, its ``reservoir_counts`` row locked until the
    transaction ends (created at 0 for a new pipeline). SQLite ignores FOR UPDATE: its writers
    take the whole database in turn."""
    c = s.reservoir_counts
    locked = select(c.c.n_rows).where(c.c.pipeline == pipeline).with_for_update()
    count = conn.execute(locked).scalar()
    if count is None:
        # A first batch of the pipeline; a concurrent one may insert the row first (then this
        # waits for it and inserts nothing).
        conn.execute(db.insert(c).values(pipeline=pipeline, n_rows=0).on_conflict_do_nothing())
        count = conn.execute(locked).scalar_one()
    return int(count)


def prune_reservoir(db: Database, conn: Connection, cutoff: datetime, pipeline: str | None) -> int:
    """Delete the reservoir rows sampled before ``cutoff`` (of ``pipeline``, or of all) and
    count the rows left into ``reservoir_counts``; how many were deleted. The counts are locked
    first, as a batch's write locks them before it changes rows (``write_reservoir``). Counting
    (not subtracting) also mends a count that rows written another way put off (an older service
    during an upgrade, a hand-made insert)."""
    t, c = s.reservoir, s.reservoir_counts
    lock = select(c.c.pipeline).with_for_update()
    old = t.c.sampled_at < cutoff
    counted = select(t.c.pipeline, func.count()).group_by(t.c.pipeline)
    if pipeline is not None:
        lock, old = lock.where(c.c.pipeline == pipeline), old & (t.c.pipeline == pipeline)
        counted = counted.where(t.c.pipeline == pipeline)
    known = set(conn.execute(lock).scalars())
    deleted = conn.execute(delete(t).where(old)).rowcount
    counts = dict.fromkeys(known, 0) | {name: n for name, n in conn.execute(counted)}
    for name, n in counts.items():
        _store_count(db, conn, name, n)
    return deleted


def _store_count(db: Database, conn: Connection, pipeline: str, count: int) -> None:
    """Set the pipeline's count (its row created if prune counts rows that had none)."""
    upsert = db.upsert(s.reservoir_counts, ["pipeline"], ["n_rows"])
    conn.execute(upsert, {"pipeline": pipeline, "n_rows": count})


# A reservoir row as ``_insert`` takes it (``write_reservoir`` builds them in this order).
_COLUMNS = (
    "pipeline",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "priority",
    "alerted",
    "model_version",
    "event_time",
    "sampled_at",
    "record",
)
_SAMPLED_AT = _COLUMNS.index("sampled_at")


def _insert(conn: Connection, rows: list[tuple[Any, ...]]) -> int:
    """Insert ``rows`` (``_COLUMNS`` order), skipping Kafka positions already in the reservoir;
    the number inserted (the driver's executemany rowcount: SQLite and psycopg both sum it and
    leave out the skipped rows).

    Through the DB-API's executemany, each value bound by its column type's own processor
    (the UTC datetimes, SQLite's booleans and datetime text): SQLAlchemy's insert spent ~36 us
    per row in Python binding parameters against ~5 us in SQLite itself (cProfile and cursor
    timings of 200-record batches, docs/benchmarks.md "The pipelined loop"), and a fresh
    service samples every record until its reservoir is full."""
    dialect = conn.dialect
    columns = [s.reservoir.c[name] for name in _COLUMNS]
    binders = [
        (i, c.type.dialect_impl(dialect).bind_processor(dialect)) for i, c in enumerate(columns)
    ]
    binders = [(i, bind) for i, bind in binders if bind is not None]
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"INSERT INTO {s.reservoir.name} ({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join([marker] * len(_COLUMNS))}) "
        "ON CONFLICT (pipeline, kafka_topic, kafka_partition, kafka_offset) DO NOTHING"
    )
    # The rows of a batch share one sampled_at: bound once per distinct value.
    sampled_at = dict(binders).pop(_SAMPLED_AT, None)
    binders = [(i, bind) for i, bind in binders if i != _SAMPLED_AT]
    bound_times: dict[Any, Any] = {}
    params = []
    for row in rows:
        values = list(row)
        for i, bind in binders:
            values[i] = bind(values[i])
        if sampled_at is not None:
            at = values[_SAMPLED_AT]
            if at not in bound_times:
                bound_times[at] = sampled_at(at)
            values[_SAMPLED_AT] = bound_times[at]
        params.append(tuple(values))
    return conn.exec_driver_sql(sql, params).rowcount


def _fenced(pipeline: str, topic: str, partition: int, offset: int, stored: StoredOffsets) -> bool:
    next_offset = stored.get((pipeline, topic, partition))
    return next_offset is not None and offset < next_offset


def reservoir_rows(
    db: Database, pipeline: str, since: datetime | None = None
) -> list[dict[str, Any]]:
    """The pipeline's reservoir rows sampled at or after ``since``, oldest record first, without
    the records an analyst confirmed as anomalies: an alert at the same Kafka position with a
    ``true_positive`` verdict (table ``verdicts``, migration 0003). Alerting records without
    such a verdict stay (``alerted`` says which; ``anomaly retrain --exclude-alerts`` drops
    them)."""
    t, a, v = s.reservoir, s.alerts, s.verdicts
    confirmed = exists(
        select(1)
        .select_from(a.join(v, v.c.alert_id == a.c.id))
        .where(
            a.c.pipeline == t.c.pipeline,
            a.c.kafka_topic == t.c.kafka_topic,
            a.c.kafka_partition == t.c.kafka_partition,
            a.c.kafka_offset == t.c.kafka_offset,
            v.c.verdict == "true_positive",
        )
    )
    query = select(t).where(t.c.pipeline == pipeline, ~confirmed)
    if since is not None:
        query = query.where(t.c.sampled_at >= utc(since))
    query = query.order_by(t.c.event_time, t.c.kafka_partition, t.c.kafka_offset)
    return db.rows("reading the retraining reservoir", query)


def reservoir_count(db: Database, pipeline: str) -> int:
    t = s.reservoir
    with db.transaction("counting the retraining reservoir", write=False) as conn:
        return int(conn.execute(select(func.count()).where(t.c.pipeline == pipeline)).scalar())
