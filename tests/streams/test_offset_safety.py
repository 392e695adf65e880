"""Stream safety: the service never skips records silently (docs/reliability.md, "Offset gaps").

Real broker (an embedded Tansu of the test's own, so it can be restarted), real database, real
model; the service runs in-process on a thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from anomaly.config import load_config
from storage.records import DeadLetterRecord
from storage.store import AlertStore
from streams.broker import EmbeddedBroker, create_topic
from streams.service import ScoringService

from .conftest import LABELS, bad_records, consume_all

pytestmark = [pytest.mark.kafka]


def _values(fraud_records, n: int, start: int = 0) -> list[bytes]:
    rows = json.loads(
        fraud_records.drop(columns=LABELS)
        .iloc[start : start + n]
        .to_json(orient="records", date_format="iso")
    )
    return [json.dumps(r).encode() for r in rows]


def _idempotent_produce(bootstrap: str, topic: str, values: list[bytes], partition: int) -> None:
    """As ``anomaly replay`` produces: an idempotent producer (it gets a producer id)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value=value, partition=partition)
    assert producer.flush(30) == 0


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Running:
    """``ScoringService.run()`` on a thread; ``stop()`` returns its exit status."""

    def __init__(self, config: Path) -> None:
        self.service = ScoringService(load_config(config))
        self.result: list[object] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result.append(self.service.run())
        except BaseException as exc:  # the test asserts on it
            self.result.append(exc)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> object:
        self.service.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the service did not stop"
        return self.result[0]

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():  # a failed test: stop it all the same
            self.service.stop()
            self.thread.join(60)


def _metric(service: ScoringService, name: str, **labels: str) -> float:
    labels = {"pipeline": service.pipeline, **labels}
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_recreated_topic_stops_the_partition_loudly_and_the_others_go_on(
    tmp_path, pipeline_file, topic_name, trained_model, fraud_records, caplog
):
    """The issue's scenario: the broker restarts empty, the topic is recreated and filled again
    by an idempotent producer. Partition 0 (stored offset 303, new log shorter) must stop with
    an error, a metric and /readyz down, never read; partition 1 (new) is scored and its dead
    letters reach the new broker. (On main partition 0 waits silently for offset 303.)"""
    caplog.set_level(logging.INFO)
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    bootstrap = broker.bootstrap_servers
    db_url = f"sqlite:///{tmp_path / 'anomaly.db'}"
    config = pipeline_file(db_url, trained_model.bundle, kafka={"bootstrap_servers": bootstrap})
    cfg = load_config(config)
    store = AlertStore.from_config(cfg)
    store.upgrade()
    first = json.loads(_values(fraud_records, 1)[0])
    bad = [value for value, _ in bad_records(first | {"id": "bad"})][:3]
    running = None
    try:
        create_topic(bootstrap, topic_name, partitions=2)
        _idempotent_produce(bootstrap, topic_name, _values(fraud_records, 300) + bad, 0)
        running = Running(config)
        service = running.service
        _wait(lambda: store.load_offsets(cfg.name, topic_name) == {0: 303}, 60, "first 303")

        # The broker restarts with nothing (memory only); the topic is created again.
        broker.stop()
        broker = EmbeddedBroker(port=broker.port, log_path=tmp_path / "tansu2.log").start()
        create_topic(bootstrap, topic_name, partitions=2)
        _idempotent_produce(bootstrap, topic_name, _values(fraud_records, 100, 300), 0)
        _idempotent_produce(bootstrap, topic_name, _values(fraud_records, 50, 400) + bad, 1)

        _wait(
            lambda: store.load_offsets(cfg.name, topic_name).get(1) == 53 or not running.alive(),
            90,
            "partition 1 of the new topic to be written",
        )
        # Partition 0 is checked when it is next assigned. That is usually before partition 1
        # is read, but Tansu serves fetches of the old assignment until the consumer learns
        # that the new broker does not know its group (a fetch at 303 waits there, it is not
        # refused); partition 1's records can be written before that (about one run in
        # sixteen), so wait for the stop as well. The service counts a batch after its Kafka
        # commit, which follows the database write the first wait saw: wait for the count too
        # (the exact figures are asserted below).
        _wait(
            lambda: (
                (
                    _metric(service, "anomaly_partitions_stopped") == 1
                    and service.totals.consumed >= 303 + 53
                )
                or not running.alive()
            ),
            60,
            "partition 0 to stop and the written batch to be counted",
        )
        assert running.alive(), f"the service ended: {running.result}"
        # Partition 0 stopped loudly, and never read; each stop is counted and logged once.
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        stopped = [m for m in errors if m.startswith(f"partition {topic_name}[0] stopped")]
        assert stopped, errors
        assert "the stored next offset 303 is beyond the end of the log" in stopped[0]
        assert "the topic was recreated or truncated" in stopped[0]
        gaps = _metric(
            service,
            "anomaly_offset_gaps_total",
            topic=topic_name,
            partition="0",
            kind="beyond_end",
        )
        assert gaps == len(stopped), (gaps, stopped)
        assert _metric(service, "anomaly_partitions_stopped") == 1
        assert service.health.snapshot()["no_partition_stopped"] is False
        assert not service.health.ready
        assert store.load_offsets(cfg.name, topic_name) == {0: 303, 1: 53}
        assert service.totals.consumed == 303 + 53
        # The new partition's dead letters reached the new broker's dead-letter topic: each of
        # its three bad records, nothing of partition 0. Output topics are at-least-once: the
        # old producer meets a broker that lost its state with a fatal out-of-order-sequence
        # error, is replaced and the batch produced again, and when part of its first request
        # was taken before the error, some dead letters arrive twice (seen about once in five
        # runs since the loop produces while the next batch is scored).
        dlq = consume_all(bootstrap, cfg.dead_letter_topic, 3)
        sources = {
            (dict(m.headers())["source_partition"], dict(m.headers())["source_offset"]) for m in dlq
        }
        assert sources == {(b"1", b"50"), (b"1", b"51"), (b"1", b"52")}, sources
        assert running.stop() == 0
        running = None
    finally:
        if running is not None:
            running.service.stop()
            running.thread.join(60)
        broker.stop()
        store.close()


