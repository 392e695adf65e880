"""Writing and committing a prepared batch: the main thread's half of the service loop.

``SinkMixin`` is one part of ``streams.service.ScoringService``: the batch's dead letters and
scores go to the output topics, then one database transaction writes everything the batch
holds with its partitions' next offsets (retried while the database is down,
``OutagesMixin._until_done``), and only then are the offsets committed to Kafka (after Sentry
Arroyo: the commit comes only after the sink wrote). Metrics, totals and drift count the batch
after the commit: they count work done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from storage.records import SinkBatch, WriteResult
from streams.batch import Message
from streams.decode import DecodedBatch
from streams.metrics import observe_many
from streams.models import LoadedModel

log = logging.getLogger("streams.service")

# How long an idle loop waits before it retries a failed Kafka commit (a batch retries at once).
COMMIT_RETRY_S = 10.0


@dataclass
class Prepared:
    """A batch decoded, scored and turned into its writes (``_prepare``), not yet written."""

    messages: list[Message]
    ingest: datetime
    started: float  # perf_counter() when its preparation began
    decoded: DecodedBatch
    result: Any  # ScoredBatch, None when no record was valid
    loaded: LoadedModel
    batch: SinkBatch
    scores_out: list[tuple[bytes, bytes]]
    latencies: np.ndarray | None


@dataclass
class BatchOutcome:
    consumed: int
    scored: int
    alerts: int
    dead_letters: int
    write: WriteResult | None = None


class SinkMixin:
    """Write and commit of ``ScoringService`` (its attributes: ``metrics``, ``state``,
    ``store``, ``totals``, ``_consumer``, ``_reservoir``, ``_failpoint``; from the other
    mixins ``_produce``, ``_until_done``, ``_database_up``, ``_outputs_up``, ``_observe_drift``)."""

    metrics: Any
    state: Any
    store: Any
    totals: BatchOutcome
    _consumer: Any
    _reservoir: Any
    _failpoint: Any
    _produce: Any
    _until_done: Any
    _database_up: Any
    _outputs_up: Any
    _observe_drift: Any

    def _write_and_commit(
        self, prepared: Prepared, generation: int, held: list[Message]
    ) -> BatchOutcome | None:
        batch, messages = prepared.batch, prepared.messages
        t3 = time.perf_counter()
        write = self._write(batch, [*messages, *held], prepared.scores_out, generation)
        if write is None:
            return None
        self._reservoir.written(batch, write)
        self._failpoint.reached("written")
        t4 = time.perf_counter()
        # The batch's offsets are committed with any a failed commit left pending.
        for o in batch.offsets:
            self.state.uncommitted[(o.kafka_topic, o.kafka_partition)] = o.next_offset
        self._commit_pending()
        self._failpoint.reached("committed")
        t5 = time.perf_counter()
        self.metrics.stage["write"].observe(t4 - t3)
        self.metrics.stage["commit"].observe(t5 - t4)
        decoded = prepared.decoded
        outcome = BatchOutcome(
            consumed=len(messages),
            scored=decoded.n_valid,
            alerts=len(batch.alerts),
            dead_letters=len(batch.dead_letters),
            write=write,
        )
        self._count(outcome, batch, prepared.latencies, prepared.ingest)
        if prepared.result is not None:
            self._observe_drift(prepared.result, prepared.loaded, prepared.ingest)
        log.debug(
            "batch",
            extra={
                "fields": {
                    "records": outcome.consumed,
                    "alerts": outcome.alerts,
                    "dead_letters": outcome.dead_letters,
                    "ms": round((t5 - prepared.started) * 1000, 2),
                }
            },
        )
        return outcome

    def _count(
        self,
        outcome: BatchOutcome,
        batch: SinkBatch,
        latencies: np.ndarray | None,
        ingest: datetime,
    ) -> None:
        """Metrics and totals of a committed batch (after the commit: they count work done)."""
        m = self.metrics
        m.consumed.inc(outcome.consumed)
        m.batch_size.observe(outcome.consumed)
        m.scored.inc(outcome.scored)
        for dl in batch.dead_letters:
            m.dead_lettered(dl.error_kind)
        for alert in batch.alerts:
            m.alerted(alert.severity)
        if latencies is not None and len(latencies):
            now_latency = latencies + (time.time() - ingest.timestamp())
            observe_many(m.end_to_end, now_latency)
        t = self.totals
        t.consumed += outcome.consumed
        t.scored += outcome.scored
        t.alerts += outcome.alerts
        t.dead_letters += outcome.dead_letters

    def _write(
        self,
        batch: SinkBatch,
        messages: list[Message],
        scores_out: list[tuple[bytes, bytes]],
        generation: int,
    ) -> WriteResult | None:
        """Produce to the output topics, then write the database; retry while it is down."""

        def attempt() -> WriteResult:
            self._produce(batch.dead_letters, scores_out)
            # Set by every batch that gets this far, with outputs or without: a failed batch
            # dropped on a rebalance must not leave the flag down behind clean batches.
            self._outputs_up(True)
            result = self.store.write_batch(batch)
            self._database_up(True)
            return result

        return self._until_done(attempt, generation, messages)

    def _commit_pending(self) -> None:
        """Commit to Kafka the pending offsets of assigned partitions (synchronously). Only
        offsets the database already holds are ever pending: a written batch's, those a
        partition was positioned at, those of a commit that failed. On failure they stay
        pending, retried after the next batch or on an idle loop pass (``COMMIT_RETRY_S``)."""
        from confluent_kafka import KafkaException, TopicPartition

        state = self.state
        pending = state.uncommitted
        tps = [
            TopicPartition(t, p, off) for (t, p), off in pending.items() if (t, p) in state.assigned
        ]
        if not tps:
            return
        try:
            self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            # The database already holds these offsets and the next assignment seeks to them;
            # a lost Kafka commit costs nothing but lag accounting (anomaly_consumer_lag is
            # measured from Kafka's committed offset, so it stays up until a commit succeeds).
            log.warning("Kafka commit failed (offsets are safe in the database): %s", exc)
            # A commit with the broker down blocks for seconds: the idle loop waits this long.
            state.commit_retry_at = time.monotonic() + COMMIT_RETRY_S
            return
        for tp in tps:
            pending.pop((tp.topic, tp.partition), None)
