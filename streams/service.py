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
5. ``commit``: only now the offsets go to Kafka (synchronously).

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
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import numpy as np

from anomaly.config import DETECTOR_NAMES, PipelineConfig
from anomaly.errors import BundleError, ConfigError, IdentityError
from storage.errors import RetryableStorageError
from storage.records import (
    AlertRecord,
    DeadLetterRecord,
    OffsetRecord,
    SinkBatch,
    StreamStatRecord,
    WriteResult,
)
from streams.avro import SchemaRegistryUnavailable, make_decoder
from streams.decode import INVALID_VALUE, DecodedBatch, Rejected
from streams.metrics import Health, MetricsServer, ServiceMetrics

log = logging.getLogger("streams.service")
T = TypeVar("T")

# Detectors with their own score columns in the alerts table (the knn member's score reaches
# the scores topic and the ensemble, not a column of its own).
DETECTORS = ("vae", "flow", "gan")
# --stop-when-idle counts from the first assignment; a consumer that never gets one (more
# consumers than partitions) waits this much longer before it gives up.
JOIN_GRACE_S = 15.0
# How long one wait for a first record may block while the stream is idle: the loop looks at its
# stop flag, the idle clock and the active model version at least this often.
IDLE_POLL_S = 0.5
# Records in the scorer's warm-up batch (a few alert, so the explanation path warms up too).
WARM_UP_ROWS = 64
# How long a throwaway consumer may read to verify an offset (the log's end, a gap).
PROBE_TIMEOUT_S = 10.0


class ProduceError(RuntimeError):
    """Dead letters or scores could not be delivered; the batch is retried, nothing committed."""


@dataclass
class LoadedModel:
    model: Any  # anomaly.estimator.model.AnomalyModel
    scorer: Any  # anomaly.scoring.scorer.BatchScorer
    version: str
    source: str  # where it came from: a bundle path


@dataclass
class BatchOutcome:
    consumed: int
    scored: int
    alerts: int
    dead_letters: int
    write: WriteResult | None = None