def _dead_letters(service: ScoringService, n: int, start: int) -> list[DeadLetterRecord]:
    return [
        DeadLetterRecord(
            pipeline=service.pipeline,
            kafka_topic=service.topic,
            kafka_partition=0,
            kafka_offset=start + i,
            raw=b"{not json",
            error_kind="invalid_json",
            error_message="not JSON",
            created_at=datetime.now(UTC),
        )
        for i in range(n)
    ]


class OutputsAcrossRestarts:
    """A service (its loop not running) with its output producer, on an embedded broker that
    the test restarts (memory only: the restarted broker hands out producer ids from 1 again)."""

    def __init__(self, tmp_path: Path, pipeline_file, bundle: Path, **settings: object) -> None:
        self.tmp_path = tmp_path
        self.broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
        self.bootstrap = self.broker.bootstrap_servers
        kafka = {"bootstrap_servers": self.bootstrap, "settings": settings}
        config = pipeline_file(f"sqlite:///{tmp_path / 'a.db'}", bundle, kafka=kafka)
        self.service = ScoringService(load_config(config))
        self.dlq = self.service.cfg.dead_letter_topic
        create_topic(self.bootstrap, self.dlq, partitions=1)

    def start_producer(self) -> None:
        self.service._producer = self.service._new_producer()

    def produce(self, n: int, start: int) -> None:
        """The service producing ``n`` dead letters of source offsets ``start``..."""
        self.service._produce(_dead_letters(self.service, n, start), [])

    def other_producer(self, n: int) -> None:
        """Another idempotent producer (a new producer id) writing ``n`` records."""
        _idempotent_produce(self.bootstrap, self.dlq, [b"other"] * n, 0)

    def restart_broker(self) -> None:
        self.broker.stop()
        self.broker = EmbeddedBroker(
            port=self.broker.port, log_path=self.tmp_path / "tansu2.log"
        ).start()
        create_topic(self.bootstrap, self.dlq, partitions=1)

    def replaced_on(self, error: str, n: int, start: int) -> None:
        """The next attempt fails with ``error`` and replaces the producer; the retry, on the
        new producer, is delivered."""
        from streams.outputs import ProduceError

        old = self.service._producer
        with pytest.raises(ProduceError, match=error):
            self.produce(n, start)
        assert self.service._producer is not old
        assert _metric(self.service, "anomaly_producer_rebuilds_total") == 1
        self.produce(n, start)

    def dead_letter_offsets(self, n: int) -> list[int]:
        """The source offsets of the dead letters among the first ``n`` messages of the topic."""
        messages = consume_all(self.bootstrap, self.dlq, n)
        assert len(messages) == n
        return sorted(int(dict(m.headers())["source_offset"]) for m in messages if m.headers())

    def close(self) -> None:
        if self.service._producer is not None:
            self.service._producer.flush(5)
        self.broker.stop()


def test_a_fatal_idempotent_producer_error_replaces_the_producer(
    tmp_path, pipeline_file, trained_model
):
    """After a broker restart another idempotent producer gets the service producer's id; the
    service producer's next batch is refused with the fatal OUT_OF_ORDER_SEQUENCE_NUMBER. The
    batch must fail as a retryable ``ProduceError`` (not crash the service), and the retry go
    out on a new producer. On main ``_produce`` raised out of the loop and ``serve`` exited."""
    outputs = OutputsAcrossRestarts(tmp_path, pipeline_file, trained_model.bundle)
    try:
        outputs.start_producer()
        outputs.produce(50, 0)
        outputs.restart_broker()
        outputs.other_producer(20)  # handed producer id 1 again
        outputs.replaced_on("OUT_OF_ORDER_SEQUENCE_NUMBER", 5, 50)
        # The new broker's topic: the other producer's 20 and the retried 5, each once.
        assert outputs.dead_letter_offsets(25) == [50, 51, 52, 53, 54]
    finally:
        outputs.close()


def test_a_fenced_producer_is_replaced(tmp_path, pipeline_file, trained_model):
    """Another order of the same restart: the service producer tries the new broker first (the
    broker does not know its id and its messages time out: docs/reliability.md), then a second
    new producer is handed its id, and every delivery after that fails with PRODUCER_FENCED,
    which librdkafka does not flag as fatal. The producer must be replaced and the retry
    delivered. Before, the batch was retried on the fenced producer for ever (the
    recreated-topic test above, produced in the other order, stalled about one run in
    eight)."""
    from streams.outputs import ProduceError

    # Short message timeouts: the attempt on the new broker times out in seconds.
    outputs = OutputsAcrossRestarts(
        tmp_path, pipeline_file, trained_model.bundle, **{"message.timeout.ms": 3000}
    )
    try:
        outputs.other_producer(3)  # producer id 1; the service producer gets 2
        outputs.start_producer()
        outputs.produce(3, 0)
        outputs.restart_broker()
        outputs.other_producer(2)  # producer id 1
        with pytest.raises(ProduceError):
            outputs.produce(2, 3)
        outputs.other_producer(2)  # producer id 2, the service producer's
        outputs.replaced_on("PRODUCER_FENCED", 2, 3)
        assert outputs.dead_letter_offsets(6) == [3, 4]
    finally:
        outputs.close()
