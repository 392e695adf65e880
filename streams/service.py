"""The scoring service: Kafka micro-batches in, alerts (and everything else) in SQL, then commit.

One loop, in clean steps (after Sentry Arroyo: the Kafka commit comes only after the sink wrote):

1. ``consume``: whatever the consumer has ready, up to ``kafka.batch_size`` records; only when
   nothing at all is ready does it wait, for the first record (``_next_batch``).
2. ``decode``: columnar decode and schema validation (``streams.decode``), then the model's own
   checks (``preprocessor_.validate_frame``); bad records become dead letters with their reason.
3. ``score``: ``BatchScorer.score`` on the valid records, one call per batch.
4. ``sink``: dead letters to the dead-letter topic and scores to the optional scores topic,
   flushed; then one database transaction with alerts, incidents, dead letters, per-minute
   statistics and the next offset of every partition (``AlertStore.write_batch``).
5. ``commit``: only now the offsets go to Kafka (synchronously); a failed commit is retried
   after the next batch or, while the stream is quiet, on an idle pass of the loop.

The pipeline: steps 2-3 of a batch run on a worker thread (``_prepare``, which touches no
consumer or partition state) while this thread writes and commits the batch before it (steps
4-5), so two batches are in the service at once, never more: consume batch N+1, hand it to the
worker, write and commit batch N, repeat. While a batch waits to be written, the next consume
takes only what is ready and never waits, so at light load a record is written as soon as it
is scored. Decoding, scoring and the database driver spend most of their time in C code that
releases the GIL (numpy, torch, msgspec, the SQLite and libpq calls), which is what lets the
two threads overlap.

The database holds the truth about progress: on assignment the consumer seeks to the offsets
stored there, so a lost Kafka commit (crash between steps 4 and 5) neither loses nor re-scores a
record, and the store's offset fencing keeps a zombie consumer from counting anything twice. The
output topics are at-least-once: a batch retried after a failure may produce its dead letters and
scores again (consumers of the scores topic key on the record id).

When the database is unreachable the consumer pauses its partitions and retries the same batch
with exponential backoff; nothing is committed meanwhile and ``/readyz`` reports not ready.

Offsets are checked, never trusted blindly (docs/reliability.md, "Offset gaps"): an assigned
partition stays paused until the loop (not the rebalance callback) has read its stored offset from
the database and found it inside the log; a stored offset beyond the log's end (the topic was
recreated or truncated) or below its start (records deleted), and a batch that starts past the
partition's next offset with records in between, stop that partition: paused, an error log line,
``anomaly_offset_gaps_total`` and ``/readyz`` not ready. Nothing is skipped silently.

Where things live: this module is the batch loop (consume, then decode and score on the worker
thread); ``streams.sink`` writing and committing a prepared batch; ``streams.outages`` the
retries while something a batch needs is down; ``streams.partitions`` the rebalance callbacks,
positioning and offset checks;
``streams.outputs`` the dead-letter and scores topics; ``streams.models`` loading, checking,
warming up and switching the model; ``streams.batch`` what a batch writes (``build_sink_batch``).
``ScoringService`` is the one object; the mixins are its parts, split by concern.

When a batch is dropped
-----------------------
One rule behind the generation counter, pause/resume, the seek-based rewind and the three
rebalance callbacks. A batch is written to the database in one transaction together with the next
offset of each of its partitions, or not at all. A dropped batch is not committed; it is read
again, from the offsets stored in the database, by whoever owns its partitions next. Records are
dropped exactly when:

1. their partition is not being read: revoked or lost after they were fetched, assigned but not
   yet positioned at its stored offset, or stopped for an offset gap (``_messages``); or the
   batch does not continue at the partition's next offset, which stops the partition
   (``_check_continuity``).
2. a rebalance callback ran inside the ``consume()`` that read the batch after it (the batch
   in flight is dropped, with the records read after it: ``_abandon``).
3. the batch is held, waiting for the database, the output topics or the schema registry
   (``_until_done``: the partitions are paused, so ``consume`` only serves the group), and
   meanwhile a rebalance callback ran (``_on_assign``, ``_on_revoke`` and ``_on_lost`` all bump
   ``state.generation``), records arrived anyway, or the service was asked to stop
   (``_wait_paused``); the batch consumed after it is dropped with it. The held batches and the
   arrived records are sought back to their first offsets on partitions still being read
   (``_rewind``); a partition that was reassigned is positioned from the database again
   (``_on_assign``, then ``_position_partitions``).

Why the database sees every record exactly once: a record counts only through ``write_batch``,
which stores its partition's next offset in the same transaction and fences anything below the
stored offset (a replayed or zombie batch, or one whose lost COMMIT did get through, adds
nothing); every assignment starts reading at the stored offset, and a batch that would skip
records stops its partition instead. The output topics
are at-least-once: a retried or dropped batch may produce its dead letters and scores again.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from anomaly.config import PipelineConfig
from anomaly.monitoring.drift import DriftMonitor
from storage.records import SinkBatch
from streams.alertmanager import Notifier
from streams.avro import SchemaRegistryUnavailable, make_decoder
from streams.batch import Message, build_sink_batch
from streams.decode import DecodedBatch
from streams.drift_windows import DriftMixin
from streams.failpoints import Failpoint
from streams.metrics import Health, MetricsServer, ServiceMetrics
from streams.models import LoadedModel, ModelsMixin
from streams.outages import OutagesMixin
from streams.outputs import OutputsMixin
from streams.partitions import PartitionsMixin, ServiceState
from streams.reservoir import ReservoirSampler
from streams.sink import BatchOutcome, Prepared, SinkMixin

log = logging.getLogger("streams.service")

# --stop-when-idle counts from the first assignment; a consumer that never gets one (more
# consumers than partitions) waits this much longer before it gives up.
JOIN_GRACE_S = 15.0
# How long one wait for a first record may block while the stream is idle: the loop looks at its
# stop flag, the idle clock and the active model version at least this often.
IDLE_POLL_S = 0.5


@dataclass
class InFlight:
    """A consumed batch the worker thread is preparing; ``generation`` as when it was read."""

    messages: list[Message]
    generation: int
    future: Future[Prepared]


class ScoringService(
    PartitionsMixin, OutputsMixin, ModelsMixin, DriftMixin, OutagesMixin, SinkMixin
):
    """``run()`` until stopped (signal, ``stop()``, or ``stop_when_idle_s`` without records)."""

    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        stop_when_idle_s: float | None = None,
        metrics: ServiceMetrics | None = None,
        store: Any | None = None,
    ) -> None:
        self.cfg = cfg
        self.pipeline = cfg.name
        self.topic = cfg.kafka.topic
        self.stop_when_idle_s = stop_when_idle_s
        self.metrics = metrics or ServiceMetrics(cfg.name)
        self.health = Health()
        self._store = store
        self.decoder = make_decoder(cfg)
        self._registry_in_use = getattr(self.decoder, "registry", None) is not None
        self.state = ServiceState()
        self._stop = threading.Event()
        self._consumer: Any = None
        self._producer: Any = None
        self.loaded: LoadedModel | None = None
        self._last_model_poll = 0.0
        self.metrics_server: MetricsServer | None = None
        self._notifier: Notifier | None = None
        self.totals = BatchOutcome(0, 0, 0, 0)
        self.health.set("no_partition_stopped", True)
        self._drift: DriftMonitor | None = None
        self._reservoir = ReservoirSampler(cfg)
        self._failpoint = Failpoint.from_env()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def store(self) -> Any:
        if self._store is None:
            from storage.store import AlertStore

            self._store = AlertStore.from_config(self.cfg)
        return self._store

    def stop(self, *_: object) -> None:
        """Ask the loop to finish the batch in flight and exit (signal-handler safe)."""
        self._stop.set()

    def run(self) -> int:
        from confluent_kafka import Consumer

        from streams.kafka import consumer_settings, redacted

        serve = self.cfg.serve
        if serve.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics, self.health, serve.metrics_host, serve.metrics_port
            ).start()
            log.info("metrics endpoint", extra={"fields": {"url": self.metrics_server.url}})
        try:
            self._with_db_retry(self.store.upgrade, "migrating the database")
            if self._stop.is_set():
                return 0
            # Closes stale incidents and sends them to Alertmanager, from SQL, apart from the loop.
            self._notifier = Notifier(self.cfg, self.store, self.metrics).start()
            self._load_model(initial=True)
            conf = consumer_settings(self.cfg)
            conf["stats_cb"] = self.metrics.on_statistics
            log.info(
                "starting consumer",
                extra={"fields": {"topic": self.topic, "config": redacted(conf)}},
            )
            self._consumer = Consumer(conf)
            self._producer = self._new_producer()
            self._consumer.subscribe(
                [self.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._loop()
        finally:
            self._shutdown()
        log.info(
            "stopped",
            extra={
                "fields": {
                    "consumed": self.totals.consumed,
                    "scored": self.totals.scored,
                    "alerts": self.totals.alerts,
                    "dead_letters": self.totals.dead_letters,
                }
            },
        )
        return 0

    def _shutdown(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        if self._consumer is not None:
            try:
                # Leaving the group runs on_revoke (which commits what is written) first.
                self._consumer.close()
            except Exception as exc:  # closing must not hide the real error
                log.warning("closing the consumer failed: %s", exc)
            self._consumer = None
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        """Consume, then hand the batch to the worker thread to decode and score while this
        thread writes and commits the batch before it (module docstring, "The pipeline")."""
        kafka = self.cfg.kafka
        self.state.last_activity = time.monotonic()
        ever_assigned = False
        in_flight: InFlight | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="prepare") as worker:
            while not self._stop.is_set():
                # A new model scores what is consumed from here (a batch in flight keeps its
                # own); unpositioned partitions have no records in flight (``_messages``).
                self._maybe_switch_model()
                if self.state.unpositioned:
                    self._position_partitions()
                raw = self._next_batch(kafka.batch_size, kafka.max_wait_s, wait=in_flight is None)
                messages = self._messages(raw)
                ever_assigned = ever_assigned or bool(self.state.assigned)
                if in_flight is not None and self.state.generation != in_flight.generation:
                    # A rebalance ran inside consume(): the batch in flight and what came after
                    # it are read again (from the stored offsets, on reassigned partitions).
                    self._abandon(in_flight, messages)
                    in_flight = None
                    continue
                if messages:
                    messages = self._check_continuity(messages)
                following = None
                if messages:
                    self.state.last_activity = time.monotonic()
                    loaded = self.loaded
                    following = InFlight(
                        messages,
                        self.state.generation,
                        worker.submit(self._prepare, messages, loaded),
                    )
                dropped = in_flight is not None and self._finish(in_flight, messages) is None
                if dropped and following is not None:
                    # Dropped while held (a rebalance, or stopping): the records after it were
                    # put back with it.
                    self._discard(following)
                    following = None
                in_flight = following
                if in_flight is not None or messages:
                    continue
                if self.state.uncommitted and time.monotonic() >= self.state.commit_retry_at:
                    # A failed commit is retried after the next batch, but a quiet stream has
                    # none: the lag gauge would show a backlog that is not there (Kafka's
                    # committed offset behind the database's) for as long as it stays quiet.
                    self._commit_pending()
                if self._drift is not None:  # a window closes on the clock, traffic or not
                    self._drift_windows(self._drift.tick(datetime.now(UTC)))
                idle = time.monotonic() - self.state.last_activity
                # The group join itself takes seconds: before the first assignment allow for it.
                limit = self.stop_when_idle_s
                if limit is not None and not ever_assigned:
                    limit += JOIN_GRACE_S
                if limit is not None and idle >= limit:
                    log.info("idle, stopping", extra={"fields": {"idle_s": round(idle, 1)}})
                    break
            if in_flight is not None:
                self._finish(in_flight, [])  # drain: stopping finishes the batch in flight

    def _next_batch(self, batch_size: int, max_wait_s: float, wait: bool = True) -> list[Any]:
        """Adaptive micro-batching, latency first (Triton's dynamic batcher with no queue delay):
        take what the consumer has fetched, up to ``batch_size``, without waiting; wait only
        while nothing at all is there, and then only for the first record. Under load the
        batches grow by themselves (records pile up while the previous batch is processed); at
        light load a record goes almost alone. ``max_wait_s`` > 0 waits that much longer after
        the first record for a fuller batch (throughput over latency). ``wait=False`` (a batch
        is in flight, waiting to be written) takes what is there and never waits."""
        consume = self._consumer.consume
        raw = consume(batch_size, 0)
        if not wait:
            return raw
        if not raw:
            raw = consume(1, IDLE_POLL_S)
            if not raw:
                return raw
            # What arrived with the first record (one fetch brings many) is ready now.
            raw += consume(batch_size - 1, 0)
        if max_wait_s > 0 and len(raw) < batch_size:
            raw += consume(batch_size - len(raw), max_wait_s)
        return raw

    def process(self, messages: list[Message]) -> BatchOutcome | None:
        """Decode, score, write and commit one micro-batch, one step after another; ``None`` if
        it was abandoned. (The loop runs the same steps with two batches overlapped.)"""
        messages = self._check_continuity(messages)
        if not messages:
            return None
        generation = self.state.generation
        prepared = self._prepare_held(messages, self.loaded, generation, [])
        if prepared is None:
            return None
        return self._write_and_commit(prepared, generation, [])

    def _prepare(self, messages: list[Message], loaded: LoadedModel | None) -> Prepared:
        """Decode, check and score a batch and build what it writes. Touches no consumer or
        partition state, so it runs on the worker thread beside the write of the batch before
        (numpy, torch and the decoder's C code release the GIL for most of it)."""
        assert loaded is not None
        ingest = datetime.now(UTC)
        t0 = time.perf_counter()
        decoded = self.decoder.decode(
            [m.value for m in messages],
            partitions=[m.partition for m in messages],
            offsets=[m.offset for m in messages],
        )
        if self._registry_in_use:
            self._registry_up(True)
        decoded = self._model_checks(decoded, messages, loaded)
        self._failpoint.reached("decoded")
        t1 = time.perf_counter()
        result = loaded.scorer.score(decoded.frame) if decoded.n_valid else None
        self._failpoint.reached("scored")
        t2 = time.perf_counter()
        batch, scores_out, latencies = self._sink_batch(messages, decoded, result, loaded, ingest)
        self.metrics.stage["decode"].observe(t1 - t0)
        self.metrics.stage["score"].observe(t2 - t1)
        return Prepared(messages, ingest, t0, decoded, result, loaded, batch, scores_out, latencies)

    def _prepare_held(
        self,
        messages: list[Message],
        loaded: LoadedModel | None,
        generation: int,
        held: list[Message],
    ) -> Prepared | None:
        """``_prepare`` on this thread, retried while the schema registry is down (holding the
        batch and ``held``, the records consumed after it); ``None`` if it was dropped."""
        return self._until_done(
            lambda: self._prepare(messages, loaded),
            generation,
            [*messages, *held],
            waiting="batch not decoded (schema registry unavailable), retrying",
        )

    def _finish(self, flight: InFlight, held: list[Message]) -> BatchOutcome | None:
        """Wait for the worker's part of ``flight``, then write and commit it; ``held`` are the
        records consumed after it, put back with it if it is dropped."""
        try:
            prepared: Prepared | None = flight.future.result()
        except SchemaRegistryUnavailable:
            prepared = self._prepare_held(flight.messages, self.loaded, flight.generation, held)
            if prepared is None:
                return None
        return self._write_and_commit(prepared, flight.generation, held)

    def _abandon(self, flight: InFlight, held: list[Message]) -> None:
        """Drop the batch in flight after a rebalance: it and the records after it are sought
        back on the partitions still being read; reassigned ones are positioned from the
        database."""
        self._discard(flight)
        self._rewind([*flight.messages, *held])
        log.warning("rebalance while a batch was in flight; batch dropped")

    @staticmethod
    def _discard(flight: InFlight) -> None:
        # The worker's result is not needed; any error it met comes back when the records are
        # read again.
        with contextlib.suppress(Exception):
            flight.future.result()

    def _sink_batch(
        self,
        messages: list[Message],
        decoded: DecodedBatch,
        result: Any,
        loaded: LoadedModel,
        ingest: datetime,
        stored_record: Any = None,
    ) -> tuple[SinkBatch, list[tuple[bytes, bytes]], np.ndarray | None]:
        """What a batch writes; ``stored_record`` (default: the decoder's) reads a value's
        fields for an alert or the reservoir."""
        stored_record = stored_record or self.decoder.stored_record
        out = build_sink_batch(
            self.cfg, messages, decoded, result, loaded.version, ingest, stored_record
        )
        self._reservoir.fill(
            out[0], messages, decoded, result, loaded.version, ingest, stored_record
        )
        return out


def run_service(cfg: PipelineConfig, stop_when_idle_s: float | None = None) -> int:
    """The ``anomaly serve`` entry point: signals drain the batch in flight, then exit 0."""
    service = ScoringService(cfg, stop_when_idle_s=stop_when_idle_s)
    signal.signal(signal.SIGTERM, service.stop)
    signal.signal(signal.SIGINT, service.stop)
    return service.run()
