"""librdkafka settings for the service's consumer and producers, built from the pipeline config.

Secrets (the SASL password) come from the environment (``ANOMALY_KAFKA_SASL_PASSWORD``) or a file
(``kafka.sasl_password_file``) and are never logged: ``redacted`` hides them before a config is
written to a log line.
"""

from __future__ import annotations

import logging
from typing import Any

from anomaly.config import KafkaConfig, PipelineConfig, read_secret
from streams.metrics import RepeatFilter

_SECRET_KEYS = ("sasl.password", "ssl.key.password", "ssl.keystore.password")

# librdkafka's own log lines ("FAIL [rdkafka#consumer-1] ... Connection refused") go through
# Python logging, so they come out in the service's JSON format instead of as raw ``%3|`` lines
# on stderr; they are served from the client's poll/consume/flush calls. Errors reported to
# ``error_cb`` are logged on ``streams.kafka``. With the broker down librdkafka retries the
# bootstrap connection every ~50 ms: each distinct line is let through once per 30 s.
librdkafka_log = logging.getLogger("librdkafka")
librdkafka_log.addFilter(RepeatFilter(30.0))
log = logging.getLogger("streams.kafka")
log.addFilter(RepeatFilter(30.0))


def log_error(err: Any) -> None:
    """librdkafka's ``error_cb``: a warning, repeats rate-limited."""
    log.warning("kafka error: %s", err)


# kafka.settings that only a producer reads: the consumer does not get them, or librdkafka warns
# at every start ("... is a producer property and will be ignored by this consumer instance").
# The list is librdkafka's own: each name below, aliases included, drew that warning from a
# consumer of this version.
PRODUCER_ONLY = frozenset(
    {
        "acks", "batch.num.messages", "batch.size", "compression.codec", "compression.level",
        "compression.type", "delivery.report.only.error", "delivery.timeout.ms",
        "enable.gapless.guarantee", "enable.idempotence", "linger.ms", "message.send.max.retries",
        "message.timeout.ms", "partitioner", "queue.buffering.backpressure.threshold",
        "queue.buffering.max.kbytes", "queue.buffering.max.messages", "queue.buffering.max.ms",
        "request.required.acks", "request.timeout.ms", "retries", "sticky.partitioning.linger.ms",
        "transaction.timeout.ms", "transactional.id",
    }
)  # fmt: skip


def client_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by consumers, producers and admin clients, and
    where their logs and errors go."""
    optional = {
        "security.protocol": kafka.security_protocol,
        "sasl.mechanism": kafka.sasl_mechanism,
        "sasl.username": kafka.sasl_username,
        "sasl.password": read_secret(kafka.sasl_password, kafka.sasl_password_file),
        "ssl.ca.location": kafka.ssl_ca_location,
    }
    return {
        "bootstrap.servers": kafka.bootstrap_servers,
        "logger": librdkafka_log,
        "error_cb": log_error,
    } | {key: value for key, value in optional.items() if value}


def consumer_settings(cfg: PipelineConfig, stats_interval_ms: int = 5000) -> dict[str, Any]:
    """The service consumer. Offsets are committed by hand, only after the database write."""
    kafka = cfg.kafka
    # One batch may take max_wait_s to gather plus its processing; leave generous room so a slow
    # database write (with retries) never gets the consumer thrown out of the group.
    poll_interval_ms = max(300_000, int(kafka.max_wait_s * 1000) * 10)
    conf = client_settings(kafka) | {
        "group.id": cfg.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Measured on the embedded Tansu broker: the group join takes 23 s at the default 45 s
        # session timeout and 3 s at 6 s.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1500,
        # Measured: 1.8x consume throughput against the 1000 ms default.
        "fetch.queue.backoff.ms": 10,
        # How long the broker may hold a fetch that finds nothing new. Apache Kafka answers as
        # soon as a record arrives, so this only sets the idle request rate there; brokers that
        # hold the fetch for the whole wait (Tansu) add it to every record's latency.
        # bench/stream.py --rate 1000, Tansu: p99 produce -> commit 289 ms at the 500 ms
        # default, 48-53 ms at 25 ms, 51-54 ms at 10 ms (so 25: 40 idle fetches/s, not 100).
        "fetch.wait.max.ms": 25,
        "max.poll.interval.ms": poll_interval_ms,
        "statistics.interval.ms": stats_interval_ms,
    }
    conf.update({k: v for k, v in kafka.settings.items() if k not in PRODUCER_ONLY})
    return conf


def producer_settings(kafka: KafkaConfig) -> dict[str, Any]:
    conf = client_settings(kafka) | {
        "linger.ms": 5,
        "enable.idempotence": True,
        "acks": "all",
    }
    # Consumer-only pass-through settings would only make the producer warn.
    consumer_only = ("fetch.", "session.", "heartbeat.", "group.", "auto.", "max.poll")
    conf.update({k: v for k, v in kafka.settings.items() if not k.startswith(consumer_only)})
    return conf


def produce(producer: Any, topic: str, **message: Any) -> None:
    """``producer.produce``, waiting while the local queue is full (librdkafka sends meanwhile)."""
    while True:
        try:
            producer.produce(topic, **message)
            return
        except BufferError:
            producer.poll(0.05)


def redacted(conf: dict[str, Any]) -> dict[str, Any]:
    """The settings fit for a log line: secrets hidden, callbacks and the logger left out."""
    return {
        k: ("***" if k in _SECRET_KEYS else v)
        for k, v in conf.items()
        if v is None or isinstance(v, str | int | float | bool)
    }
