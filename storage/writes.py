"""The alert sink's write path: one micro-batch in one transaction (see ``storage.store``).

This is the hot path of the service loop. Per batch: offset fencing, the alert rows not stored
yet (one index range scan per partition), incident grouping, the alert insert (PostgreSQL:
binary COPY; SQLite: multi-row insert), dead letters, statistics and offsets. A COPY that loses
a unique-key race to a concurrent writer rolls back and the batch is written again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import Connection, select

from storage import schema as s
from storage.alert_rows import (
    ALERT_COLUMNS,
    ALERT_COPY,
    COPY_TYPES,
    OFFSET,
    PARTITION,
    PIPELINE,
    TOPIC,
    alert_row,
    in_order,
    json_values,
    position,
)
from storage.engine import Database, utc
from storage.errors import RetryableStorageError
from storage.incidents import assign_incidents
from storage.offsets import StoredOffsets, lock_offsets, merge_offsets, upsert_offsets
from storage.records import DeadLetterRecord, SinkBatch, WriteResult
from storage.reservoir import write_reservoir
from storage.sanitize import clean_text, json_bytes, json_text
from storage.stats import StatsWriter, fence_stats

AlertInsert = Literal["auto", "copy", "executemany"]
_ATTEMPTS = 5  # transactions per batch before concurrent writers' races are reported


class _LostRace(Exception):
    """A concurrent transaction inserted alert positions this batch was about to insert."""


class AlertWriter:
    """Writes ``SinkBatch``es; ``alert_insert`` is ``"copy"`` or ``"executemany"``."""

    def __init__(self, db: Database, incident_window: timedelta, alert_insert: str) -> None:
        self.db = db
        self.incident_window = incident_window
        self.alert_insert = alert_insert
        self.stats = StatsWriter(db)

    def write_batch(self, batch: SinkBatch) -> WriteResult:
        alert_rows = [alert_row(a) for a in batch.alerts]
        dead_rows = [_dead_letter_row(d) for d in batch.dead_letters]
        what = (
            f"writing a batch of pipeline {batch.pipeline!r} "
            f"({len(alert_rows)} alerts, {len(dead_rows)} dead letters)"
        )
        for _attempt in range(_ATTEMPTS):
            try:
                with self.db.transaction(what) as conn:
                    return self._write(conn, batch, alert_rows, dead_rows)
            except _LostRace:
                # Another transaction inserted some of these alert positions between our check
                # and our insert (only possible for partitions without offsets in the batch);
                # it has committed by now, so the next attempt sees its rows.
                continue
        raise RetryableStorageError(f"{what}: concurrent writers kept inserting the same alerts")

    def _write(
        self,
        conn: Connection,
        batch: SinkBatch,
        alert_rows: list[list[Any]],
        dead_rows: list[dict[str, Any]],
    ) -> WriteResult:
        offsets = merge_offsets(batch.offsets)
        stored = lock_offsets(self.db, conn, offsets)
        n_alerts, n_dead = len(alert_rows), len(dead_rows)
        if stored:
            alert_rows = [r for r in alert_rows if not _alert_fenced(r, stored)]
            dead_rows = [r for r in dead_rows if not _dead_letter_fenced(r, stored)]
        records_fenced = (n_alerts - len(alert_rows)) + (n_dead - len(dead_rows))

        # Alerts already stored (a replay) or twice in this batch are skipped before the incident
        # grouping, so incidents count every alert once; the insert below still says
        # ON CONFLICT DO NOTHING and a count mismatch means a concurrent writer won a race.
        new_rows = self._new_alert_rows(conn, alert_rows) if alert_rows else []
        incidents_opened = (
            assign_incidents(self.db, conn, new_rows, self.incident_window) if new_rows else 0
        )
        if new_rows and self._insert_alerts(conn, new_rows) != len(new_rows):
            raise _LostRace
        dead_written = self._insert_dead_letters(conn, dead_rows) if dead_rows else 0
        # Retraining samples (storage.reservoir): most batches have none.
        threshold = write_reservoir(self.db, conn, batch, stored) if batch.reservoir else None

        stats = fence_stats(batch.stats, offsets, stored)
        if stats:
            self.stats.upsert(conn, stats)
        if offsets:
            upsert_offsets(self.db, conn, offsets)
        return WriteResult(
            alerts_written=len(new_rows),
            dead_letters_written=dead_written,
            incidents_opened=incidents_opened,
            records_fenced=records_fenced,
            reservoir_threshold=threshold,
        )

    def _new_alert_rows(self, conn: Connection, rows: list[list[Any]]) -> list[list[Any]]:
        """The rows whose position is neither stored yet nor earlier in the same batch, sorted by
        position: concurrent writers of the same positions then insert them in one order (a wait
        and a retry, never a deadlock)."""
        rows, ranges = _by_position(rows)
        t = s.alerts
        stored: set[tuple[str, str, int, int]] = set()
        for (p, topic, part), (lo, hi) in ranges.items():  # one range scan of the unique index
            found = conn.execute(
                select(t.c.kafka_offset).where(
                    t.c.pipeline == p,
                    t.c.kafka_topic == topic,
                    t.c.kafka_partition == part,
                    t.c.kafka_offset.between(lo, hi),
                )
            ).scalars()
            stored.update((p, topic, part, o) for o in found)
        if not stored:
            return rows
        return [row for row in rows if position(row) not in stored]

    def _insert_alerts(self, conn: Connection, rows: list[list[Any]]) -> int:
        """Insert the rows; the number of rows actually inserted (executemany: with ON CONFLICT
        DO NOTHING; COPY: all of them or an error, see ``_copy_alerts``)."""
        if self.alert_insert == "copy":
            return _copy_alerts(conn, rows)
        params = [
            dict(zip(ALERT_COLUMNS, json_values(row, json_text), strict=True)) for row in rows
        ]
        return len(conn.execute(self._insert_new(s.alerts), params).all())

    def _insert_dead_letters(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        return len(conn.execute(self._insert_new(s.dead_letters), rows).all())

    def _insert_new(self, table: Any) -> Any:
        """INSERT of rows keyed by their Kafka position, skipping positions already stored
        (a replayed batch); RETURNING the new rows' ids, so their count is what was written."""
        return (
            self.db.insert(table)
            .on_conflict_do_nothing(
                index_elements=["pipeline", "kafka_topic", "kafka_partition", "kafka_offset"]
            )
            .returning(table.c.id)
        )


