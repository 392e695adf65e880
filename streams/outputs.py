"""The scoring service's output topics: dead letters and (optionally) scores.

``OutputsMixin`` is one part of ``streams.service.ScoringService``. A batch's dead letters and
scores are produced and flushed before its database write; anything undelivered raises
``ProduceError`` and the whole batch is retried (nothing committed), so the output topics are
at-least-once. After a fatal librdkafka error, or when the producer is fenced, it is replaced by a
new one.

An attempt ends with nothing of it left in the producer: librdkafka gives up on a message after
``message.timeout.ms`` (``OUTPUT_MESSAGE_TIMEOUT_MS`` unless ``kafka.settings`` says otherwise) and
the flush waits that long and a little more (at most ``FLUSH_MAX_S``: an attempt that still finds
messages queued waits for them instead of producing again). At librdkafka's default (300 s)
against a 30-s flush, every attempt during an outage left its copy of the batch queued and all of
them were delivered once the broker came back (measured: a 45-s message timeout and 70 s of
outage put the held batch on the topic twice; tests/reliability/test_output_outage.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from storage.records import DeadLetterRecord

log = logging.getLogger("streams.service")

# librdkafka's message.timeout.ms for the output producer (its own default is 300 s).
OUTPUT_MESSAGE_TIMEOUT_MS = 30_000
# How much longer than the message timeout a flush waits: librdkafka scans for timed-out
# messages about once a second.
FLUSH_MARGIN_S = 5.0
# The longest a flush waits, whatever kafka.settings says (a "retry for ever" timeout of 2^31 ms
# would block the loop for weeks): an attempt flushes at most twice, and the consumer must be
# polled within max.poll.interval.ms (at least 300 s). Messages still queued after it are waited
# for by the next attempt, never produced again beside them.
FLUSH_MAX_S = 60.0


class ProduceError(RuntimeError):
    """Dead letters or scores could not be delivered; the batch is retried, nothing committed."""


class OutputsMixin:
    """Producing of ``ScoringService`` (its attributes: ``cfg``, ``metrics``, ``_producer``)."""

    cfg: Any
    metrics: Any
    _producer: Any

    def _produce(
        self, dead_letters: list[DeadLetterRecord], scores_out: list[tuple[bytes, bytes]]
    ) -> None:
        if not dead_letters and not scores_out:
            return
        # Messages an earlier attempt left (a request in flight past its timeout, or a batch
        # dropped on a rebalance): wait for them rather than queue a second copy beside them.
        waiting = len(self._producer)
        if waiting and self._producer.flush(self._flush_wait_s()):
            raise ProduceError(f"{waiting} messages of an earlier attempt still undelivered")
        failures: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)  # formatted later: str() here can fail on a fatal error

        try:
            remaining = self._produce_all(dead_letters, scores_out, delivered)
        except Exception as exc:
            # After a fatal error (an idempotent producer whose sequence numbers the broker no
            # longer accepts, e.g. OUT_OF_ORDER_SEQUENCE_NUMBER after a broker restart) or
            # fencing the producer refuses everything: replace it and retry the batch.
            cause = _kafka_error(exc)
            if cause is None or not _needs_new_producer(cause):
                raise
            self._replace_producer(cause)
            raise ProduceError(
                f"producer error {cause.name()}, producer replaced: {cause.str()}"
            ) from exc
        cause = next((e for e in failures if _needs_new_producer(e)), None)
        if cause is not None:
            self._replace_producer(cause)
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
        from streams.kafka import produce

        dlq = self.cfg.dead_letter_topic
        # A dead letter larger than the producer may send (librdkafka's message.max.bytes, 1 MB
        # by default; it counts value, key and headers) would fail every retry and stop the
        # stream: its head goes to the topic with the original size in a header; the
        # dead_letters table keeps every byte. 64 KiB are left for the record's framing.
        limit = int(self.cfg.kafka.settings.get("message.max.bytes", 1_000_000)) - 65_536
        for d in dead_letters:
            headers = dead_letter_headers(d)
            raw = d.raw
            cap = limit - _headers_size(headers)
            if len(raw) > cap:
                headers.append(("original_bytes", str(len(raw)).encode()))
                raw = raw[: max(cap - _headers_size(headers[-1:]), 0)]
            produce(self._producer, dlq, value=raw, headers=headers, on_delivery=delivered)
        scores_topic = self.cfg.kafka.scores_topic
        for key, value in scores_out:
            produce(self._producer, scores_topic, value=value, key=key, on_delivery=delivered)
        return self._producer.flush(self._flush_wait_s())

    def _flush_wait_s(self) -> float:
        """Long enough for every queued message to be delivered or to time out, at most
        ``FLUSH_MAX_S``."""
        settings = {"message.timeout.ms": OUTPUT_MESSAGE_TIMEOUT_MS} | self.cfg.kafka.settings
        # delivery.timeout.ms is its alias; librdkafka applies the settings in this order, so
        # with both the later one is in force (the producer's dict keeps the same order).
        timeouts = [
            v for k, v in settings.items() if k in ("message.timeout.ms", "delivery.timeout.ms")
        ]
        return min(int(timeouts[-1]) / 1000 + FLUSH_MARGIN_S, FLUSH_MAX_S)

    def _new_producer(self) -> Any:
        from confluent_kafka import Producer

        from streams.kafka import producer_settings

        settings = producer_settings(self.cfg.kafka)
        return Producer({"message.timeout.ms": OUTPUT_MESSAGE_TIMEOUT_MS} | settings)

    def _replace_producer(self, error: Any) -> None:
        log.error(
            "producer fatally failed or fenced: replacing the producer (a new producer id), the "
            "batch is retried",
            extra={"fields": {"error": error.str(), "code": error.name()}},
        )
        old, self._producer = self._producer, self._new_producer()
        self.metrics.producer_rebuilds.inc()
        try:
            old.purge()  # what it still holds is retried with the batch
            old.flush(0)
        except Exception as exc:  # a dead producer may refuse even this
            log.debug("purging the old producer failed: %s", exc)


# Each header value of a dead letter is cut to this many bytes: a long error message (a bad value
# quoted in it) must not make the dead letter too large to produce.
HEADER_MAX_BYTES = 1024


def dead_letter_headers(d: DeadLetterRecord) -> list[tuple[str, bytes]]:
    """The Kafka headers of a dead letter: its reason and where it came from."""
    return [
        ("error_kind", _header_value(d.error_kind)),
        ("error_message", _header_value(d.error_message)),
        ("source_topic", _header_value(d.kafka_topic)),
        ("source_partition", str(d.kafka_partition).encode()),
        ("source_offset", str(d.kafka_offset).encode()),
        ("pipeline", _header_value(d.pipeline)),
    ]


def _header_value(text: str) -> bytes:
    """``text`` as UTF-8, at most ``HEADER_MAX_BYTES``; cut on a character boundary with a
    marker that gives the full size. A lone surrogate becomes its escape rather than an error."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= HEADER_MAX_BYTES:
        return data
    marker = f"... (truncated, {len(data)} bytes in all)".encode()
    head = data[: HEADER_MAX_BYTES - len(marker)].decode("utf-8", "ignore").encode()
    return head + marker