@dataclass(slots=True)
class _Message:
    """The parts of a confluent_kafka.Message the loop needs (read once, in C, per batch)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    timestamp_ms: int | None


@dataclass
class ServiceState:
    assigned: set[tuple[str, int]] = field(default_factory=set)
    # Offsets written to the database but not yet committed to Kafka (a failed commit).
    uncommitted: dict[tuple[str, int], int] = field(default_factory=dict)
    # Set by a rebalance: a batch held across it (database down) must not be written.
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


class ScoringService:
    """``run()`` until stopped (signal, ``stop()``, or ``stop_when_idle_s`` without records)."""

    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        stop_when_idle_s: float | None = None,
        metrics: ServiceMetrics | None = None,
        health: Health | None = None,
        store: Any | None = None,
    ) -> None:
        self.cfg = cfg
        self.pipeline = cfg.name
        self.topic = cfg.kafka.topic
        self.stop_when_idle_s = stop_when_idle_s
        self.metrics = metrics or ServiceMetrics(cfg.name)
        self.health = health or Health()
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
        self.totals = BatchOutcome(0, 0, 0, 0)
        self.health.set("no_partition_stopped", True)

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

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

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
            self._load_model(initial=True)
            conf = consumer_settings(self.cfg)
            conf["stats_cb"] = self.metrics.on_statistics
            conf["error_cb"] = self._on_kafka_error
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
        kafka = self.cfg.kafka
        self.state.last_activity = time.monotonic()
        ever_assigned = False
        while not self._stop.is_set():
            self._maybe_switch_model()
            if self.state.unpositioned:
                self._position_partitions()
            messages = self._messages(self._next_batch(kafka.batch_size, kafka.max_wait_s))
            ever_assigned = ever_assigned or bool(self.state.assigned)
            if not messages:
                idle = time.monotonic() - self.state.last_activity
                # The group join itself takes seconds: before the first assignment allow for it.
                limit = self.stop_when_idle_s
                if limit is not None and not ever_assigned:
                    limit += JOIN_GRACE_S
                if limit is not None and idle >= limit:
                    log.info("idle, stopping", extra={"fields": {"idle_s": round(idle, 1)}})
                    break
                continue
            self.state.last_activity = time.monotonic()
            self.process(messages)

    def _next_batch(self, batch_size: int, max_wait_s: float) -> list[Any]:
        """Adaptive micro-batching, latency first (Triton's dynamic batcher with no queue delay):
        take what the consumer has fetched, up to ``batch_size``, without waiting; wait only
        while nothing at all is there, and then only for the first record. Under load the
        batches grow by themselves (records pile up while the previous batch is processed); at
        light load a record goes almost alone. ``max_wait_s`` > 0 waits that much longer after
        the first record for a fuller batch (throughput over latency)."""
        consume = self._consumer.consume
        raw = consume(batch_size, 0)
        if not raw:
            raw = consume(1, IDLE_POLL_S)
            if not raw:
                return raw
            # What arrived with the first record (one fetch brings many) is ready now.
            raw += consume(batch_size - 1, 0)
        if max_wait_s > 0 and len(raw) < batch_size:
            raw += consume(batch_size - len(raw), max_wait_s)
        return raw

    def _messages(self, raw: list[Any]) -> list[_Message]:
        out: list[_Message] = []
        assigned = self.state.assigned
        if self.state.unpositioned or self.state.stopped:
            assigned = assigned - self.state.unpositioned - set(self.state.stopped)
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
            out.append(_Message(key[0], key[1], m.offset(), m.value(), ts if ts_type else None))
        return out

    def process(self, messages: list[_Message]) -> BatchOutcome | None:
        """Decode, score, write and commit one micro-batch; ``None`` if it was abandoned."""
        messages = self._check_continuity(messages)
        if not messages:
            return None
        generation = self.state.generation
        ingest = datetime.now(UTC)
        t0 = time.perf_counter()
        decoded = self._until_done(
            lambda: self._decode(messages),
            generation,
            messages,
            waiting="batch not decoded (schema registry unavailable), retrying",
        )
        if decoded is None:
            return None
        decoded = self._model_checks(decoded, messages)
        t1 = time.perf_counter()
        loaded = self.loaded
        assert loaded is not None
        result = loaded.scorer.score(decoded.frame) if decoded.n_valid else None
        t2 = time.perf_counter()
        batch, scores_out, latencies = self._sink_batch(messages, decoded, result, loaded, ingest)
        self.metrics.stage["decode"].observe(t1 - t0)
        self.metrics.stage["score"].observe(t2 - t1)

        t3 = time.perf_counter()
        write = self._write(batch, messages, scores_out, generation)
        if write is None:
            return None
        t4 = time.perf_counter()
        for o in batch.offsets:
            key = (o.kafka_topic, o.kafka_partition)
            if key in self.state.assigned:
                self.state.position[key] = o.next_offset
        self._commit(batch.offsets)
        t5 = time.perf_counter()
        self.metrics.stage["write"].observe(t4 - t3)
        self.metrics.stage["commit"].observe(t5 - t4)

        # Metrics after the commit: they count work that is done.
        m = self.metrics
        m.consumed.inc(len(messages))
        m.batch_size.observe(len(messages))
        m.scored.inc(decoded.n_valid)
        for dl in batch.dead_letters:
            m.dead_lettered(dl.error_kind)
        for alert in batch.alerts:
            m.alerted(alert.severity)
        if latencies is not None and len(latencies):
            now_latency = latencies + (time.time() - ingest.timestamp())
            observe_many(m.end_to_end, now_latency)
        outcome = BatchOutcome(
            consumed=len(messages),
            scored=decoded.n_valid,
            alerts=len(batch.alerts),
            dead_letters=len(batch.dead_letters),
            write=write,
        )
        t = self.totals
        t.consumed += outcome.consumed
        t.scored += outcome.scored
        t.alerts += outcome.alerts
        t.dead_letters += outcome.dead_letters
        log.debug(
            "batch",
            extra={
                "fields": {
                    "records": outcome.consumed,
                    "alerts": outcome.alerts,
                    "dead_letters": outcome.dead_letters,
                    "ms": round((t5 - t0) * 1000, 2),
                }
            },
        )
        return outcome

    def _model_checks(
        self, decoded: DecodedBatch, messages: list[_Message], loaded: LoadedModel | None = None
    ) -> DecodedBatch:
        """The model's own per-row checks (e.g. values its preprocessor cannot use)."""
        if not decoded.n_valid:
            return decoded
        loaded = loaded or self.loaded
        assert loaded is not None
        problems = loaded.model.preprocessor_.validate_frame(decoded.frame)
        if not problems:
            return decoded
        drop = np.zeros(decoded.n_valid, dtype=bool)
        rejected = list(decoded.rejected)
        for row, kind, message in problems:
            if drop[row]:
                continue
            drop[row] = True
            i = int(decoded.index[row])
            rejected.append(
                Rejected(
                    i, kind or INVALID_VALUE, message, messages[i].partition, messages[i].offset
                )
            )
        rejected.sort(key=lambda r: r.index)
        frame = decoded.frame.loc[~drop].reset_index(drop=True)
        return DecodedBatch(frame=frame, index=decoded.index[~drop], rejected=rejected)

    # -- building the sink batch ------------------------------------------------------------

    def _sink_batch(
        self,
        messages: list[_Message],
        decoded: DecodedBatch,
        result: Any,
        loaded: LoadedModel,
        ingest: datetime,
    ) -> tuple[SinkBatch, list[tuple[bytes, bytes]], np.ndarray | None]:
        s = self.cfg.schema
        pipeline = self.pipeline
        frame = decoded.frame
        alerts: list[AlertRecord] = []
        scores_out: list[tuple[bytes, bytes]] = []
        latencies: np.ndarray | None = None
        ensemble = None
        if result is not None:
            columns = result.columns
            ensemble = columns["ensemble"]
            ids = frame[s.id_field].to_numpy(dtype=object)
            times = frame[s.time_field] if s.time_field else None
            if times is not None:
                # Seconds from the event to ingest (the commit time is added by the caller).
                event_s = times.to_numpy("datetime64[ns]").astype(np.int64) / 1e9
                latencies = ingest.timestamp() - event_s
            alert_rows = np.flatnonzero(result.is_alert)
            # The alert rows' entities and event times in one lookup each, not one per alert.
            entities = _entities(frame, s.entity_field, alert_rows)
            event_times = (
                times.iloc[alert_rows].dt.to_pydatetime().tolist()
                if times is not None
                else [None] * len(alert_rows)
            )
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
                        model_version=loaded.version,
                        ensemble_score=float(columns["ensemble"][row]),
                        ensemble_p=float(columns["ensemble_p"][row]),
                        severity=str(result.severity[row]),
                        **_detector_scores(columns, row),
                        fired_detectors=list(result.fired[row]),
                        top_features=list(result.top_features[row]),
                        record=self.decoder.record_fields(msg.value),
                    )
                )
            if self.cfg.kafka.scores_topic:
                scores_out = _score_messages(
                    pipeline, loaded.version, ids, times, columns, result, s.time_field
                )
        dead = [
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
            for r in decoded.rejected
        ]
        offsets = _offsets(pipeline, messages)
        stat = StreamStatRecord(
            pipeline=pipeline,
            minute=ingest.replace(second=0, microsecond=0),
            records_seen=len(messages),
            records_scored=decoded.n_valid,
            records_alerted=len(alerts),
            records_dead_lettered=len(dead),
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
        batch = SinkBatch(
            pipeline=pipeline, alerts=alerts, dead_letters=dead, stats=[stat], offsets=offsets
        )
        return batch, scores_out, latencies

    # -- sink and commit ------------------------------------------------------------------

    def _decode(self, messages: list[_Message]) -> DecodedBatch:
        decoded = self.decoder.decode(
            [m.value for m in messages],
            partitions=[m.partition for m in messages],
            offsets=[m.offset for m in messages],
        )
        if self._registry_in_use:
            self._registry_up(True)
        return decoded

    def _write(
        self,
        batch: SinkBatch,
        messages: list[_Message],
        scores_out: list[tuple[bytes, bytes]],
        generation: int,
    ) -> WriteResult | None:
        """Produce to the output topics, then write the database; retry while it is down."""

        def attempt() -> WriteResult:
            self._produce(batch.dead_letters, scores_out)
            result = self.store.write_batch(batch)
            self._database_up(True)
            return result

        return self._until_done(attempt, generation, messages)

    def _until_done(
        self,
        attempt: Callable[[], T],
        generation: int,
        messages: list[_Message],
        waiting: str = "batch not written, retrying",
    ) -> T | None:
        """``attempt()`` until it returns. While what it needs is down (the database, the
        output topics' broker, the schema registry) the partitions are paused and it is retried
        with backoff; ``None`` if the batch must be dropped (see ``_wait_paused``)."""
        delay = self.cfg.serve.db_retry_initial_s
        paused = False
        try:
            while True:
                try:
                    return attempt()
                except (RetryableStorageError, ProduceError, SchemaRegistryUnavailable) as exc:
                    if isinstance(exc, RetryableStorageError):
                        self._database_up(False)
                    if isinstance(exc, SchemaRegistryUnavailable):
                        self._registry_up(False)
                    if not paused and self.state.assigned:
                        self._consumer.pause(self._partitions(self.state.assigned))
                        paused = True
                    log.warning(
                        waiting,
                        extra={"fields": {"error": str(exc), "retry_in_s": delay}},
                    )
                    if not self._wait_paused(delay, generation, messages):
                        return None
                    delay = min(delay * 2, self.cfg.serve.db_retry_max_s)
        finally:
            if paused and self._consumer is not None and self._active():
                self._consumer.resume(self._partitions(self._active()))

    def _wait_paused(self, seconds: float, generation: int, messages: list[_Message]) -> bool:
        """Keep serving the group (heartbeats, rebalances) while waiting; ``False`` if the batch
        must be dropped: a rebalance happened (the new owner re-reads it from the stored
        offsets) or the service is stopping (nothing of it was committed)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stop.is_set():
                log.warning("stopping with an unwritten batch; it will be consumed again")
                return False
            got = self._consumer.consume(1, min(0.2, max(0.0, deadline - time.monotonic())))
            if self.state.generation != generation or got:
                # Partitions came back unpaused after a rebalance: put the fetched records and
                # the held batch back, from the stored offsets (seeked in on_assign).
                self._rewind([*self._messages(got), *messages])
                log.warning("rebalance while the batch was held; batch dropped")
                return False
        return True

    def _rewind(self, messages: list[_Message]) -> None:
        from confluent_kafka import TopicPartition

        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic, m.partition)
            first[key] = min(first.get(key, m.offset), m.offset)
        for key, offset in first.items():
            if key in self._active():
                try:
                    self._consumer.seek(TopicPartition(key[0], key[1], offset))
                except Exception as exc:
                    # Reading on from wherever the consumer is would skip the held records:
                    # position the partition again from the database before it is read.
                    log.error(
                        "seek failed; the partition is paused until positioned again at its "
                        "stored offset",
                        extra={
                            "fields": {
                                "topic": key[0],
                                "partition": key[1],
                                "offset": offset,
                                "error": str(exc),
                            }
                        },
                    )
                    self._unposition({key})

    def _produce(
        self, dead_letters: list[DeadLetterRecord], scores_out: list[tuple[bytes, bytes]]
    ) -> None:
        if not dead_letters and not scores_out:
            return
        failures: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)  # formatted later: str() here can fail on a fatal error

        try:
            remaining = self._produce_all(dead_letters, scores_out, delivered)
        except Exception as exc:
            # After a fatal error (an idempotent producer whose sequence numbers the broker no
            # longer accepts, e.g. OUT_OF_ORDER_SEQUENCE_NUMBER after a broker restart) the
            # producer refuses everything: replace it and retry the batch.
            fatal = _kafka_error(exc)
            if fatal is None or not fatal.fatal():
                raise
            self._replace_producer(fatal)
            raise ProduceError(
                f"fatal producer error {fatal.name()}, producer replaced: {fatal.str()}"
            ) from exc
        fatal = next((e for e in failures if getattr(e, "fatal", lambda: False)()), None)
        if fatal is not None:
            self._replace_producer(fatal)
        if remaining or failures:
            raise ProduceError(
                f"{remaining} undelivered, {len(failures)} failed"
                + (f": {failures[0]}" if failures else "")
            )

    def _produce_all(
        self,
        dead_letters: list[DeadLetterRecord],
        scores_out: list[tuple[bytes, bytes]],
        delivered: Callable[[Any, Any], None],
    ) -> int:
        """Produce the batch's dead letters and scores and flush; the number undelivered."""
        dlq = self.cfg.dead_letter_topic
        # A value larger than the producer may send (librdkafka's message.max.bytes, 1 MB by
        # default) would fail every retry and stop the stream: its head goes to the topic with the
        # original size in a header; the dead_letters table keeps every byte.
        cap = int(self.cfg.kafka.settings.get("message.max.bytes", 1_000_000)) - 65_536
        for d in dead_letters:
            headers = [
                ("error_kind", d.error_kind.encode()),
                ("error_message", d.error_message.encode()),
                ("source_topic", d.kafka_topic.encode()),
                ("source_partition", str(d.kafka_partition).encode()),
                ("source_offset", str(d.kafka_offset).encode()),
                ("pipeline", d.pipeline.encode()),
            ]
            raw = d.raw
            if len(raw) > cap:
                headers.append(("original_bytes", str(len(raw)).encode()))
                raw = raw[: max(cap, 0)]
            self._produce_one(dlq, raw, None, headers, delivered)
        scores_topic = self.cfg.kafka.scores_topic
        for key, value in scores_out:
            self._produce_one(scores_topic, value, key, None, delivered)
        return self._producer.flush(30)

    def _new_producer(self) -> Any:
        from confluent_kafka import Producer

        from streams.kafka import producer_settings

        return Producer(producer_settings(self.cfg.kafka) | {"error_cb": self._on_kafka_error})

    def _replace_producer(self, error: Any) -> None:
        log.error(
            "fatal producer error: replacing the producer (a new producer id), the batch is "
            "retried",
            extra={"fields": {"error": error.str(), "code": error.name()}},
        )
        old, self._producer = self._producer, self._new_producer()
        self.metrics.producer_rebuilds.inc()
        try:
            old.purge()  # what it still holds is retried with the batch
            old.flush(0)
        except Exception as exc:  # a dead producer may refuse even this
            log.debug("purging the old producer failed: %s", exc)

    def _produce_one(self, topic: str, value: bytes, key: bytes | None, headers: Any, cb: Any):
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=cb)
                return
            except BufferError:
                self._producer.poll(0.05)

    def _commit(self, offsets: list[OffsetRecord]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        pending = self.state.uncommitted
        for o in offsets:
            pending[(o.kafka_topic, o.kafka_partition)] = o.next_offset
        tps = [
            TopicPartition(t, p, off)
            for (t, p), off in pending.items()
            if (t, p) in self.state.assigned
        ]
        if not tps:
            return
        try:
            self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            # The database already holds these offsets and the next assignment seeks to them;
            # a lost Kafka commit costs nothing but lag accounting. Try again after the next batch.
            log.warning("Kafka commit failed (offsets are safe in the database): %s", exc)
            return
        for tp in tps:
            pending.pop((tp.topic, tp.partition), None)

    def _database_up(self, up: bool) -> None:
        self.metrics.database_up.set(1 if up else 0)
        self.health.set("database_up", up)

    def _registry_up(self, up: bool) -> None:
        self.metrics.set_schema_registry_up(up)
        self.health.set("schema_registry_up", up)

    def _with_db_retry(self, fn: Any, what: str) -> Any:
        delay = self.cfg.serve.db_retry_initial_s
        while True:
            try:
                value = fn()
                self._database_up(True)
                return value
            except RetryableStorageError as exc:
                self._database_up(False)
                log.warning(
                    "database unavailable",
                    extra={"fields": {"while": what, "error": str(exc), "retry_in_s": delay}},
                )
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, self.cfg.serve.db_retry_max_s)

    # -- rebalance callbacks (run inside consume()) -------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        # Assigned paused: the loop seeks each partition to its stored offset once it has read
        # it from the database and checked it against the log (``_position_partitions``). The
        # database and the broker are not waited for here, inside the rebalance callback.
        consumer.assign(partitions)
        if partitions:
            consumer.pause(partitions)
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self.state.generation += 1
        self.state.assigned = keys
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

    # -- positioning and offset checks ----------------------------------------------------

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
        try:
            self._consumer.pause(self._partitions(keys))
        except Exception as exc:  # its records are ignored while unpositioned anyway
            log.warning("pause failed: %s", exc)
        self.state.unpositioned |= keys

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
            self._database_up(False)
            delay = state.position_delay or self.cfg.serve.db_retry_initial_s
            log.warning(
                "database unavailable",
                extra={
                    "fields": {"while": "loading offsets", "error": str(exc), "retry_in_s": delay}
                },
            )
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

    def _check_continuity(self, messages: list[_Message]) -> list[_Message]:
        """The batch without the records of partitions where it does not continue at the next
        offset: records between would be skipped (a gap), or the log restarted below it."""
        state = self.state
        if not state.position:
            return messages
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic, m.partition)
            if key not in first:
                first[key] = m.offset
        bad: set[tuple[str, int]] = set()
        for key, offset in first.items():
            expected = state.position.get(key)
            if expected is None or offset == expected:
                continue
            problem = self._check_jump(key, expected, offset)
            if problem is not None:
                self._stop_partition(key, *problem)
                bad.add(key)
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
        try:
            self._consumer.pause(self._partitions({key}))
        except Exception as exc:  # its records are ignored while stopped anyway
            log.warning("pause failed: %s", exc)
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

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # Batches are written and committed before consume() is called again, so nothing is in
        # flight here; commit what a failed commit left behind for these partitions.
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
        for key in revoked:
            self.state.uncommitted.pop(key, None)
        self._drop(revoked)
        log.info("partitions revoked", extra={"fields": {"partitions": sorted(revoked)}})

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        # Another member may own them already: commit nothing.
        lost = {(tp.topic, tp.partition) for tp in partitions}
        for key in lost:
            self.state.uncommitted.pop(key, None)
        self._drop(lost)
        log.warning("partitions lost", extra={"fields": {"partitions": sorted(lost)}})

    def _drop(self, keys: set[tuple[str, int]]) -> None:
        state = self.state
        state.assigned -= keys
        state.unpositioned -= keys
        for key in keys:
            state.stopped.pop(key, None)
            state.position.pop(key, None)
        self._stopped_changed()
        state.generation += 1
        self.health.set("assigned", bool(state.assigned))

    def _on_kafka_error(self, err: Any) -> None:
        from streams.kafka import log_error

        log_error(err)  # rate-limited: a broker that is down reports every ~50 ms

    @staticmethod
    def _partitions(keys: set[tuple[str, int]]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(t, p) for t, p in sorted(keys)]

    # -- model versions -------------------------------------------------------------------

    def _load_model(self, initial: bool = False) -> None:
        from anomaly.estimator.bundle import CONTENT_KEY
        from anomaly.estimator.model import AnomalyModel
        from anomaly.scoring.scorer import BatchScorer

        serve = self.cfg.serve
        record = self._with_db_retry(
            lambda: self.store.active_model_version(self.pipeline), "reading the model version"
        )
        expected: str | None = None
        if record is not None:
            path, version, expected = record.bundle_path, record.version, record.bundle_sha256
        elif serve.model_dir:
            path, version = serve.model_dir, None
        else:
            raise ConfigError(
                f"pipeline {self.pipeline!r} has no active model version in the database and "
                "serve.model_dir is not set: train a model and register it, or set serve.model_dir"
            )
        try:
            # The registered sha256 is compared before anything else is read: a directory
            # swapped for another (self-consistent) bundle must not score under this version.
            model = AnomalyModel.load(
                path,
                expected_sha256=expected,
                registered_as=f"model version {version!r} of pipeline {self.pipeline!r}",
            )
        except BundleError as exc:
            self._model_refused(version, exc)
            raise
        if expected is None and model.manifest_.get(CONTENT_KEY) is None:
            log.warning(
                "bundle has neither a registered identity nor a content_sha256 (saved before "
                "it existed): an edited manifest.json cannot be detected; register the bundle",
                extra={"fields": {"bundle": str(path)}},
            )
        version = version or model.version or "unversioned"
        model.version = version
        scorer = BatchScorer(
            model,
            device=serve.device,
            batch_size=serve.scoring_batch_size,
            bf16=serve.bf16,
            threads=serve.threads,
        )
        loaded = LoadedModel(model=model, scorer=scorer, version=version, source=str(path))
        self._warm_up(loaded)
        self.loaded = loaded
        self._last_model_poll = time.monotonic()
        self.metrics.set_device(scorer.device)
        self.metrics.set_model_version(version)
        self.metrics.set_model_identity_ok(True)
        self.health.set("model_loaded", True)
        self.health.set_detail("model", None)
        log.info(
            "model loaded" if initial else "model switched",
            extra={"fields": {"version": version, "bundle": str(path), "device": scorer.device}},
        )

    def _model_refused(self, version: str | None, exc: BundleError) -> None:
        """Tell the operator (/readyz detail, metric) why the active version is not scoring."""
        if isinstance(exc, IdentityError):
            self.metrics.set_model_identity_ok(False)
        current = f"scoring with {self.loaded.version!r}" if self.loaded else "nothing loaded"
        self.health.set_detail("model", f"model version {version!r} refused ({current}): {exc}")

    def _warm_up(self, loaded: LoadedModel) -> None:
        """Decode, check, score and build the sink batch of made-up records once, before the
        first real batch: the first calls into torch, pandas and the decoder cost ~200 ms
        (bench/stream.py --rate 1000: the first batch took 214 ms against ~20 ms later), which
        every record of the first seconds would otherwise wait for. Nothing is written."""
        from streams.replay import encode_values

        started = time.perf_counter()
        try:
            frame = typical_records(loaded.model, self.cfg.schema, WARM_UP_ROWS)
            values = encode_values(frame, self.cfg)
            messages = [_Message(self.topic, 0, i, v, None) for i, v in enumerate(values)]
            decoded = self._model_checks(self._decode(messages), messages, loaded)
            result = loaded.scorer.score(decoded.frame) if decoded.n_valid else None
            self._sink_batch(messages, decoded, result, loaded, datetime.now(UTC))
        except Exception as exc:  # a warm-up must never keep the service from starting
            log.warning("scorer warm-up failed (the first batch will be slower): %s", exc)
            return
        ms = round((time.perf_counter() - started) * 1000, 1)
        log.info("scorer warmed up", extra={"fields": {"records": len(values), "ms": ms}})

    def _maybe_switch_model(self) -> None:
        """At a batch boundary: is another version active now? Then score with it from here."""
        if time.monotonic() - self._last_model_poll < self.cfg.serve.model_poll_s:
            return
        self._last_model_poll = time.monotonic()
        try:
            record = self.store.active_model_version(self.pipeline)
        except RetryableStorageError:
            return  # the batch write will notice and wait
        if record is None or self.loaded is None or record.version == self.loaded.version:
            return
        try:
            self._load_model()
        except Exception as exc:
            # A broken bundle must not stop the service: keep scoring with the current one.
            log.error(
                "cannot switch model version, keeping the current one",
                extra={"fields": {"version": record.version, "error": str(exc)}},
            )


