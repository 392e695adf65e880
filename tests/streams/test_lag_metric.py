"""anomaly_consumer_lag from librdkafka's statistics: only the partitions this consumer reads."""

from __future__ import annotations

import json

from prometheus_client import generate_latest

from streams.metrics import ServiceMetrics

TOPIC = "fraud.transactions"


def stats(partitions: dict[str, dict]) -> str:
    """A statistics document as librdkafka's stats_cb passes it (the fields the metric reads;
    shapes as logged from a consumer of the embedded broker)."""
    return json.dumps({"type": "consumer", "topics": {TOPIC: {"partitions": partitions}}})


def lag_series(metrics: ServiceMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("anomaly_consumer_lag{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('partition="')[1].split('"')[0]] = float(value)
    return out


def owned(lag: int) -> dict:
    return {"desired": True, "fetch_state": "active", "consumer_lag": lag}


def test_a_partition_taken_away_by_a_rebalance_does_not_come_back_with_a_frozen_lag():
    """After a rebalance librdkafka keeps reporting a revoked partition (desired false,
    fetch_state stopped) with the lag it had when it left: the series came back after
    forget_lag and stayed at that value, so lag rules paged for a partition read elsewhere."""
    m = ServiceMetrics("fraud")
    m.on_statistics(stats({"0": owned(2300), "1": owned(0), "-1": owned(0) | {"desired": False}}))
    assert lag_series(m) == {"0": 2300.0, "1": 0.0}
    m.forget_lag(TOPIC, 0)  # the service's revoke
    revoked = {"desired": False, "fetch_state": "stopped", "consumer_lag": 820}
    for _ in range(3):  # statistics every interval after the rebalance
        m.on_statistics(stats({"0": revoked, "1": owned(5)}))
        assert lag_series(m) == {"1": 5.0}


def test_a_partition_no_longer_fetched_loses_its_series_without_a_revoke():
    """Whatever the service saw of the rebalance, a partition librdkafka is not fetching (stopping,
    or not yet started) has no lag series. (A paused partition stays desired and active in the
    statistics, checked against the embedded broker, so a stopped partition keeps its lag.)"""
    m = ServiceMetrics("fraud")
    m.on_statistics(stats({"0": owned(7), "1": owned(3), "2": owned(1)}))
    stopping = {"desired": False, "fetch_state": "stopping", "consumer_lag": 7}
    starting = {"desired": True, "fetch_state": "offset-query", "consumer_lag": 3}
    m.on_statistics(stats({"0": stopping, "1": starting, "2": owned(4)}))
    assert lag_series(m) == {"2": 4.0}
    m.on_statistics(stats({"1": owned(9), "2": owned(4)}))  # the new owner of 1 is fetching
    assert lag_series(m) == {"1": 9.0, "2": 4.0}
