"""Partition bookkeeping of the scoring service: rebalance callbacks, positioning at the stored
offsets and the offset checks (docs/reliability.md, "Offset gaps").

``PartitionsMixin`` is one part of ``streams.service.ScoringService`` (which see for the rule on
which batches are dropped when). The rebalance callbacks run inside ``consume()``; they only
update ``ServiceState`` and pause partitions, never wait for the database or the broker. The
loop then positions every newly assigned partition (``_position_partitions``: read its stored
offset from the database, check it against the log, seek, resume) and checks that each batch
continues at the partition's next offset (``_check_continuity``). A partition whose records
would be skipped is stopped (``_stop_partition``), never read past.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from storage.errors import RetryableStorageError
from streams.batch import Message, partition_bounds

log = logging.getLogger("streams.service")

# How long a throwaway consumer may read to verify an offset (the log's end, a gap).
PROBE_TIMEOUT_S = 10.0


@dataclass
class ServiceState:
    assigned: set[tuple[str, int]] = field(default_factory=set)
    # Offsets the database holds that are not yet committed to Kafka (a failed commit, or a
    # partition just positioned at its stored offset): committed by ``_commit_pending``.
    uncommitted: dict[tuple[str, int], int] = field(default_factory=dict)
    # Not before this (monotonic time) does an idle loop retry a failed Kafka commit.
    commit_retry_at: float = 0.0
    # Bumped by every rebalance callback: a batch held across one is dropped (see
    # streams.service, "When a batch is dropped").
    generation: int = 0
    # When a record last arrived or partitions were last assigned (the idle clock).
    last_activity: float = 0.0
    # Assigned but not yet positioned at the database's offset: paused, their records ignored.
    unpositioned: set[tuple[str, int]] = field(default_factory=set)
    # Partitions stopped for an offset gap (paused until the next assignment): why.
    stopped: dict[tuple[str, int], str] = field(default_factory=dict)
    # The next offset each positioned partition must continue from (known once stored).
    position: dict[tuple[str, int], int] = field(default_factory=dict)
    # When to try positioning again after the database was unreachable (monotonic time).
    position_retry_at: float = 0.0
    position_delay: float = 0.0


class PartitionsMixin:
    """Partition state and offset checks of ``ScoringService`` (its attributes: ``cfg``,
    ``pipeline``, ``topic``, ``state``, ``metrics``, ``health``, ``store``, ``_consumer``,
    ``_database_up``, ``_database_down`` and, from the sink, ``_commit_pending``)."""

    cfg: Any
    pipeline: str
    topic: str
    state: ServiceState
    metrics: Any
    health: Any
    store: Any
    _consumer: Any
    _database_up: Any
    _database_down: Any
    _commit_pending: Any

    # -- rebalance callbacks (run inside consume()) -------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        # Assigned paused: the loop seeks each partition to its stored offset once it has read
        # it from the database and checked it against the log (``_position_partitions``). The
        # database and the broker are not waited for here, inside the rebalance callback.
        consumer.assign(partitions)
        if partitions:
            consumer.pause(partitions)
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self.state.generation += 1  # a held batch is dropped (streams.service)
        self.state.assigned = keys
        # Anything still pending was written after its partition was revoked (a zombie's batch):
        # positioning commits the database's offset of each partition instead.
        self.state.uncommitted.clear()
        self.state.unpositioned = set(keys)
        self.state.stopped.clear()
        self.state.position.clear()
        self.state.position_retry_at = 0.0
        self.state.position_delay = self.cfg.serve.db_retry_initial_s
        self._stopped_changed()
        self.state.last_activity = time.monotonic()
        self.health.set("assigned", bool(partitions))
        log.info(
            "partitions assigned",
            extra={"fields": {"partitions": [[tp.partition, tp.offset] for tp in partitions]}},
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # A batch consumed but not yet written (the loop's batch in flight) is dropped by the
        # loop when it sees the generation change; commit what a failed commit left behind.
        from confluent_kafka import KafkaException, TopicPartition

        revoked = {(tp.topic, tp.partition) for tp in partitions}
        tps = [
            TopicPartition(t, p, off)
            for (t, p), off in self.state.uncommitted.items()
            if (t, p) in revoked
        ]
        if tps:
            try:
                consumer.commit(offsets=tps, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed (offsets are in the database): %s", exc)
        self._drop(revoked)
        log.info("partitions revoked", extra={"fields": {"partitions": sorted(revoked)}})

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        # Another member may own them already: commit nothing.
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._drop(lost)
        log.warning("partitions lost", extra={"fields": {"partitions": sorted(lost)}})

    def _drop(self, keys: set[tuple[str, int]]) -> None:
        state = self.state
        state.assigned -= keys
        state.unpositioned -= keys
        for key in keys:
            state.uncommitted.pop(key, None)
            state.stopped.pop(key, None)
            state.position.pop(key, None)
            self.metrics.forget_lag(*key)
        self._stopped_changed()
        state.generation += 1  # a held batch is dropped (streams.service)
        self.health.set("assigned", bool(state.assigned))

    # -- which records are read, positioning and offset checks ---------------------------------

    def _messages(self, raw: list[Any]) -> list[Message]:
        out: list[Message] = []
        assigned = self._active()
        for m in raw:
            err = m.error()
            if err is not None:
                log.warning("consumer error: %s", err)
                continue
            key = (m.topic(), m.partition())
            # A rebalance served inside consume() can revoke a partition whose records were
            # already fetched: they belong to the new owner now. Records of a partition not yet
            # positioned at its stored offset, or stopped for a gap, are not read either.
            if key not in assigned:
                continue
            ts_type, ts = m.timestamp()
            out.append(Message(key[0], key[1], m.offset(), m.value(), ts if ts_type else None))
        return out

    def _active(self) -> set[tuple[str, int]]:
        """Assigned partitions that are positioned and not stopped: the ones being read."""
        s = self.state
        if not s.unpositioned and not s.stopped:
            return s.assigned
        return s.assigned - s.unpositioned - set(s.stopped)

    def _unposition(self, keys: set[tuple[str, int]]) -> None:
        keys = keys & self.state.assigned
        if not keys:
            return
        self._pause(keys)
        self.state.unpositioned |= keys

    def _pause(self, keys: set[tuple[str, int]]) -> None:
        """Pause partitions that are unpositioned or stopped (a failure is only logged: their
        records are ignored while they are, paused or not)."""
        try:
            self._consumer.pause(self._partitions(keys))
        except Exception as exc:
            log.warning("pause failed: %s", exc)

    def _position_partitions(self) -> None:
        """Seek the partitions assigned since the last call to their stored offsets, after
        checking each against the log; then resume them. Called from the loop, so a database
        outage only delays it (with backoff; the group keeps being served by ``consume``)."""
        state = self.state
        if time.monotonic() < state.position_retry_at:
            return
        try:
            stored = self.store.load_offsets(self.pipeline, self.topic)
        except RetryableStorageError as exc:
            delay = state.position_delay or self.cfg.serve.db_retry_initial_s
            self._database_down("loading offsets", exc, delay)
            state.position_retry_at = time.monotonic() + delay
            state.position_delay = min(delay * 2, self.cfg.serve.db_retry_max_s)
            return
        self._database_up(True)
        from confluent_kafka import KafkaException, TopicPartition

        positioned: list[tuple[int, int | None]] = []
        for key in sorted(state.unpositioned):
            topic, partition = key
            offset = stored.get(partition) if topic == self.topic else None
            try:
                if offset is not None:
                    problem = self._check_stored_offset(topic, partition, offset)
                    if problem is not None:
                        self._stop_partition(key, *problem)
                        state.unpositioned.discard(key)
                        continue
                    self._consumer.seek(TopicPartition(topic, partition, offset))
                    state.position[key] = offset
                    # Kafka's committed offset may lag the database's (a crash between the
                    # write and the commit, a failed commit) and the lag metric is measured
                    # from it: commit the stored offset, which the database already holds.
                    state.uncommitted[key] = offset
                self._consumer.resume([TopicPartition(topic, partition)])
            except KafkaException as exc:
                # The broker did not answer (or the seek failed): try again shortly.
                log.warning(
                    "cannot position partition yet, retrying",
                    extra={
                        "fields": {
                            "topic": topic,
                            "partition": partition,
                            "offset": offset,
                            "error": str(exc),
                        }
                    },
                )
                state.position_retry_at = time.monotonic() + self.cfg.serve.db_retry_initial_s
                continue
            state.unpositioned.discard(key)
            positioned.append((partition, offset))
        if state.uncommitted:
            self._commit_pending()  # one commit for all; a failure stays pending, retried
        if positioned:
            log.info(
                "partitions positioned",
                extra={"fields": {"partitions": [list(p) for p in positioned]}},
            )

    def _check_stored_offset(
        self, topic: str, partition: int, offset: int
    ) -> tuple[str, str, dict[str, Any]] | None:
        """Is the stored next offset inside the log? ``None``, or (kind, message, fields);
        ``KafkaException`` if the broker did not tell."""
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=PROBE_TIMEOUT_S, cached=False
        )
        if offset < low:
            return (
                "below_start",
                f"the stored next offset {offset} is below the start of the log ({low}): "
                f"records {offset}..{low - 1} were deleted before they were read",
                {"stored_offset": offset, "log_start": low},
            )
        if offset <= high:
            return None
        # Some brokers (Tansu) answer the last record batch's base offset + 1 as the high
        # watermark: read to the end to know it.
        end = self._probe(topic, partition, max(low, high - 1), to_end=True)
        if end is None:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the log's end is unknown"))
        if offset <= end:
            return None
        return (
            "beyond_end",
            f"the stored next offset {offset} is beyond the end of the log ({end}): the topic "
            "was recreated or truncated",
            {"stored_offset": offset, "log_end": end},
        )

    def _check_continuity(self, messages: list[Message]) -> list[Message]:
        """The batch without the records of partitions where it does not continue at the next
        offset: records between would be skipped (a gap), or the log restarted below it. The
        next offset of each partition the batch keeps moves past it: the loop consumes the
        next batch before this one is written (``_rewind`` moves it back if it is dropped)."""
        state = self.state
        first, last = partition_bounds(messages)
        bad: set[tuple[str, int]] = set()
        for key, offset in first.items():
            expected = state.position.get(key)
            if expected is None or offset == expected:
                continue
            problem = self._check_jump(key, expected, offset)
            if problem is not None:
                self._stop_partition(key, *problem)
                bad.add(key)
        for key, offset in last.items():
            if key not in bad:
                state.position[key] = offset + 1
        if not bad:
            return messages
        return [m for m in messages if (m.topic, m.partition) not in bad]

    def _check_jump(
        self, key: tuple[str, int], expected: int, offset: int
    ) -> tuple[str, str, dict[str, Any]] | None:
        """A batch of ``key`` starts at ``offset``, not at ``expected``: is anything lost?"""
        from confluent_kafka import KafkaException

        topic, partition = key
        fields: dict[str, Any] = {"next_offset": expected, "batch_first_offset": offset}
        try:
            if offset < expected:
                # Behind the written position: a replay the offset fencing drops, unless the
                # log itself restarted below it (the consumer was reset to a new log's start).
                problem = self._check_stored_offset(topic, partition, expected)
                if problem is None:
                    return None
                return problem[0], problem[1], fields | problem[2]
            # Ahead: offsets without a readable record in between (transaction markers,
            # compaction) are fine; a record there, or a log that starts later, is a gap.
            first = self._probe(topic, partition, expected, to_end=False)
        except KafkaException as exc:
            return (
                "unverified",
                f"the batch starts at offset {offset} but the partition's next offset is "
                f"{expected}, and the broker could not be asked what lies between ({exc})",
                fields,
            )
        if first is not None and first >= offset:
            return None
        readable = "none: the log starts later" if first is None else f"offset {first}"
        return (
            "skipped",
            f"the batch starts at offset {offset} but the partition's next offset is "
            f"{expected}: records {expected}..{offset - 1} would be skipped (first readable "
            f"from {expected}: {readable})",
            fields | {"first_readable": first},
        )

    def _probe(self, topic: str, partition: int, start: int, *, to_end: bool) -> int | None:
        """Read ``topic[partition]`` from ``start`` with a throwaway consumer (no group join):
        the offset of the first readable record (or the end, if none), or with ``to_end`` the
        log's end (the offset after its last record). ``None`` if the broker does not tell in
        time or ``start`` is outside the log."""
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        from streams.kafka import consumer_settings

        conf = consumer_settings(self.cfg, stats_interval_ms=0) | {
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
        }
        probe = Consumer(conf)
        try:
            probe.assign([TopicPartition(topic, partition, start)])
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            last: int | None = None
            while time.monotonic() < deadline:
                for m in probe.consume(500, 0.2):
                    err = m.error()
                    if err is None:
                        if not to_end:
                            return m.offset()
                        last = m.offset()
                    elif err.code() == KafkaError._PARTITION_EOF:
                        return m.offset() if m.offset() >= 0 else (last or start - 1) + 1
                    elif err.code() in (
                        KafkaError._AUTO_OFFSET_RESET,
                        KafkaError.OFFSET_OUT_OF_RANGE,
                    ):
                        return None
            return None
        finally:
            probe.close()

    def _stop_partition(
        self, key: tuple[str, int], kind: str, message: str, fields: dict[str, Any]
    ) -> None:
        topic, partition = key
        self._pause({key})
        self.state.stopped[key] = message
        self.state.position.pop(key, None)
        self.metrics.offset_gap(topic, partition, kind)
        self._stopped_changed()
        log.error(
            f"partition {topic}[{partition}] stopped: {message}. Nothing of it is read until "
            "an operator decides (docs/reliability.md, 'Offset gaps')",
            extra={"fields": {"topic": topic, "partition": partition, "kind": kind, **fields}},
        )

    def _stopped_changed(self) -> None:
        self.metrics.set_partitions_stopped(len(self.state.stopped))
        self.health.set("no_partition_stopped", not self.state.stopped)

    @staticmethod
    def _partitions(keys: set[tuple[str, int]]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(t, p) for t, p in sorted(keys)]