# -- helpers ------------------------------------------------------------------------------------


def typical_records(model: Any, schema: Any, n: int) -> Any:
    """``n`` made-up records from what the model learned: each numeric feature swept from 10
    scales below its training median to 10 above (so some rows alert and are explained too),
    each categorical one at its first known category."""
    import pandas as pd

    pre = model.preprocessor_
    sweep = np.linspace(-10.0, 10.0, n)
    data: dict[str, Any] = {schema.id_field: [f"warm-up-{i}" for i in range(n)]}
    if schema.time_field:
        data[schema.time_field] = pd.Timestamp.now(tz="UTC")
    if schema.entity_field:
        data[schema.entity_field] = "warm-up"
    for name in pre.numeric_:
        params = pre.numeric_params_[name]
        data[name] = params.median + params.scale * sweep
    for name in pre.categorical_:
        data[name] = (pre.categories_[name] or ["warm-up"])[0]
    return pd.DataFrame(data)


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


def _kafka_error(exc: BaseException) -> Any:
    """The ``KafkaError`` behind ``exc`` (or its causes), if any."""
    from confluent_kafka import KafkaError, KafkaException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and seen.args and isinstance(seen.args[0], KafkaError):
            return seen.args[0]
        seen = seen.__cause__ or seen.__context__
    return None


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


