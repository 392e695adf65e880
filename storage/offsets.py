"""Consumer offsets: stored with each batch, in the batch's transaction, and used to fence out
records another consumer has written already (see ``writes``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, delete, select

from storage import schema as s
from storage.engine import Database
from storage.records import OffsetRecord


class Partition(NamedTuple):
    """A Kafka partition of a pipeline: the key of a ``consumer_offsets`` row. Equal to the plain
    tuple of the same values, so either can look up a ``dict[Partition, int]``."""

    pipeline: str
    kafka_topic: str
    kafka_partition: int


# The next offsets stored per partition (keys are Partitions; plain tuples look them up too).
StoredOffsets = dict[tuple[str, str, int], int]


def partition_of(o: OffsetRecord) -> Partition:
    return Partition(o.pipeline, o.kafka_topic, o.kafka_partition)


def merge_offsets(offsets: Sequence[OffsetRecord]) -> list[OffsetRecord]:
    """One record per partition (the highest next offset, the lowest first offset), sorted, so
    every writer locks rows in the same order."""
    merged: dict[Partition, OffsetRecord] = {}
    for o in offsets:
        key = Partition(o.pipeline, o.kafka_topic, int(o.kafka_partition))
        prev = merged.get(key)
        if prev is None:
            merged[key] = replace(o, kafka_partition=key.kafka_partition)
            continue
        firsts = [f for f in (prev.first_offset, o.first_offset) if f is not None]
        merged[key] = replace(
            prev,
            next_offset=max(prev.next_offset, o.next_offset),
            first_offset=min(firsts) if len(firsts) == 2 else None,
        )
    return [merged[k] for k in sorted(merged)]


def lock_offsets(db: Database, conn: Connection, offsets: list[OffsetRecord]) -> StoredOffsets:
    """Create (if missing) and lock the batch's offset rows; their stored next offsets.

    ``offsets`` come from ``merge_offsets`` (one per partition, sorted, so every writer locks
    rows in the same order). One upsert does all three: a missing row is inserted as a
    placeholder (next offset 0, which makes a concurrent writer of a partition seen for the
    first time wait on the unique key instead of racing past the lock; the batch's own offset
    replaces it before the transaction commits); an existing one is "updated" to itself, which
    locks it as SELECT ... FOR UPDATE would (PostgreSQL; SQLite's writers take the whole database
    in turn); RETURNING gives the stored offsets. Before, an INSERT ... DO NOTHING and a SELECT
    ... FOR UPDATE took two round trips per batch: ``bench/small_writes.py`` (offsets of 4
    partitions and a statistics row per batch, both trees alternating, three rounds) went from
    2.6-4.4 to 2.1-3.1 ms per batch on PostgreSQL and from 1.0-1.8 to 0.8-1.0 on SQLite.
    """
    if not offsets:
        return {}
    t = s.consumer_offsets
    now = datetime.now(UTC)
    keys = [partition_of(o) for o in offsets]
    upsert = (
        db.insert(t)
        .on_conflict_do_update(
            index_elements=["pipeline", "kafka_topic", "kafka_partition"],
            set_={"next_offset": t.c.next_offset},
        )
        .returning(t.c.pipeline, t.c.kafka_topic, t.c.kafka_partition, t.c.next_offset)
    )
    placeholders = [
        {
            "pipeline": k.pipeline,
            "kafka_topic": k.kafka_topic,
            "kafka_partition": k.kafka_partition,
            "next_offset": 0,
            "updated_at": now,
        }
        for k in keys
    ]
    return {
        Partition(r.pipeline, r.kafka_topic, r.kafka_partition): r.next_offset
        for r in conn.execute(upsert, placeholders)
    }


def upsert_offsets(db: Database, conn: Connection, offsets: list[OffsetRecord]) -> None:
    t = s.consumer_offsets
    ins = db.insert(t)
    stmt = ins.on_conflict_do_update(
        index_elements=["pipeline", "kafka_topic", "kafka_partition"],
        set_={
            # Never backwards: a zombie consumer's late batch cannot rewind the stream.
            "next_offset": db.greatest(t.c.next_offset, ins.excluded.next_offset),
            "updated_at": ins.excluded.updated_at,
        },
    )
    conn.execute(stmt, _rows(offsets))


def _rows(offsets: Iterable[OffsetRecord]) -> list[dict[str, Any]]:
    """``consumer_offsets`` rows of these offsets, updated now."""
    now = datetime.now(UTC)
    return [
        {
            "pipeline": o.pipeline,
            "kafka_topic": o.kafka_topic,
            "kafka_partition": o.kafka_partition,
            "next_offset": o.next_offset,
            "updated_at": now,
        }
        for o in offsets
    ]


def load_offsets(db: Database, pipeline: str, topic: str) -> dict[int, int]:
    """partition -> next offset to read, as committed with the last written batches."""
    t = s.consumer_offsets
    with db.transaction("loading consumer offsets", write=False) as conn:
        rows = conn.execute(
            select(t.c.kafka_partition, t.c.next_offset).where(
                t.c.pipeline == pipeline, t.c.kafka_topic == topic
            )
        )
        return {int(p): int(o) for p, o in rows}


def reset_offsets(
    db: Database, pipeline: str, topic: str, offsets: dict[int, int] | None = None
) -> int:
    """Rewind or forget stored offsets (see ``AlertStore.reset_offsets``)."""
    t = s.consumer_offsets
    with db.transaction("resetting consumer offsets") as conn:
        where = (t.c.pipeline == pipeline) & (t.c.kafka_topic == topic)
        if offsets is None:
            return conn.execute(delete(t).where(where)).rowcount
        if not offsets:
            return 0
        conn.execute(delete(t).where(where & t.c.kafka_partition.in_(list(offsets))))
        records = (OffsetRecord(pipeline, topic, p, o) for p, o in offsets.items())
        conn.execute(t.insert(), _rows(records))
        return len(offsets)
