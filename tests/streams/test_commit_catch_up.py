"""Kafka's committed offset catches up with the database's (docs/reliability.md, section 1).

The database holds the offsets (the source of truth); Kafka's committed offset only follows it,
and ``anomaly_consumer_lag`` is measured from Kafka's. When a Kafka commit is lost (a crash
between the database write and the commit, or a failed commit) and the stream then goes quiet,
nothing used to commit again: an idle, caught-up service showed a backlog, and the
AnomalyNoRecordsScored rule paged. Real broker (the session's Tansu), real database and model;
the service runs in-process on a thread.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from anomaly.config import load_config
from storage.store import AlertStore
from streams.broker import create_topic

from .conftest import committed_offsets, produce
from .test_offset_safety import Running, _values, _wait

pytestmark = [pytest.mark.kafka]

RECORDS = 20
LOST_COMMIT = 4  # what Kafka's group offset was when the commit after the write was lost


def _lost_commit(bootstrap: str, topic: str, group: str) -> None:
    """The group's Kafka offset stays behind: commit ``LOST_COMMIT`` while no member is in it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, LOST_COMMIT)], asynchronous=False)
    finally:
        consumer.close()


def _setup(tmp_path, pipeline_file, kafka_bootstrap, topic_name, trained_model, fraud_records):
    """A topic of ``RECORDS`` records, all written to the database (its offset says so) while
    Kafka's committed offset is ``LOST_COMMIT``: the state after the ``written`` failpoint."""
    config = pipeline_file(f"sqlite:///{tmp_path / 'anomaly.db'}", trained_model.bundle)
    cfg = load_config(config)
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    produce(kafka_bootstrap, topic_name, _values(fraud_records, RECORDS), partition=0)
    store = AlertStore.from_config(cfg)
    store.upgrade()
    store.reset_offsets(cfg.name, topic_name, {0: RECORDS})
    _lost_commit(kafka_bootstrap, topic_name, cfg.group_id)
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: LOST_COMMIT}
    return config, cfg, store


def _wait_committed(bootstrap: str, topic: str, group: str, offset: int, what: str) -> None:
    _wait(lambda: committed_offsets(bootstrap, topic, group) == {0: offset}, 30, what)


@pytest.fixture
def caught_up(tmp_path, pipeline_file, kafka_bootstrap, topic_name, trained_model, fraud_records):
    """The service started on that state, once Kafka's committed offset has reached the
    database's (positioning commits the offset it seeks to): (running service, config, store)."""
    config, cfg, store = _setup(
        tmp_path, pipeline_file, kafka_bootstrap, topic_name, trained_model, fraud_records
    )
    with store, Running(config) as running:
        _wait_committed(
            kafka_bootstrap, topic_name, cfg.group_id, RECORDS, "positioning to commit it"
        )
        yield running, cfg, store


def test_positioning_commits_the_stored_offset_so_an_idle_service_shows_no_lag(
    caught_up, topic_name
):
    """Nothing is left to read; positioning at the database's offset must also commit it (the
    fixture waits for that), so the lag gauge reads 0. (Before: Kafka stayed at 4 and the gauge
    at 16 while idle.)"""
    running, cfg, store = caught_up
    service = running.service
    # librdkafka reports lag every statistics interval (5 s): it must come down to 0.
    lag = {"pipeline": service.pipeline, "topic": topic_name, "partition": "0"}
    registry = service.metrics.registry
    _wait(
        lambda: registry.get_sample_value("anomaly_consumer_lag", lag) == 0,
        20,
        "the lag gauge to read 0",
    )
    assert running.alive(), f"the service ended: {running.result}"
    # Nothing was read again: the database's offset is where the service started.
    assert service.totals.consumed == 0
    assert store.load_offsets(cfg.name, topic_name) == {0: RECORDS}
    assert running.stop() == 0


def test_a_failed_commit_is_retried_while_the_stream_is_quiet(
    caught_up, kafka_bootstrap, topic_name
):
    """A commit that failed leaves the database's offset pending (``state.uncommitted``) and
    Kafka's behind; with no next batch to retry after, the idle loop must commit it. (Before:
    it stayed pending, and the lag gauge up, until a record arrived.)"""
    running, cfg, _ = caught_up
    service = running.service
    # Kafka's offset goes back, as if the last commit had been lost, through the member itself
    # (the broker refuses commits for the group from anyone else), and the offset the database
    # holds is pending, as ``_commit_pending`` leaves it after a failure.
    key = (topic_name, 0)
    service._consumer.commit(
        offsets=[TopicPartition(topic_name, 0, LOST_COMMIT)], asynchronous=False
    )
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: LOST_COMMIT}
    service.state.uncommitted[key] = RECORDS
    started = time.monotonic()
    _wait_committed(kafka_bootstrap, topic_name, cfg.group_id, RECORDS, "the idle loop's retry")
    assert time.monotonic() - started < 15
    assert key not in service.state.uncommitted
    assert service.totals.consumed == 0
    assert running.stop() == 0