_ENCODE = msgspec.json.Encoder().encode


def _offsets(pipeline: str, messages: list[_Message]) -> list[OffsetRecord]:
    first: dict[tuple[str, int], int] = {}
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        if key not in first:
            first[key] = m.offset
        last[key] = m.offset
    return [
        OffsetRecord(pipeline, t, p, next_offset=last[(t, p)] + 1, first_offset=first[(t, p)])
        for (t, p) in first
    ]


def _score_messages(
    pipeline: str,
    version: str,
    ids: np.ndarray,
    times: Any,
    columns: dict[str, np.ndarray],
    result: Any,
    time_field: str | None,
) -> list[tuple[bytes, bytes]]:
    n = len(ids)
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
        body = {"record_id": str(ids[i]), "pipeline": pipeline, "model_version": version}
        for key, col in values.items():
            body[key] = col[i]
        body["alert"] = alert[i]
        body["severity"] = severity[i]
        body["event_time"] = event_times[i]
        out.append((str(ids[i]).encode(), _ENCODE(body)))
    return out


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """Observe many values at once: per-value ``observe`` costs ~1 us each in Python."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None:  # pragma: no cover - other versions
        for v in values:
            histogram.observe(float(v))
        return
    # prometheus_client keeps per-bucket (not cumulative) counts; le buckets are inclusive.
    idx = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left")
    counts = np.bincount(idx, minlength=len(bounds))
    for i, c in enumerate(counts):
        if c:
            buckets[i].inc(int(c))
    total.inc(float(values.sum()))


def run_service(cfg: PipelineConfig, stop_when_idle_s: float | None = None) -> int:
    """The ``anomaly serve`` entry point: signals drain the batch in flight, then exit 0."""
    service = ScoringService(cfg, stop_when_idle_s=stop_when_idle_s)
    service.install_signal_handlers()
    return service.run()