def _headers_size(headers: list[tuple[str, bytes]]) -> int:
    return sum(len(name) + len(value) for name, value in headers)


def _needs_new_producer(error: Any) -> bool:
    """A producer error after which this producer can never deliver again: a fatal one, or its
    producer id fenced by a newer producer. ``produce`` on a producer already in the fatal state
    raises ``_FATAL`` without the fatal flag (confluent-kafka), e.g. when the fatal delivery
    report went to an earlier attempt's callback. librdkafka does not flag the fencing of an
    idempotent (not transactional) producer as fatal, yet every retry gets it again: seen on
    Tansu after a restart, where two new producers were handed the service producer's id in
    turn and the batch was retried with ``PRODUCER_FENCED`` until the test gave up (about one
    run in eight of the recreated-topic scenario in tests/streams/test_offset_safety.py with its
    partitions produced in the other order). ``INVALID_PRODUCER_EPOCH``, the code Kafka brokers
    answered fencing with before ``PRODUCER_FENCED`` (KIP-588), is treated the same."""
    from confluent_kafka import KafkaError

    return bool(error.fatal()) or error.code() in (
        KafkaError._FATAL,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    )


def _kafka_error(exc: BaseException) -> Any:
    """The ``KafkaError`` behind ``exc`` (or its causes), if any."""
    from confluent_kafka import KafkaError, KafkaException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and seen.args and isinstance(seen.args[0], KafkaError):
            return seen.args[0]
        seen = seen.__cause__ or seen.__context__
    return None