def _copy_alerts(conn: Connection, rows: list[list[Any]]) -> int:
    """PostgreSQL: binary COPY straight into ``alerts``.

    COPY has no ON CONFLICT, and needs none here: ``_new_alert_rows`` dropped the positions
    already stored, under the batch's offset locks. A concurrent writer of a partition without
    offsets in the batch can still insert one of these positions first; the unique key then
    fails the COPY, the transaction rolls back and ``write_batch`` retries (as for a lost
    ``ON CONFLICT`` race). Rows come sorted by position, so two such writers wait on each other
    in one order instead of deadlocking. This saves the staging table and the
    ``INSERT ... SELECT ... ON CONFLICT``, about a quarter of the server's work per row.

    The JSON columns are encoded here, row by row, while psycopg streams the rows already
    written: the server parses and inserts them meanwhile, on the other core."""
    import psycopg
    from psycopg.types.string import BytesBinaryDumper

    raw = conn.connection.driver_connection
    try:
        with raw.cursor() as cur:
            # For the bytea type psycopg picks the dumper of its DB-API ``Binary`` wrapper,
            # written in Python; the C one for plain bytes saves 0.6-1.0 us of client CPU per
            # alert (~15 instead of ~20 ms per 5000-row COPY: bench/storage_rows.py).
            cur.adapters.register_dumper(bytes, BytesBinaryDumper)  # this cursor only
            with cur.copy(ALERT_COPY) as copy:
                copy.set_types(COPY_TYPES)
                # Times are aware UTC already and texts are clean (see alert_row).
                for row in rows:
                    copy.write_row(json_values(row, json_bytes))
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name == "uq_alerts_position":
            raise _LostRace from exc
        raise
    return len(rows)


def _by_position(
    rows: list[list[Any]],
) -> tuple[list[list[Any]], dict[tuple[str, str, int], list[int]]]:
    """The rows sorted by position, each position once, and each partition's [lowest, highest]
    offset among them."""
    if in_order(rows):
        # The usual batch (one partition, offsets rising, no duplicates) is that already: the
        # check saves ~0.27 us per alert (0.08 instead of 0.35 us; bench/storage_rows.py, "new
        # rows"), ~4% of the client CPU per alert of bench/storage.py's ``new`` scenario.
        first, last = rows[0], rows[-1]
        return rows, {
            (first[PIPELINE], first[TOPIC], first[PARTITION]): [first[OFFSET], last[OFFSET]]
        }
    unique: dict[tuple[str, str, int, int], list[Any]] = {}
    for row in rows:
        unique.setdefault(position(row), row)
    rows = [unique[key] for key in sorted(unique)]
    ranges: dict[tuple[str, str, int], list[int]] = {}
    for row in rows:  # sorted: the first row of a partition has its lowest offset
        partition, offset = (row[PIPELINE], row[TOPIC], row[PARTITION]), row[OFFSET]
        if partition in ranges:
            ranges[partition][1] = offset
        else:
            ranges[partition] = [offset, offset]
    return rows, ranges


def _alert_fenced(row: list[Any], stored: StoredOffsets) -> bool:
    """Is the alert below its partition's stored next offset (written by another consumer)?"""
    next_offset = stored.get((row[PIPELINE], row[TOPIC], row[PARTITION]))
    return next_offset is not None and row[OFFSET] < next_offset


def _dead_letter_fenced(row: dict[str, Any], stored: StoredOffsets) -> bool:
    key = (row["pipeline"], row["kafka_topic"], row["kafka_partition"])
    return key in stored and row["kafka_offset"] < stored[key]


def _dead_letter_row(d: DeadLetterRecord) -> dict[str, Any]:
    raw = d.raw if isinstance(d.raw, bytes) else _raw_bytes(d.raw)
    return {
        "pipeline": clean_text(d.pipeline, s.PIPELINE_LEN),
        "kafka_topic": clean_text(d.kafka_topic, s.TOPIC_LEN),
        "kafka_partition": int(d.kafka_partition),
        "kafka_offset": int(d.kafka_offset),
        "raw": raw,
        "error_kind": clean_text(d.error_kind, s.ERROR_KIND_LEN),
        "error_message": clean_text(d.error_message, s.ERROR_MESSAGE_LEN),
        "created_at": utc(d.created_at),
    }


def _raw_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)
