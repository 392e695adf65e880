"""The output topics' broker cannot be reached while the input topic can (in production: a broker
that refuses the scores or dead-letter topic, too few in-sync replicas for ``acks=all``): the
service holds the batch, writes and commits nothing, and says so on ``/readyz`` and in
``anomaly_output_topics_up``; once the outputs are reachable the batch goes through, once.

The service's producer is pointed at a loopback port where nothing listens (a real librdkafka
producer, its messages time out), then a proxy to the broker opens on that port. The slow case
gives librdkafka a message timeout longer than the 30-s flush the service used to wait: with
that flush, each attempt left its copy of the batch queued, and the topic got every copy (the
held 100 records twice in this test).
"""

from __future__ import annotations

import json
import threading

import pytest
from harness import (
    committed_offsets,
    consume_all,
    http_get,
    make_stream,
    streams_fixtures,
    wait_for,
)
from tcp_proxy import TcpProxy

from anomaly.config import load_config
from streams.broker import create_topic, free_port
from streams.kafka import producer_settings
from streams.service import ScoringService

pytestmark = [pytest.mark.reliability, pytest.mark.kafka]


@pytest.mark.parametrize(
    "message_timeout_ms", [2_000, pytest.param(40_000, marks=pytest.mark.slow)]
)
def test_unreachable_output_topics_hold_the_batch_and_report_not_ready(
    message_timeout_ms, sqlite_url, kafka_bootstrap, topic_name, pipeline_file, trained_model, sql
):
    from confluent_kafka import Producer

    scores_topic = f"{topic_name}.scores"
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    create_topic(kafka_bootstrap, scores_topic, partitions=1)
    cfg = load_config(
        pipeline_file(
            sqlite_url,
            trained_model.bundle,
            kafka={
                "scores_topic": scores_topic,
                "settings": {"message.timeout.ms": message_timeout_ms},
            },
        )
    )
    values = make_stream(trained_model.model, 200, bad_every=0).values
    gauge = f'anomaly_output_topics_up{{pipeline="{cfg.name}"}}'
    service = ScoringService(cfg)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    proxy = None

    def seen() -> int:
        try:
            return sql(sqlite_url, "SELECT coalesce(sum(records_seen), 0) FROM stream_stats")[0][0]
        except Exception:  # before the service has created its tables
            return -1

    try:
        streams_fixtures.produce(kafka_bootstrap, topic_name, values[:100])
        wait_for(lambda: seen() == 100, 60, "the first 100 records")
        url = service.metrics_server.url
        assert http_get(f"{url}/readyz")[0] == 200
        assert f"{gauge} 1.0" in http_get(f"{url}/metrics")[1]

        # Between batches (the loop is idle): the outputs now go to a port nobody listens on.
        port = free_port()
        settings = producer_settings(cfg.kafka)
        away = Producer(settings | {"bootstrap.servers": f"127.0.0.1:{port}"})
        service._producer, old = away, service._producer
        old.flush(5)
        streams_fixtures.produce(kafka_bootstrap, topic_name, values[100:])
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 503, 120, "not ready")
        status, body = http_get(f"{url}/readyz")
        assert status == 503 and json.loads(body)["conditions"]["output_topics_up"] is False, body
        assert f"{gauge} 0.0" in http_get(f"{url}/metrics")[1]
        assert runner.is_alive()
        assert seen() == 100
        assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: 100}

        host, broker_port = kafka_bootstrap.rsplit(":", 1)
        proxy = TcpProxy((host, int(broker_port)), port=port).start()
        wait_for(lambda: seen() == 200, 90, "the held batch after the outputs came back")
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 200, 30, "ready again")
        assert f"{gauge} 1.0" in http_get(f"{url}/metrics")[1]
    finally:
        service.stop()
        runner.join(30)
        if proxy is not None:
            proxy.close()
    assert not runner.is_alive()
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: 200}
    # Each record's score once: the timed-out messages never reached the broker.
    keys = sorted(m.key().decode() for m in consume_all(kafka_bootstrap, scores_topic, 200))
    assert keys == sorted(json.loads(v)["id"] for v in values)


@pytest.mark.parametrize(
    ("settings", "wait_s"),
    [
        ({}, 35.0),  # librdkafka's 300-s default would outlast every flush: 30 s, plus 5
        ({"delivery.timeout.ms": "12000"}, 17.0),  # the alias, as YAML may give it
        ({"message.timeout.ms": 1000, "delivery.timeout.ms": 9000}, 14.0),  # the later wins
        ({"message.timeout.ms": 2**31 - 1}, 60.0),  # "retry for ever" must not block the loop
    ],
)
def test_the_flush_waits_for_the_message_timeout_within_a_bound(
    settings, wait_s, sqlite_url, pipeline_file, trained_model
):
    cfg = load_config(pipeline_file(sqlite_url, trained_model.bundle, kafka={"settings": settings}))
    assert ScoringService(cfg)._flush_wait_s() == wait_s
