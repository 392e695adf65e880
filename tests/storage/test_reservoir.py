"""The retraining reservoir (migration 0006, streams.reservoir, storage.reservoir) on SQLite and
PostgreSQL: bounded, written with the batch, fenced on replay, cheap once full."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import insert
from storage_testlib import alert, reservoir_counts, reservoir_row, run_together

from anomaly.config import config_from_dict
from storage import AlertStore
from storage.records import OffsetRecord, SinkBatch
from streams.batch import Message
from streams.reservoir import ReservoirSampler, priorities

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def config(size: int, half_life_s: float = 3600.0, retention_s: float = 7 * 86400.0):
    return config_from_dict(
        {
            "name": "p",
            "schema": {"numeric": ["x"], "time_field": None},
            "retraining": {
                "reservoir_size": size,
                "half_life_s": half_life_s,
                "retention_s": retention_s,
            },
        },
        environ={},
    )


def batch_of(
    sampler: ReservoirSampler,
    start: int,
    n: int,
    alerts: set[int] = frozenset(),
    t=T0,
    partition: int = 0,
) -> SinkBatch:
    """Records ``start .. start+n-1`` of ``partition``, one second apart from ``t``."""
    messages = [
        Message(
            "t", partition, o, json.dumps({"id": o, "x": float(o)}).encode(),
            int((t + timedelta(seconds=o)).timestamp() * 1000),
        )
        for o in range(start, start + n)
    ]  # fmt: skip
    decoded = SimpleNamespace(index=np.arange(n), frame=pd.DataFrame({"x": range(n)}))
    result = SimpleNamespace(is_alert=np.array([o in alerts for o in range(start, start + n)]))
    batch = SinkBatch(
        pipeline="p",
        offsets=[OffsetRecord("p", "t", partition, start + n, first_offset=start)],
    )
    sampler.fill(batch, messages, decoded, result, "v1", t, json.loads)
    return batch


def write(store: AlertStore, sampler: ReservoirSampler, batch: SinkBatch):
    result = store.write_batch(batch)
    sampler.written(batch, result)
    return result


def test_the_reservoir_fills_stays_bounded_and_a_replay_adds_nothing(store: AlertStore) -> None:
    sampler = ReservoirSampler(config(size=200))
    first = batch_of(sampler, 0, 150, alerts={3, 4})
    assert len(first.reservoir) == 150  # not full yet: every scored record is a candidate
    write(store, sampler, first)
    assert store.reservoir_count("p") == 150 and sampler.threshold == -math.inf
    written = [len(first.reservoir)]
    for start in range(150, 5000, 150):
        b = batch_of(sampler, start, 150)
        written.append(len(b.reservoir))
        write(store, sampler, b)
        assert store.reservoir_count("p") <= 200
    assert store.reservoir_count("p") == 200
    assert sampler.threshold > -math.inf
    # Once full, few records per batch are candidates (and the sample leans to recent ones).
    assert sum(written[-10:]) < 0.3 * 10 * 150
    rows = store.reservoir_rows("p")
    assert np.median([r["kafka_offset"] for r in rows]) > 2500
    alerted = {r["kafka_offset"] for r in rows if r["alerted"]}
    assert alerted <= {3, 4}

    # The same batch again (a replay after a lost commit, another consumer): fenced.
    before = sorted(r["id"] for r in store.reservoir_rows("p"))
    replay = batch_of(ReservoirSampler(config(size=200)), 4800, 150)
    assert replay.reservoir
    assert store.write_batch(replay).records_fenced == 0  # no alerts to fence; rows are
    assert sorted(r["id"] for r in store.reservoir_rows("p")) == before


def test_the_service_keeps_the_highest_priorities_exactly(store: AlertStore) -> None:
    """Whatever the threshold the service knew, the store keeps the top-k of all records."""
    cfg = config(size=50)
    sampler = ReservoirSampler(cfg)
    for start in range(0, 1000, 100):
        write(store, sampler, batch_of(sampler, start, 100))
    offsets = np.arange(1000)
    times = np.array([(T0 + timedelta(seconds=int(o))).timestamp() for o in offsets])
    prio = priorities("t", np.zeros(1000, np.int64), offsets, times, 3600.0)
    top = set(np.argsort(-prio)[:50].tolist())
    assert {r["kafka_offset"] for r in store.reservoir_rows("p")} == top


def test_retention_deletes_old_samples(store: AlertStore) -> None:
    sampler = ReservoirSampler(config(size=1000, retention_s=3600))
    write(store, sampler, batch_of(sampler, 0, 100, t=T0))
    write(store, sampler, batch_of(sampler, 100, 100, t=T0 + timedelta(hours=2)))
    rows = store.reservoir_rows("p")
    assert {r["kafka_offset"] // 100 for r in rows} == {1}


def test_priorities_are_uniform_without_a_half_life() -> None:
    n = 20000
    prio = priorities("t", np.zeros(n, np.int64), np.arange(n), np.zeros(n), 0.0)
    top = np.argsort(-prio)[: n // 10]
    # The top tenth is spread evenly over the offsets (no order effect).
    counts = np.bincount(top * 10 // n, minlength=10)
    assert counts.min() > 150 and counts.max() < 250


def test_records_confirmed_as_anomalies_are_not_trained_on(store: AlertStore) -> None:
    sampler = ReservoirSampler(config(size=1000))
    batch = batch_of(sampler, 0, 20, alerts={3, 4})
    batch.alerts = [alert(o, pipeline="p", topic="t") for o in (3, 4)]
    write(store, sampler, batch)
    ids = {a["kafka_offset"]: a["id"] for a in store.list_alerts("p")}
    store.ack(ids[3], verdict="true_positive", by="ana")
    store.ack(ids[4], verdict="false_positive", by="ana")
    rows = store.reservoir_rows("p")
    assert store.reservoir_count("p") == 20 and len(rows) == 19
    assert 3 not in {r["kafka_offset"] for r in rows}
    assert [r["alerted"] for r in rows if r["kafka_offset"] == 4] == [True]


def _stored_count(store: AlertStore, pipeline: str) -> int | None:
    return reservoir_counts(store).get(pipeline)


def test_the_stored_count_follows_every_change_to_the_rows(store: AlertStore) -> None:
    """Fill, trim, a replay, retention, a smaller reservoir_size and prune all keep
    ``reservoir_counts`` equal to the rows there: the writes decide from it whether the
    reservoir is full."""
    sampler = ReservoirSampler(config(size=120, retention_s=3600))
    thresholds = []
    for start in range(0, 600, 50):
        write(store, sampler, batch_of(sampler, start, 50))
        thresholds.append(sampler.threshold)
        assert _stored_count(store, "p") == store.reservoir_count("p") <= 120
    assert thresholds[:2] == [-math.inf, -math.inf] and thresholds[2] > -math.inf
    assert thresholds == sorted(thresholds)  # a full reservoir's threshold only rises
    write(store, ReservoirSampler(config(size=120)), batch_of(sampler, 500, 50))  # a replay
    assert _stored_count(store, "p") == store.reservoir_count("p") == 120
    # Two hours later: retention empties the old sample, the new candidates are all that is left.
    later = batch_of(sampler, 600, 30, t=T0 + timedelta(hours=2))
    write(store, sampler, later)
    assert _stored_count(store, "p") == store.reservoir_count("p") == len(later.reservoir) > 0
    assert sampler.threshold == -math.inf
    smaller = ReservoirSampler(config(size=20, retention_s=3600))
    write(store, smaller, batch_of(smaller, 630, 10, t=T0 + timedelta(hours=2)))
    assert _stored_count(store, "p") == store.reservoir_count("p") == 20
    assert smaller.threshold > -math.inf
    assert store.prune(T0 + timedelta(days=1)).reservoir == 20
    assert _stored_count(store, "p") == store.reservoir_count("p") == 0


def test_the_count_migration_counts_the_rows_already_there(db_url: str) -> None:
    from storage import schema as s

    with AlertStore(db_url) as store:
        store.upgrade("0006")
        with store.engine.begin() as conn:
            rows = [(name, o) for name, n in (("cards", 7), ("machines", 3)) for o in range(n)]
            conn.execute(insert(s.reservoir), [reservoir_row(name, o, T0) for name, o in rows])
        store.upgrade()
        assert (_stored_count(store, "cards"), _stored_count(store, "machines")) == (7, 3)
        store.downgrade("0006")
        assert store.reservoir_count("cards") == 7


def _partition_writer(url: str, partition: int, start: Any, errors: Any) -> None:
    try:
        with AlertStore(url) as store:
            sampler = ReservoirSampler(config(size=100))
            start.wait(30)
            for first in range(0, 1000, 25):
                write(store, sampler, batch_of(sampler, first, 25, partition=partition))
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


@pytest.mark.reliability
def test_two_consumers_filling_one_reservoir_keep_the_count_and_the_top_k(db_url: str) -> None:
    """Two processes, one partition each, write the same pipeline's reservoir at once: the
    count lock makes them take turns, so the count stays exact and the rows are the top 100
    of both partitions' records."""
    with AlertStore(db_url) as store:
        store.upgrade()
    run_together(_partition_writer, [(db_url, 0), (db_url, 1)])
    with AlertStore(db_url) as store:
        rows = store.reservoir_rows("p")
        assert _stored_count(store, "p") == store.reservoir_count("p") == len(rows) == 100
    offsets = np.arange(1000)
    times = np.array([(T0 + timedelta(seconds=int(o))).timestamp() for o in offsets])
    every = {}
    for p in (0, 1):
        prio = priorities("t", np.full(1000, p, np.int64), offsets, times, 3600.0)
        every.update({(p, int(o)): value for o, value in zip(offsets, prio, strict=True)})
    top = set(sorted(every, key=every.__getitem__, reverse=True)[:100])
    assert {(r["kafka_partition"], r["kafka_offset"]) for r in rows} == top
